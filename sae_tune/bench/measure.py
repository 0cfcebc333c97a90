"""Measure a set of paths on one problem: run each once, check it against the exact result, then time
every correct one interleaved with dense, so that each ratio in a row comes from one run.

A path that fails or returns a wrong result is reported with its reason and never timed: a wrong path
must not look like a fast one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from sae_tune.autotune.timing import Timing, time_cuda
from sae_tune.autotune.verify import check
from sae_tune.bench.flush import CacheFlush
from sae_tune.bench.paths import DENSE, BenchPath
from sae_tune.bench.problem import Problem

OK, WRONG, ERROR, UNAVAILABLE = "ok", "wrong", "error", "not available"
FULL, KERNEL = "full", "kernel"
INTERPRETER_NOTE = "Triton interpreter: this time is not speed"


@dataclass(frozen=True)
class Measurement:
    """One measured (or refused) number: one CSV row.

    metric/value/unit   what was measured ("ms", "peak_bytes", "GB/s", ...); value is None when the
                        path did not run or was wrong.
    mode                "full" (from dense activations) or "kernel" (sparse structure prepared before).
    vs_dense            dense time / this time for "ms" rows (> 1: faster than dense).
    max_abs_diff        largest |out - dense out|; status says whether the output is within the dtype's
                        tolerance of the exact (fp64) result.
    spread              interquartile range of the timing samples relative to the median.
    of_baseline         this value / the baseline's value, for tables with another baseline than dense
                        (the SAE forward table: the unpatched forward's time or extra peak memory).
    """

    table: str
    path: str
    metric: str
    value: float | None
    unit: str
    shape: str = ""
    batch: int | None = None
    width: int | None = None
    d_model: int | None = None
    l0: int | None = None
    l0_mean: float | None = None
    l0_max: int | None = None
    mode: str = FULL
    max_l0: int | None = None
    vs_dense: float | None = None
    max_abs_diff: float | None = None
    spread: float | None = None
    of_baseline: float | None = None
    status: str = OK
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK and self.value is not None

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def point(table: str, problem: Problem, shape: str = "") -> Measurement:
    """A measurement template holding the problem's coordinates; fill in path, metric and value."""
    spec, stats = problem.spec, problem.stats
    return Measurement(
        table=table,
        path="",
        metric="ms",
        value=None,
        unit="ms",
        shape=shape or spec.name,
        batch=problem.batch,
        width=spec.width,
        d_model=spec.d_model,
        l0=spec.l0,
        l0_mean=round(stats.mean, 2),
        l0_max=stats.max,
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Timer:
    """Interleaved timing: round-robin over the paths, median per path.

    CPU: one ``perf_counter`` sample per path per round, each after ``flush`` (cold cache, see
    ``bench.flush``); at least 3 rounds, at most ``rounds``, fewer when a round is slower than
    ``budget_s`` allows. CUDA: ``cuda_rounds`` rounds of ``time_cuda`` (do_bench(warmup=25, rep=100)
    median, which clears L2 itself).
    """

    device: torch.device
    rounds: int = 9
    cuda_rounds: int = 3
    budget_s: float = 6.0
    flush: CacheFlush = field(default_factory=lambda: CacheFlush(0))

    def __call__(self, fns: dict[str, Callable[[], object]], round_ms: float) -> dict[str, Timing]:
        if not fns:
            return {}
        samples: dict[str, list[float]] = {name: [] for name in fns}
        if self.device.type == "cuda":
            for _ in range(self.cuda_rounds):
                for name, fn in fns.items():
                    samples[name].append(time_cuda(fn).ms)
        else:
            round_ms += len(fns) * self.flush.cost_ms()
            rounds = max(3, min(self.rounds, int(self.budget_s * 1e3 / max(round_ms, 1e-3))))
            for _ in range(rounds):
                for name, fn in fns.items():
                    self.flush()
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append((time.perf_counter() - t0) * 1e3)
        return {name: Timing(statistics.median(s), tuple(s)) for name, s in samples.items()}


def _runner(path: BenchPath, mode: str, problem: Problem) -> Callable[[], torch.Tensor]:
    acts, W, b = problem.acts, problem.W_dec, problem.b_dec
    if mode == KERNEL:
        assert path.prepare is not None and path.kernel is not None
        state, kernel = path.prepare(acts), path.kernel
        return lambda: kernel(state, W, b)
    assert path.full is not None
    full = path.full
    return lambda: full(acts, W, b)


def error_text(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= 300 else text[:297] + "..."


DENSE_KEY = "\0".join((DENSE, FULL))


def guard(name: str, fn: Callable[[], object], failures: dict[str, str]) -> Callable[[], object]:
    """``fn`` that records its first exception in ``failures`` and is a no-op from then on, so one path
    failing mid-timing (out of memory, say) does not lose the other paths' measurements."""

    def run() -> object:
        if name in failures:
            return None
        try:
            return fn()
        except Exception as exc:
            failures[name] = error_text(exc)
            return None

    return run


def _round_ms(runs: dict[str, Callable[[], object]], device: torch.device) -> float:
    """One warm call of each run: what a round of interleaved timing costs (sizes the CPU rounds)."""
    total = 0.0
    for fn in runs.values():
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        total += (time.perf_counter() - t0) * 1e3
    return total


def compare(
    problem: Problem,
    paths: list[BenchPath],
    timer: Timer,
    *,
    table: str,
    shape: str = "",
    modes: tuple[str, ...] = (FULL,),
) -> list[Measurement]:
    """Check, then time, each path in each of ``modes`` (kernel mode only for paths that split).

    ``paths`` must start with dense: its output is what max_abs_diff is measured against, and its time
    is what vs_dense divides.
    """
    if not paths or paths[0].name != DENSE:
        raise ValueError("compare() needs the dense path first")
    base = point(table, problem, shape)
    device = problem.acts.device
    rows: dict[tuple[str, str], Measurement] = {}
    runs: dict[str, Callable[[], object]] = {}
    dense_out: torch.Tensor | None = None
    for path in paths:
        row = replace(base, path=path.name, max_l0=path.max_l0, note=path.note)
        if path.triton and device.type == "cpu":
            row = replace(row, note=f"{row.note}; {INTERPRETER_NOTE}".strip("; "))
        for mode in modes:
            if mode == KERNEL and not path.splits:
                continue
            key = (path.name, mode)
            if path.unavailable is not None:
                rows[key] = replace(row, mode=mode, status=UNAVAILABLE, note=path.unavailable)
                continue
            try:
                fn = _runner(path, mode, problem)
                out = fn()  # first call: compiles, fills caches; checked below, never timed
            except Exception as exc:  # compiler errors, missing kernels, out of memory: reported, not raised
                rows[key] = replace(row, mode=mode, status=ERROR, note=error_text(exc))
                continue
            if dense_out is None and path.name == DENSE:
                dense_out = out
            diff = None
            if dense_out is not None and isinstance(out, torch.Tensor) and out.shape == dense_out.shape:
                diff = float((out.double() - dense_out.double()).abs().max()) if out.numel() else 0.0
            verdict = check(out, problem.reference, problem.out_dtype)
            del out
            if not verdict.ok:
                rows[key] = replace(row, mode=mode, status=WRONG, max_abs_diff=diff, note=verdict.reason)
                continue
            rows[key] = replace(row, mode=mode, max_abs_diff=diff)
            runs["\0".join(key)] = fn
    failures: dict[str, str] = {}
    guarded = {name: guard(name, fn, failures) for name, fn in runs.items()}
    timings = timer(guarded, _round_ms(guarded, device))
    dense_ms = None if DENSE_KEY in failures else timings.get(DENSE_KEY)
    for name, timing in timings.items():
        key = tuple(name.split("\0"))
        if name in failures:  # it failed on a later call: its time means nothing
            rows[key] = replace(rows[key], status=ERROR, note=f"failed while timed: {failures[name]}")
            continue
        vs = dense_ms.ms / timing.ms if dense_ms is not None and timing.ms > 0 else None
        rows[key] = replace(rows[key], value=timing.ms, vs_dense=vs, spread=round(timing.spread, 3))
    return list(rows.values())
