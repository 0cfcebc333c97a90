"""Timing of candidates: ``do_bench`` medians on CUDA, ``perf_counter`` medians on CPU.

Only real executions are timed. Kernels running in Triton's interpreter are never timed: their timings
say nothing about speed.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch

from sae_tune.cache.store import NOISY_SPREAD, is_noisy

# More rounds a noisy measurement gets before it is kept, flagged (the quietest of all its rounds is kept).
NOISY_RETRIES = 2
# The machine looks busy when its 1-minute load average reaches this many times its usable CPUs, or when
# the median spread of the baselines' timings passes BUSY_SPREAD (a quiet machine shows a few percent).
BUSY_LOAD = 1.5
BUSY_SPREAD = 0.2

T = TypeVar("T")


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

    @property
    def noisy(self) -> bool:
        """Whether the spread is past NOISY_SPREAD: the median of such samples is not a speed."""
        return is_noisy(timing_noise(self))


def quietest(measure: Callable[[], T], noise: Callable[[T], float], *, retries: int = NOISY_RETRIES) -> T:
    """``measure()``, repeated up to ``retries`` more times while ``noise`` of the result is past
    NOISY_SPREAD; the result with the least noise is returned (still noisy if every round was)."""
    best = measure()
    for _ in range(retries):
        if noise(best) <= NOISY_SPREAD:
            break
        again = measure()
        if noise(again) < noise(best):
            best = again
    return best


def timing_noise(timing: Timing) -> float:
    """The spread that decides whether ``timing`` is re-measured (0.0 for a single sample)."""
    return timing.spread if len(timing.samples) >= 2 else 0.0


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS tells it)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average, or None where the OS has none (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def busy_reason(baselines: Iterable[Timing] = ()) -> str | None:
    """Why the machine looks busy (its load average against its CPUs, or the spread of the baselines'
    timings), or None when it looks quiet."""
    reasons = []
    load, cpus = load_average(), usable_cpus()
    if load is not None and load >= BUSY_LOAD * cpus:
        reasons.append(f"load average {load:.1f} on {cpus} CPU{'s' if cpus > 1 else ''}")
    spreads = [t.spread for t in baselines if len(t.samples) >= 2]
    if spreads and statistics.median(spreads) > BUSY_SPREAD:
        reasons.append(f"the baselines' timings spread ±{statistics.median(spreads):.0%} (median)")
    return "; ".join(reasons) or None


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
