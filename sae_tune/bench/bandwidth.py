"""The memory roofline of a decode: the least traffic each path must move, and the device's copy rate.

Bytes are a model of the algorithm's minimal traffic, not counted by hardware: dense reads all of W_dec
plus the activations and writes the output; a sparse path reads the activations once, the fired rows of
W_dec (B x L0 rows, repeats included) and writes the output. Achieved bandwidth is those bytes over the
measured time; the fraction is against a large tensor copy (read + write) on the same device.
"""

from __future__ import annotations

import time

import torch

from sae_tune.bench.measure import Timer
from sae_tune.bench.paths import COMPILED, DENSE, DISPATCHER
from sae_tune.bench.problem import Problem

DENSE_PATHS = (DENSE, COMPILED)


def model_bytes(path: str, problem: Problem) -> int | None:
    """Minimal bytes moved by ``path`` on ``problem``; None for the dispatcher (its path is its choice)."""
    if path == DISPATCHER:
        return None
    B, F, D = problem.batch, problem.spec.width, problem.spec.d_model
    act, w = problem.acts.element_size(), problem.W_dec.element_size()
    out = torch.empty((), dtype=problem.out_dtype).element_size()
    io = B * F * act + B * D * out + D * problem.b_dec.element_size()
    rows = F if path in DENSE_PATHS else problem.nnz
    return io + rows * D * w


def copy_bandwidth(device: torch.device, mib: int, timer: Timer) -> float:
    """GB/s of ``dst.copy_(src)`` for a ``mib`` MiB float32 tensor, counting the read and the write."""
    n = mib * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t0 = time.perf_counter()
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_ms = (time.perf_counter() - t0) * 1e3
    ms = timer({"copy": lambda: dst.copy_(src)}, first_ms).get("copy")
    assert ms is not None
    return 2 * src.nbytes / (ms.ms / 1e3) / 1e9
