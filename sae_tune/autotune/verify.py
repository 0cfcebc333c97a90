"""Accuracy check a candidate must pass before it may win: compare with the dense product in fp64.

The tolerance is relative to the sum of absolute products ``|acts| @ |W_dec| (+ |b_dec|)``, which bounds
the rounding error of any summation order; an accumulation in fp32 rounded once to the output dtype stays
within about half an output ulp of it.
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
    ok: bool
    max_abs_err: float
    reason: str


def check(out: torch.Tensor, ref: Reference, expected_dtype: torch.dtype) -> Verdict:
    """Does ``out`` equal the reference within the tolerance of its dtype? Says why not."""
    if not isinstance(out, torch.Tensor):
        return Verdict(False, float("inf"), f"returned {type(out).__name__}, not a tensor")
    if out.shape != ref.value.shape:
        return Verdict(False, float("inf"), f"shape {tuple(out.shape)} != {tuple(ref.value.shape)}")
    if out.dtype != expected_dtype:
        return Verdict(False, float("inf"), f"dtype {out.dtype} != {expected_dtype}")
    diff = (out.detach().double().cpu() - ref.value.cpu()).abs()
    same_nonfinite = torch.equal(out.detach().cpu().isnan(), ref.value.cpu().isnan())
    diff = torch.where(ref.value.cpu().isfinite(), diff, torch.zeros_like(diff))
    finfo = torch.finfo(expected_dtype)
    floor = finfo.tiny * finfo.eps  # the subnormal step: tiny results round on an absolute grid
    tol = TOLERANCE[expected_dtype] * ACCUMULATION_SLACK * ref.scale.cpu() + floor
    excess = (diff - tol).max().item() if diff.numel() else 0.0
    max_err = diff.max().item() if diff.numel() else 0.0
    if not same_nonfinite:
        return Verdict(False, max_err, "NaN pattern differs from the dense product")
    if excess > 0:
        return Verdict(False, max_err, f"max abs error {max_err:.3g} exceeds the {expected_dtype} tolerance")
    return Verdict(True, max_err, "ok")
