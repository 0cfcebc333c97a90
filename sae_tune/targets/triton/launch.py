"""Launchers of the generated kernels: checks, allocation, grid. One function per pipeline stage.

``build_sparse`` turns dense activations into the sparse view a variant decodes from (CSR for exact
allocation, B x max_l0 slots for fixed); ``decode_sparse`` runs the decode kernel on that view;
``run_variant`` is both, with the overflow policy applied in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_tune.inputs import KERNEL_DTYPES, DecodeInputs, dtype_names, resolved
from sae_tune.targets.triton.render import load_module
from sae_tune.targets.triton.support import triton_unavailable_reason
from sae_tune.targets.triton.variant import Variant


class TruncationNotAllowed(ValueError):
    """An unchecked variant was asked to run without the caller allowing truncation."""


class MaxL0Exceeded(ValueError):
    """A token has more non-zeros than max_l0 under the validate policy."""


@dataclass(frozen=True)
class SparseView:
    """Non-zeros of a batch of activations in the layout the variant decodes from.

    exact: ``offsets`` is row_ptr (B + 1, int64); fixed: ``offsets`` is the per-token count (B, int32),
    and the pairs of token t sit at t * max_l0 + [0, min(count, max_l0)).
    """

    variant: Variant
    cols: torch.Tensor
    vals: torch.Tensor
    offsets: torch.Tensor
    acts: torch.Tensor  # kept for the fallback walk of over-full tokens


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _require_triton(device: torch.device) -> None:
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(reason)


def check_kernel_tensor(name: str, t: object) -> None:
    """Refuse what the generated kernels cannot read: not a tensor, not strided, or a dtype they do not
    compute in (float64 would silently be computed in fp32)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout is not torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor for the generated kernels, got {t.layout}")
    if t.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"the generated kernels take {dtype_names(KERNEL_DTYPES)}; {name} is {t.dtype} "
            "(sparse_decode without variant= takes float64 too)"
        )


def for_kernel(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` ready to be read through a raw pointer: checked, with its negation/conjugation bits resolved
    (a kernel would otherwise read the unnegated storage)."""
    check_kernel_tensor(name, t)
    return resolved(t)


def build_sparse(acts: torch.Tensor, variant: Variant) -> SparseView:
    """Sparse view of a 2-D (tokens, F) activation tensor, on its device."""
    acts = for_kernel("feature_acts", acts)
    if acts.dim() != 2:
        raise ValueError(f"build_sparse takes 2-D (tokens, F) activations, got shape {tuple(acts.shape)}")
    _require_triton(acts.device)
    module = load_module(variant)
    B, F = acts.shape
    n_slices = _cdiv(F, variant.block_f)
    grid = (B, n_slices)
    launch = {"num_warps": variant.num_warps_build}
    if variant.alloc == "exact":
        block_counts = torch.empty((B, n_slices), dtype=torch.int32, device=acts.device)
        if B:
            module.count_kernel[grid](acts, block_counts, F, acts.stride(0), acts.stride(1), **launch)
        ends = block_counts.view(-1).cumsum(0)  # int64: totals above 2**31 stay exact
        total = int(ends[-1]) if ends.numel() else 0  # the one host sync of exact allocation
        slice_start = ends - block_counts.view(-1)
        row_ptr = torch.cat([slice_start[::n_slices], ends.new_full((1,), total)])
        cols = torch.empty(total, dtype=torch.int32, device=acts.device)
        vals = torch.empty(total, dtype=acts.dtype, device=acts.device)
        if total:
            module.fill_kernel[grid](
                acts, slice_start, cols, vals, F, acts.stride(0), acts.stride(1), **launch
            )
        return SparseView(variant, cols, vals, row_ptr, acts)
    m = variant.max_l0
    counts = torch.zeros(B, dtype=torch.int32, device=acts.device)
    cols = torch.empty(B * m, dtype=torch.int32, device=acts.device)
    vals = torch.empty(B * m, dtype=acts.dtype, device=acts.device)
    if B:
        module.fill_fixed_kernel[grid](
            acts, counts, cols, vals, F, m, acts.stride(0), acts.stride(1), **launch
        )
    return SparseView(variant, cols, vals, counts, acts)


def require_truncation_allowed(variant: Variant, allow_truncation: bool) -> None:
    """Refuse a truncating variant unless the caller opted in."""
    if variant.can_truncate and not allow_truncation:
        raise TruncationNotAllowed(
            f"variant {variant.name} truncates tokens with more than max_l0={variant.max_l0} non-zeros; "
            "pass allow_truncation=True only where no token can exceed it"
        )


def check_overflow(view: SparseView, *, allow_truncation: bool = False) -> None:
    """Apply the overflow policy before decoding; only ``validate`` syncs with the host."""
    v = view.variant
    if v.alloc != "fixed" or view.offsets.numel() == 0:
        return
    require_truncation_allowed(v, allow_truncation)
    if v.overflow == "validate":
        largest = int(view.offsets.max())
        if largest > v.max_l0:
            raise MaxL0Exceeded(
                f"a token has {largest} non-zero features, more than max_l0={v.max_l0}; raise max_l0 or "
                "use overflow='fallback'"
            )


def decode_sparse(
    view: SparseView,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Decode a prepared sparse view: (tokens, D) in ``out_dtype``."""
    v = view.variant
    W_dec = for_kernel("W_dec", W_dec)
    b_dec = None if b_dec is None else for_kernel("b_dec", b_dec)
    _require_triton(W_dec.device)
    module = load_module(v)
    B, D = view.acts.shape[0], W_dec.shape[1]
    out = torch.empty((B, D), dtype=out_dtype, device=W_dec.device)
    if B == 0 or D == 0:
        return out
    bias = b_dec if b_dec is not None else out
    head: tuple = (view.offsets,) if v.alloc == "exact" else (view.offsets, v.max_l0)
    args = [*head, view.cols, view.vals, W_dec, bias, out, D, W_dec.stride(0), W_dec.stride(1)]
    args += [bias.stride(0), out.stride(0)]
    if v.alloc == "fixed" and v.overflow == "fallback":
        acts = view.acts
        args += [acts, acts.shape[1], acts.stride(0), acts.stride(1)]
    grid = (B, _cdiv(D, v.block_d))
    module.decode_kernel[grid](
        *args, HAS_BIAS=b_dec is not None, num_warps=v.num_warps, num_stages=v.num_stages
    )
    return out


def run_variant(inputs: DecodeInputs, variant: Variant, *, allow_truncation: bool = False) -> torch.Tensor:
    """The whole pipeline for one variant: build, overflow policy, decode. Returns (tokens, D)."""
    for name, t in (("feature_acts", inputs.acts), ("W_dec", inputs.W_dec), ("b_dec", inputs.b_dec)):
        if t is not None:
            check_kernel_tensor(name, t)  # refuse float64 here rather than compute it in fp32
    require_truncation_allowed(variant, allow_truncation)
    if inputs.F == 0:  # no features: the product is zeros, as for the dense expression
        out = torch.zeros(inputs.n_tokens, inputs.D, dtype=inputs.out_dtype, device=inputs.W_dec.device)
        return out if inputs.b_dec is None else out.add_(inputs.b_dec)
    view = build_sparse(inputs.acts, variant)
    check_overflow(view, allow_truncation=allow_truncation)
    return decode_sparse(view, inputs.W_dec, inputs.b_dec, inputs.out_dtype)
