"""Peak memory of one decode: measured where the device can tell, and modelled from the launchers'
allocations so that the Triton modes have a number on machines where they do not run.

Measured: on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before the call; on CPU
the bytes that went through torch's CPU allocator, from the profiler's memory events (allocations of
libraries underneath torch, such as MKL's sparse handles, are not seen). Both count the output and
temporaries, not the inputs.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from sae_tune.targets.triton.variant import Variant

CUDA_METHOD = "measured: torch.cuda.max_memory_allocated"
CPU_METHOD = (
    "measured: torch CPU allocator (profiler memory events; buffers allocated outside torch, such as "
    "MKL's internal ones and the C kernels' small scheduling arrays, are not seen)"
)
MODEL_METHOD = "model: sizes of the tensors the launchers allocate"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return torch.cuda.max_memory_allocated(device) - base


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the running sum of CPU allocations and frees recorded by the profiler during ``fn``."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # kineto prints start/stop banners to stderr otherwise
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def peak_bytes(fn: Callable[[], object], device: torch.device) -> tuple[int, str]:
    """(peak bytes, how it was measured) of one call of ``fn``."""
    if device.type == "cuda":
        return cuda_peak_bytes(fn, device), CUDA_METHOD
    return cpu_peak_bytes(fn), CPU_METHOD


# --- models -------------------------------------------------------------------------------------------


def dense_model(batch: int, d_model: int, out_size: int) -> int:
    """``acts @ W_dec`` then ``+ b_dec``: two (B, D) results alive at once."""
    return 2 * batch * d_model * out_size


def exact_model(
    batch: int, width: int, d_model: int, nnz: int, variant: Variant, act_size: int, out_size: int
) -> int:
    """Exact allocation: per-slice counts (int32), their cumsum and slice starts (int64), row_ptr, then
    cols (int32) and vals while building; the view and the output while decoding."""
    slices = batch * _cdiv(width, variant.block_f)
    view = (batch + 1) * 8 + nnz * (4 + act_size)
    build = slices * (4 + 8 + 8) + 8 + view
    return max(build, view + batch * d_model * out_size)


def fixed_model(batch: int, d_model: int, max_l0: int, act_size: int, out_size: int) -> int:
    """Fixed allocation: counts (int32), B x max_l0 slots of cols (int32) and vals, and the output."""
    return batch * 4 + batch * max_l0 * (4 + act_size) + batch * d_model * out_size
