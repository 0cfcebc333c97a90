"""Run one CPU variant: check the inputs, allocate the output, call the compiled kernel.

The call goes through ctypes, which releases the GIL while the C code runs; ``threads=0`` means
``torch.get_num_threads()`` at call time.
"""

from __future__ import annotations

import torch

from sae_tune import forksafe
from sae_tune.inputs import DecodeInputs, resolved
from sae_tune.targets.cpu.build import CpuKernel, build_source, forget_loaded
from sae_tune.targets.cpu.render import CpuDtypes, check_dtypes, render
from sae_tune.targets.cpu.variant import CpuVariant

# The kernel stores feature indices as int32.
MAX_FEATURES = 2**31 - 1


def kernel_dtypes(W_dec: torch.Tensor, b_dec: torch.Tensor | None) -> CpuDtypes:
    """The dtypes a call is specialised for: output in the dense expression's dtype."""
    out = W_dec.dtype if b_dec is None else torch.promote_types(W_dec.dtype, b_dec.dtype)
    return check_dtypes((W_dec.dtype, None if b_dec is None else b_dec.dtype, out))


_built: dict[tuple[CpuVariant, CpuDtypes], CpuKernel] = {}


def build(variant: CpuVariant, dtypes: CpuDtypes | tuple) -> CpuKernel:
    """The loaded kernel of ``variant`` for ``dtypes``: compiled (or verified from disk) on first use,
    then kept per process, so a call costs no rendering or hashing."""
    dtypes = check_dtypes(dtypes)
    key = (variant, dtypes)
    kernel = _built.get(key)
    if kernel is None:
        kernel = build_source(render(variant, dtypes))
        _built[key] = kernel
    return kernel


def forget_built() -> None:
    """Forget this process's loaded kernels (tests: the next build goes back to the disk)."""
    _built.clear()
    _prepared.clear()
    forget_loaded()


def _check(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None) -> None:
    for name, t in (("acts", acts), ("W_dec", W_dec), ("b_dec", b_dec)):
        if t is None and name == "b_dec":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"the CPU kernels run on CPU tensors; {name} is on {t.device}")
        if t.layout != torch.strided:
            raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if acts.dim() != 2 or W_dec.dim() != 2:
        raise ValueError(
            f"acts must be (tokens, F) and W_dec (F, D); got {tuple(acts.shape)} and {tuple(W_dec.shape)}"
        )
    if acts.shape[1] != W_dec.shape[0]:
        raise ValueError(f"acts has {acts.shape[1]} features but W_dec has {W_dec.shape[0]} rows")
    if acts.dtype != W_dec.dtype:
        raise TypeError(f"acts ({acts.dtype}) and W_dec ({W_dec.dtype}) must have the same dtype")
    if b_dec is not None and tuple(b_dec.shape) != (W_dec.shape[1],):
        raise ValueError(f"b_dec must have shape ({W_dec.shape[1]},), got {tuple(b_dec.shape)}")
    if W_dec.shape[0] > MAX_FEATURES:
        raise ValueError(f"W_dec has {W_dec.shape[0]} rows; the CPU kernels index features with int32")


def run(
    variant: CpuVariant,
    acts2d: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``acts2d @ W_dec (+ b_dec)`` as a (B, D) tensor of ``out_dtype``, by the C kernel of ``variant``."""
    _check(acts2d, W_dec, b_dec)
    dtypes = kernel_dtypes(W_dec, b_dec)
    if out_dtype != dtypes.out:
        raise TypeError(f"out_dtype must be {dtypes.out} (the dense expression's dtype), got {out_dtype}")
    # a negated or conjugated view's memory does not hold its values: materialise them first
    acts, W = resolved(acts2d), resolved(W_dec)
    b = resolved(b_dec) if b_dec is not None else None
    return _call(variant, build(variant, dtypes), acts, W, b, out_dtype)


_prepared: dict[tuple[CpuVariant, torch.dtype, torch.dtype | None], tuple[CpuKernel, torch.dtype]] = {}


def run_checked(variant: CpuVariant, inputs: DecodeInputs) -> torch.Tensor:
    """``run`` for inputs that ``check_decode_inputs`` already validated and resolved (the dispatcher's
    hot path): only what that check leaves out is checked here, and the kernel is looked up once."""
    acts, W, b = inputs.acts, inputs.W_dec, inputs.b_dec
    if not (acts.is_cpu and W.is_cpu):
        raise ValueError(f"the CPU kernels run on CPU tensors; the inputs are on {acts.device}")
    if inputs.F > MAX_FEATURES:
        raise ValueError(f"W_dec has {inputs.F} rows; the CPU kernels index features with int32")
    key = (variant, W.dtype, None if b is None else b.dtype)
    prepared = _prepared.get(key)
    if prepared is None:
        dtypes = kernel_dtypes(W, b)
        prepared = _prepared[key] = (build(variant, dtypes), dtypes.out)
    kernel, out_dtype = prepared
    return _call(variant, kernel, acts, W, b, out_dtype)


def _call(
    variant: CpuVariant,
    kernel: CpuKernel,
    acts: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    (B, F), D = acts.shape, W.shape[1]
    out = torch.empty((B, D), dtype=out_dtype)
    if B == 0 or D == 0:
        return out
    # a serial build (no OpenMP) runs one thread whatever the variant asks; so does a child forked from a
    # process with running OpenMP threads (GNU libgomp would hang: sae_tune.forksafe)
    threads = forksafe.threads(variant.threads or torch.get_num_threads()) if kernel.openmp else 1
    rc = kernel.fn(
        B,
        F,
        D,
        acts.data_ptr(),
        acts.stride(0),
        acts.stride(1),
        W.data_ptr(),
        W.stride(0),
        W.stride(1),
        b.data_ptr() if b is not None else None,
        b.stride(0) if b is not None else 0,
        out.data_ptr(),
        out.stride(0),
        threads,
    )
    if rc != 0:
        raise MemoryError(f"CPU kernel {variant.name}: out of memory for the compacted non-zeros")
    return out
