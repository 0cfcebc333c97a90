"""Accuracy check a candidate must pass before it may win: compare with the dense product in fp64.

The tolerance is relative to the sum of absolute products ``|acts| @ |W_dec| (+ |b_dec|)``, which bounds
the rounding error of any summation order; an accumulation in fp32 rounded once to the output dtype stays
within about half an output ulp of it.

Overflow: where that sum of absolute products reaches the largest finite value of the output dtype, some
summation order (the dense product's included) can overflow, so the reference cannot say what a correct
path returns there. A mismatch confined to such elements is not a failure of the path: the verdict is
``decided=False`` (the batch, not the path, is at fault) and the caller may try again on another batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Candidates may accumulate in the input dtype (library paths on CPU do, for fp16/bf16): allow a few ulps
# of the accumulator per term on top.
ACCUMULATION_SLACK = 4.0


@dataclass(frozen=True)
class Reference:
    """The exact result of one workload and the scale its errors are measured against."""

    value: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def of(cls, acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None) -> Reference:
        a, w = acts.double(), W_dec.double()
        value, scale = a @ w, a.abs() @ w.abs()
        if b_dec is not None:
            value, scale = value + b_dec.double(), scale + b_dec.double().abs()
        return cls(value, scale)


@dataclass(frozen=True)
class Verdict:
    """``ok``: within tolerance. ``decided``: False when only overflowing elements disagree, so the
    batch cannot tell a wrong path from a right one (then ``ok`` is False too)."""

    ok: bool
    max_abs_err: float
    reason: str
    decided: bool = True


def check(out: torch.Tensor, ref: Reference, expected_dtype: torch.dtype) -> Verdict:
    """Does ``out`` equal the reference within the tolerance of its dtype? Says why not."""
    if not isinstance(out, torch.Tensor):
        return Verdict(False, float("inf"), f"returned {type(out).__name__}, not a tensor")
    if out.shape != ref.value.shape:
        return Verdict(False, float("inf"), f"shape {tuple(out.shape)} != {tuple(ref.value.shape)}")
    if out.dtype != expected_dtype:
        return Verdict(False, float("inf"), f"dtype {out.dtype} != {expected_dtype}")
    got = out.detach().cpu().double()
    want, scale = ref.value.cpu(), ref.scale.cpu()
    finfo = torch.finfo(expected_dtype)
    floor = finfo.tiny * finfo.eps  # the subnormal step: tiny results round on an absolute grid
    tol = TOLERANCE[expected_dtype] * ACCUMULATION_SLACK * scale + floor
    # where the summed magnitudes (with rounding) reach the dtype's range, a partial sum may overflow
    at_risk = ~(scale + tol < finfo.max)
    want_nan, got_nan = want.isnan(), got.isnan()
    # as the dense product would return it: the exact value rounded to the output dtype (may be +-inf)
    rounded = want.to(expected_dtype).double()
    diff = (got - want).abs()
    good = (diff <= tol) | (got == rounded) | (want_nan & got_nan)
    max_err = diff[~at_risk].max().item() if (~at_risk).any() else 0.0
    if (want_nan & ~got_nan).any() or (got_nan & ~want_nan & ~at_risk).any():
        return Verdict(False, max_err, "NaN pattern differs from the dense product")
    if (~good & ~at_risk).any():
        return Verdict(False, max_err, f"max abs error {max_err:.3g} exceeds the {expected_dtype} tolerance")
    if (~good).any():
        n = int((~good).sum())
        return Verdict(
            False,
            max_err,
            f"undecided: {n} result(s) of this batch overflow {expected_dtype} (sums of magnitudes up to "
            f"{scale[~good].max().item():.3g}), where the dense product's value depends on summation order",
            decided=False,
        )
    return Verdict(True, max_err, "ok")
