"""Timing of candidates: ``do_bench`` medians on CUDA, ``perf_counter`` medians on CPU.

Only real executions are timed. Kernels running in Triton's interpreter are never timed: their timings
say nothing about speed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    """Median milliseconds of one candidate and the samples it came from."""

    ms: float
    samples: tuple[float, ...]

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median: how noisy the measurement was (0.0 for a single
        sample, which shows no spread; callers that store it should store None there instead)."""
        if len(self.samples) < 2 or not self.ms:
            return 0.0
        method = "exclusive" if len(self.samples) >= 4 else "inclusive"  # few samples: stay in range
        q = statistics.quantiles(self.samples, n=4, method=method)
        return (q[2] - q[0]) / self.ms


def time_cpu(fn: Callable[[], object], *, warmup: int = 2, repeat: int = 15, budget_s: float = 2.0) -> Timing:
    """Median of ``repeat`` wall-clock runs after ``warmup`` runs; fewer runs when one is slow."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < repeat:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
        if len(samples) >= 3 and time.perf_counter() - started > budget_s:
            break
    return Timing(statistics.median(samples), tuple(samples))


def time_cuda(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100) -> Timing:
    """Median of Triton's do_bench samples (it flushes L2 between runs and synchronizes); every sample
    is kept so that the spread of the measurement is known."""
    try:
        from triton.testing import do_bench
    except ImportError as exc:  # a CUDA torch without Triton (Triton is an extra of sae-tune)
        raise RuntimeError(
            f"timing on CUDA uses triton.testing.do_bench, and Triton cannot be imported ({exc}); "
            'install it with `pip install "sae-tune[triton]"`'
        ) from None
    samples = [float(t) for t in do_bench(fn, warmup=warmup, rep=rep, return_mode="all")]
    return Timing(statistics.median(samples), tuple(samples))


def time_fn(fn: Callable[[], object], device: torch.device | str) -> Timing:
    """Time ``fn`` the right way for ``device``."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn)
    return time_cpu(fn)


def time_interleaved(
    fns: Mapping[str, Callable[[], object]], device: torch.device | str, *, rounds: int = 7
) -> dict[str, Timing]:
    """Re-time finalists round-robin so that drift of the machine (clock, other load) hits all alike."""
    cuda = torch.device(device).type == "cuda"
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            if cuda:
                samples[name].append(time_cuda(fn, warmup=5, rep=25).ms)
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: Timing(statistics.median(s), tuple(s)) for name, s in samples.items()}
