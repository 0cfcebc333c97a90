"""Cost model for shapes nobody tuned: predict each path's time from the bytes it moves.

A decode is memory-bound on every device this project targets: dense reads all of W_dec (F*D values)
however few features fired, while a gather reads the activations once and only the fired rows
(N*L0*D values). So each path is priced as bytes over the device's copy bandwidth plus a fixed cost per
torch op (dispatch / kernel launch), with two refinements measured alongside: the rate at which
``nonzero()`` scans activations (the gather paths' first step, slower than a plain copy on CPU) and the
dense matmul's FLOP rate (large batches make dense compute-bound). The rates are measured once per
process and device (a few tens of milliseconds), never written anywhere.

A sparse path must beat dense by ``MARGIN`` to be chosen: the model is a rough guide, dense is what the
user had, and a tuned entry replaces the model as soon as the shape is tuned.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

MARGIN = 0.8


@dataclass(frozen=True)
class Rates:
    """Measured speeds of one device (and dtype, for the matmul rate)."""

    bandwidth: float  # bytes/s of a large copy, counting bytes read plus bytes written
    op_overhead: float  # seconds per small torch op
    scan: float  # elements/s of nonzero() over activations with 0.1% non-zeros
    flops: float  # FLOP/s of a dense matmul in the dtype


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def _best_seconds(
    fn: Callable[[], object], device: torch.device, *, repeat: int = 5, budget: float = 0.2
) -> float:
    """Fastest of a few runs after one warm-up (the fastest is the least disturbed by other load)."""
    sync = _sync(device)
    fn()
    sync()
    best, started = float("inf"), time.perf_counter()
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - started > budget:
            break
    return max(best, 1e-9)


@functools.cache
def _device_rates(device: torch.device) -> tuple[float, float, float]:
    n = (64 if device.type == "cpu" else 256) * 2**20 // 4  # beyond the last-level cache
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.numel() * 4 / _best_seconds(lambda: dst.copy_(src), device)
    a = torch.ones(4, device=device)
    c = torch.empty_like(a)
    reps = 200

    def small_ops() -> None:
        for _ in range(reps):
            torch.add(a, a, out=c)

    op_overhead = _best_seconds(small_ops, device, repeat=3) / reps
    acts = torch.zeros(64, 65536, device=device)
    acts.view(-1)[::1000] = 1.0
    scan = acts.numel() / _best_seconds(acts.nonzero, device)
    return bandwidth, op_overhead, scan


@functools.cache
def _matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    a = torch.ones(128, 2048, dtype=dtype, device=device)
    b = torch.ones(2048, 1024, dtype=dtype, device=device)
    return 2 * 128 * 2048 * 1024 / _best_seconds(lambda: a @ b, device, repeat=3)


def measure_rates(device: torch.device | str, dtype: torch.dtype = torch.float32) -> Rates:
    """The rates of ``device`` (measured on first use, then cached for the process)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    bandwidth, op_overhead, scan = _device_rates(device)
    return Rates(bandwidth, op_overhead, scan, _matmul_flops(device, dtype))


def predict(
    paths: tuple[str, ...],
    *,
    n_tokens: int,
    F: int,
    D: int,
    mean_l0: float,
    itemsize: int,
    rates: Rates,
    has_bias: bool = True,
) -> dict[str, float]:
    """Predicted seconds per decode of each of ``paths``: each target prices its own implementations."""
    from sae_tune.targets import ModelProblem, target_of

    problem = ModelProblem(n_tokens, F, D, mean_l0, itemsize, has_bias)
    costs = {}
    for path in paths:
        try:
            target = target_of(path)
        except ValueError:
            raise ValueError(f"the cost model has no formula for {path!r}") from None
        costs[path] = target.cost(path, problem, rates)
    return costs


@dataclass(frozen=True)
class ModelChoice:
    impl: str
    config: dict
    reason: str


def choose(
    paths: tuple[str, ...] | dict[str, dict],
    *,
    n_tokens: int,
    F: int,
    D: int,
    mean_l0: float,
    itemsize: int,
    rates: Rates,
    has_bias: bool = True,
) -> ModelChoice:
    """The predicted fastest path (``paths`` maps each to the config it would run with); a sparse path
    only if it beats dense by ``MARGIN``."""
    configs = paths if isinstance(paths, dict) else {p: {} for p in paths}
    costs = predict(
        tuple(configs),
        n_tokens=n_tokens,
        F=F,
        D=D,
        mean_l0=mean_l0,
        itemsize=itemsize,
        rates=rates,
        has_bias=has_bias,
    )
    best = min(costs, key=costs.__getitem__)
    if best != "dense" and costs[best] > MARGIN * costs["dense"]:
        best = "dense"
    others = ", ".join(f"{p} ~{costs[p] * 1e3:.3g} ms" for p in sorted(costs, key=costs.__getitem__))
    reason = (
        f"cost model at mean L0 {mean_l0:.3g}, {rates.bandwidth / 1e9:.3g} GB/s, "
        f"{rates.op_overhead * 1e6:.2g} us/op: {others}"
    )
    return ModelChoice(best, dict(configs[best]), reason)
