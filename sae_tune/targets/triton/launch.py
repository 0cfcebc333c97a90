"""Launchers of the generated kernels: checks, allocation, grid. One function per pipeline stage.

``build_sparse`` turns dense activations into the sparse view a variant decodes from (chunk slots for
chunked allocation, CSR for exact, B x max_l0 slots for fixed); ``decode_sparse`` runs the decode kernel
on that view; ``run_variant`` is both, with the overflow policy applied in between.

Every launch is described by a ``Launch`` (kernel, grid, arguments, constexprs, options) built by the same
functions for a real call and for ``compile_check``, which compiles the kernels with the specialisation
Triton derives from those very arguments. A variant whose ``host_sync`` is False converts no device
tensor to a Python value anywhere on its path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

from sae_tune.inputs import KERNEL_DTYPES, DecodeInputs, dtype_names, resolved
from sae_tune.targets.triton.render import load_module
from sae_tune.targets.triton.support import triton_unavailable_reason
from sae_tune.targets.triton.variant import Variant

GRID_YZ_LIMIT = 65535  # CUDA's bound on the 2nd and 3rd grid dimensions (the 1st takes 2**31 - 1)


class TruncationNotAllowed(ValueError):
    """An unchecked variant was asked to run without the caller allowing truncation."""


class MaxL0Exceeded(ValueError):
    """A token has more non-zeros than max_l0 under the validate policy."""


@dataclass(frozen=True)
class SparseView:
    """Non-zeros of a batch of activations in the layout the variant decodes from.

    chunked: ``offsets`` is the count of each (token, chunk) (B x n_chunks, int32) and the pairs of chunk
    c of token t sit at (t * n_chunks + c) * chunk_slots + [0, chunk_slots), empty slots with value 0;
    exact: ``offsets`` is row_ptr (B + 1, int64); fixed: ``offsets`` is the per-token count (B, int32),
    and the pairs of token t sit at t * max_l0 + [0, min(count, max_l0)).
    """

    variant: Variant
    cols: torch.Tensor
    vals: torch.Tensor
    offsets: torch.Tensor
    acts: torch.Tensor  # kept for the walks of over-full tokens (fallback) and chunks (chunked)


@dataclass(frozen=True)
class Launch:
    """One kernel launch: what ``compile_check`` specialises and what a call runs."""

    kernel: str
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _require_triton(device: torch.device) -> None:
    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(reason)


_modules: dict[Variant, tuple[Callable[[Variant], ModuleType], ModuleType]] = {}


def module_for(variant: Variant) -> ModuleType:
    """The generated module of ``variant``, looked up once per variant (no render check per call); what
    ``load_module`` returned, as long as it is the loader in use."""
    hit = _modules.get(variant)
    if hit is not None and hit[0] is load_module:
        return hit[1]
    module = load_module(variant)
    _modules[variant] = (load_module, module)
    return module


def device_guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Make ``device`` current while launching: Triton launches on the current device's stream, and
    allocations without a device would land on the current device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _run(variant: Variant, launch: Launch) -> None:
    kernel = getattr(module_for(variant), launch.kernel)
    kernel[launch.grid](
        *launch.args, **launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages
    )


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


# --- launches -----------------------------------------------------------------------------------------
def n_chunks(F: int, variant: Variant) -> int:
    """BLOCK_F chunks (slices) of a row of F features."""
    return _cdiv(F, variant.block_f)


def n_units(F: int, variant: Variant) -> int:
    """Decode work units per token of the chunked family."""
    return _cdiv(n_chunks(F, variant), variant.unit_chunks)


def build_launch(
    kernel: str, variant: Variant, acts: torch.Tensor, *tensors: torch.Tensor, max_l0: int | None = None
) -> Launch:
    """A build kernel over a 1-D grid of (token, slice) programs: no 65,535 bound on the slices."""
    B, F = acts.shape
    slices = n_chunks(F, variant)
    extra = () if max_l0 is None else (max_l0,)
    args = (acts, *tensors, F, slices, *extra, acts.stride(0), acts.stride(1))
    return Launch(kernel, (B * slices,), args, num_warps=variant.num_warps_build)


def _d_tiles(D: int, block_d: int) -> int:
    tiles = _cdiv(D, block_d)
    if tiles > GRID_YZ_LIMIT:
        raise ValueError(
            f"D={D} needs {tiles} tiles of block_d={block_d}, more than a grid's second dimension takes "
            f"({GRID_YZ_LIMIT}); use a larger block_d"
        )
    return tiles


def fits_int32(F: int, D: int, W_dec: torch.Tensor) -> bool:
    """Whether every W_dec element offset, (F - 1) x stride_wf + (D - 1) x stride_wd, fits int32 (the
    chunked decode then multiplies in 32 bits)."""
    largest = max(F - 1, 0) * abs(W_dec.stride(0)) + max(D - 1, 0) * abs(W_dec.stride(1))
    return largest < 2**31


def decode_launches(
    view: SparseView, W_dec: torch.Tensor, b_dec: torch.Tensor | None, out: torch.Tensor
) -> list[Launch]:
    """The decode (and, for chunked variants with several units per token, the reduce) launches."""
    v = view.variant
    B, F = view.acts.shape
    D = W_dec.shape[1]
    bias = b_dec if b_dec is not None else out
    has_bias = {"HAS_BIAS": b_dec is not None}
    opts = {"num_warps": v.num_warps, "num_stages": v.num_stages}
    tiles = _d_tiles(D, v.block_d)
    w_strides = (W_dec.stride(0), W_dec.stride(1), bias.stride(0), out.stride(0))
    if v.alloc == "chunked":
        acts, units = view.acts, n_units(F, v)
        direct = units == 1
        part = out if direct else torch.empty((B * units, D), dtype=torch.float32, device=out.device)
        args = (view.offsets, view.cols, view.vals, acts, W_dec, bias, out, part, F, D, n_chunks(F, v), units)
        args += (acts.stride(0), acts.stride(1), *w_strides)
        wide = not fits_int32(F, D, W_dec)
        consts = {**has_bias, "DIRECT": direct, "WIDE": wide}
        launches = [Launch("decode_kernel", (B * units, tiles), args, consts, **opts)]
        if not direct:
            reduce_args = (part, bias, out, D, units, bias.stride(0), out.stride(0))
            launches.append(Launch("reduce_kernel", (B, tiles), reduce_args, has_bias, **opts))
        return launches
    head: tuple = (view.offsets,) if v.alloc == "exact" else (view.offsets, v.max_l0)
    args = (*head, view.cols, view.vals, W_dec, bias, out, D, *w_strides)
    if v.alloc == "fixed" and v.overflow == "fallback":
        acts = view.acts
        args += (acts, F, acts.stride(0), acts.stride(1))
    return [Launch("decode_kernel", (B, tiles), args, has_bias, **opts)]


def representative_launches(
    variant: Variant, F: int, D: int, dtype: torch.dtype, B: int = 32, with_bias: bool = True
) -> Iterator[Launch]:
    """Every launch of ``variant`` for contiguous (B, F) activations and an (F, D) W_dec, on meta tensors:
    the arguments a real call passes, for ``compile_check`` to specialise exactly as Triton does."""
    meta = {"device": "meta"}
    acts = torch.empty((B, F), dtype=dtype, **meta)
    W = torch.empty((F, D), dtype=dtype, **meta)
    b = torch.empty((D,), dtype=dtype, **meta) if with_bias else None
    out = torch.empty((B, D), dtype=dtype, **meta)
    slices = n_chunks(F, variant)
    if variant.alloc == "chunked":
        counts = torch.empty(B * slices, dtype=torch.int32, **meta)
        cols = torch.empty(B * slices * variant.chunk_slots, dtype=torch.int32, **meta)
        vals = torch.empty(B * slices * variant.chunk_slots, dtype=dtype, **meta)
        yield build_launch("fill_chunks_kernel", variant, acts, counts, cols, vals)
        offsets = counts
    elif variant.alloc == "exact":
        counts = torch.empty(B * slices, dtype=torch.int32, **meta)
        starts = torch.empty(B * slices, dtype=torch.int64, **meta)
        cols = torch.empty(B * 64, dtype=torch.int32, **meta)
        vals = torch.empty(B * 64, dtype=dtype, **meta)
        yield build_launch("count_kernel", variant, acts, counts)
        yield build_launch("fill_kernel", variant, acts, starts, cols, vals)
        offsets = torch.empty(B + 1, dtype=torch.int64, **meta)
    else:
        counts = torch.empty(B, dtype=torch.int32, **meta)
        cols = torch.empty(B * variant.max_l0, dtype=torch.int32, **meta)
        vals = torch.empty(B * variant.max_l0, dtype=dtype, **meta)
        yield build_launch("fill_fixed_kernel", variant, acts, counts, cols, vals, max_l0=variant.max_l0)
        offsets = counts
    yield from decode_launches(SparseView(variant, cols, vals, offsets, acts), W, b, out)


# --- pipeline -----------------------------------------------------------------------------------------
def build_sparse(acts: torch.Tensor, variant: Variant) -> SparseView:
    """Sparse view of a 2-D (tokens, F) activation tensor, on its device."""
    acts = for_kernel("feature_acts", acts)
    if acts.dim() != 2:
        raise ValueError(f"build_sparse takes 2-D (tokens, F) activations, got shape {tuple(acts.shape)}")
    _require_triton(acts.device)
    B, F = acts.shape
    slices = n_chunks(F, variant)
    dev = {"device": acts.device}
    with device_guard(acts.device):
        if variant.alloc == "chunked":
            slots = B * slices * variant.chunk_slots
            counts = torch.empty(B * slices, dtype=torch.int32, **dev)
            cols = torch.empty(slots, dtype=torch.int32, **dev)
            vals = torch.empty(slots, dtype=acts.dtype, **dev)
            if B:
                _run(variant, build_launch("fill_chunks_kernel", variant, acts, counts, cols, vals))
            return SparseView(variant, cols, vals, counts, acts)
        if variant.alloc == "exact":
            block_counts = torch.empty(B * slices, dtype=torch.int32, **dev)
            if B:
                _run(variant, build_launch("count_kernel", variant, acts, block_counts))
            ends = block_counts.cumsum(0)  # int64: totals above 2**31 stay exact
            total = int(ends[-1]) if ends.numel() else 0  # the one host sync of exact allocation
            slice_start = ends - block_counts
            row_ptr = torch.cat([slice_start[::slices], ends.new_full((1,), total)])
            cols = torch.empty(total, dtype=torch.int32, **dev)
            vals = torch.empty(total, dtype=acts.dtype, **dev)
            if total:
                _run(variant, build_launch("fill_kernel", variant, acts, slice_start, cols, vals))
            return SparseView(variant, cols, vals, row_ptr, acts)
        m = variant.max_l0
        counts = torch.zeros(B, dtype=torch.int32, **dev)
        cols = torch.empty(B * m, dtype=torch.int32, **dev)
        vals = torch.empty(B * m, dtype=acts.dtype, **dev)
        if B:
            _run(variant, build_launch("fill_fixed_kernel", variant, acts, counts, cols, vals, max_l0=m))
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
    W_dec = for_kernel("W_dec", W_dec)
    b_dec = None if b_dec is None else for_kernel("b_dec", b_dec)
    _require_triton(W_dec.device)
    B, D = view.acts.shape[0], W_dec.shape[1]
    with device_guard(W_dec.device):
        out = torch.empty((B, D), dtype=out_dtype, device=W_dec.device)
        if B == 0 or D == 0:
            return out
        for launch in decode_launches(view, W_dec, b_dec, out):
            _run(view.variant, launch)
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
