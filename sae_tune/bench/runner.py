"""Run the benchmark: decide what runs on this device, run the tables in order, stamp the result."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import torch

from sae_tune.bench.config import BenchConfig
from sae_tune.bench.flush import CacheFlush, default_flush_bytes
from sae_tune.bench.measure import Measurement, Timer
from sae_tune.bench.problem import WeightCache
from sae_tune.bench.tables import RUNNERS, BenchContext
from sae_tune.device import cpu_model_name, describe_device
from sae_tune.progress import Progress
from sae_tune.targets.triton.support import interpreter_active, triton_unavailable_reason

if TYPE_CHECKING:
    from sae_tune.bench.output import BenchOutput


@dataclass(frozen=True)
class Stamp:
    """Where and with what a run was measured; written into every CSV row and the Markdown header."""

    device_kind: str
    device: str
    capability: str
    cpu_model: str
    threads: int
    torch: str
    triton: str
    sae_tune: str
    dtype: str
    date: str
    config: str
    cache_flush_mib: int

    @classmethod
    def now(cls, device: torch.device, dtype: torch.dtype, config: BenchConfig, flush_bytes: int) -> Stamp:
        from sae_tune import __version__

        info = describe_device(device)
        return cls(
            device_kind=info.kind,
            device=info.name,
            capability=info.capability or "",
            cpu_model=cpu_model_name(),
            threads=torch.get_num_threads(),
            torch=info.torch_version,
            triton=info.triton_version or "not installed",
            sae_tune=__version__,
            dtype=str(dtype).removeprefix("torch."),
            date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            config=config.name,
            cache_flush_mib=flush_bytes >> 20,
        )


@dataclass(frozen=True)
class BenchResult:
    measurements: tuple[Measurement, ...]
    stamp: Stamp
    config: BenchConfig
    triton: bool
    triton_note: str
    seconds: float
    kept: tuple[str, ...] = ()  # tables read back from an earlier run's files (--resume), not measured


def triton_decision(device: torch.device) -> tuple[bool, str]:
    """(whether the Triton modes run, why not). They run on CUDA only: interpreter timings are not speed."""
    if device.type != "cuda":
        return False, (
            "Triton modes are left out on CPU: they would run in Triton's interpreter, whose timings say "
            "nothing about speed. Run `sae-tune bench --device cuda` on a GPU for them."
        )
    if interpreter_active():
        return False, "Triton modes are left out: TRITON_INTERPRET is set; kernels would not run on the GPU."
    reason = triton_unavailable_reason(device)
    if reason is not None:
        return False, f"Triton modes are left out: {reason}"
    return True, ""


def flush_size(config: BenchConfig) -> int:
    """Bytes rewritten before each timed CPU call (0 = no flush)."""
    return default_flush_bytes() if config.flush_mib is None else config.flush_mib << 20


def run_bench(
    config: BenchConfig,
    device: torch.device | str = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    triton: bool | None = None,
    tables: tuple[str, ...] | None = None,
    log: Callable[[str], None] = lambda _: None,
    output: BenchOutput | None = None,
    progress: bool = False,
) -> BenchResult:
    """Measure ``tables`` (default: all) on ``device``. ``triton`` overrides the device's default: forcing
    it on CPU runs the kernels in the interpreter, which tests use to exercise the GPU rows.

    With ``output``, each table is written as soon as it is done (a stopped run keeps what it measured),
    and tables it already holds from a run like this one (``resume``) are kept instead of measured. With
    ``progress``, tables done of those asked and an estimate of the time left go to stderr
    (``sae_tune.progress``)."""
    device = torch.device(device)
    auto, note = triton_decision(device)
    use_triton = auto if triton is None else triton
    if use_triton and device.type == "cpu":
        note = "Triton modes ran in Triton's interpreter (a test run): their times are not speed."
    elif use_triton:
        note = ""
    flush_bytes = 0 if device.type == "cuda" else flush_size(config)
    timer = Timer(device, config.rounds, config.cuda_rounds, config.budget_s, CacheFlush(flush_bytes))
    ctx = BenchContext(
        config=config,
        device=device,
        dtype=dtype,
        triton=use_triton,
        timer=timer,
        weights=WeightCache(dtype=dtype, device=device, seed=config.seed),
        log=log,
    )
    stamp = Stamp.now(device, dtype, config, flush_bytes)
    started = time.perf_counter()
    names = [name for name in RUNNERS if tables is None or name in tables]
    done = {} if output is None else output.completed(stamp, names, log)
    rows: list[Measurement] = []
    kept: list[str] = []

    def result() -> BenchResult:
        seconds = time.perf_counter() - started
        return BenchResult(tuple(rows), stamp, config, use_triton, note, seconds, tuple(kept))

    bar = Progress(len(names), "bench", unit="table", enabled=progress)
    with torch.no_grad(), bar:
        for name in names:
            if name in done:
                rows += done[name]
                kept.append(name)
                log(f"{name}: kept from {output.table_path(name)}")  # type: ignore[union-attr]
                bar.update(note=f"{name} kept")
                continue
            t0 = time.perf_counter()
            log(f"{name} ...")
            new = RUNNERS[name](ctx)
            rows += new
            if output is not None:
                output.table_done(name, new, result())
            log(f"{name} done in {time.perf_counter() - t0:.1f} s")
            bar.update(note=f"{name} done")
    return result()
