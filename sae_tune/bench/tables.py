"""What each of the eight tables measures. Every function takes the run's context and returns its rows.

Tables: 1 summary at the reference shape; 2 kernel only (sparse structure prepared before) vs the full
pipeline; 3 L0 sweep; 4 width sweep; 5 real SAE shapes; 6 peak memory; 7 achieved bandwidth against the
device's copy bandwidth, and a batch sweep for where dense starts to win; 8 the whole SAELens SAE forward
(``bench.forward``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from sae_tune.bench.bandwidth import copy_bandwidth, model_bytes
from sae_tune.bench.config import BenchConfig
from sae_tune.bench.forward import FORWARD, sae_forward
from sae_tune.bench.measure import (
    ERROR,
    FULL,
    KERNEL,
    UNAVAILABLE,
    Measurement,
    Timer,
    compare,
    point,
)
from sae_tune.bench.memory import MODEL_METHOD, dense_model, exact_model, fixed_model, peak_bytes
from sae_tune.bench.paths import (
    COMPILED,
    DENSE,
    DISPATCHER,
    EXACT,
    BenchPath,
    comparison_paths,
    compiled_dense_path,
    dispatcher_path,
    library_paths,
    triton_paths,
)
from sae_tune.bench.problem import Problem, WeightCache, make_problem
from sae_tune.specs import SAESpec, spec_from_shape
from sae_tune.targets.triton.variant import Variant

SUMMARY = "summary"
SPLIT = "kernel_vs_pipeline"
L0_SWEEP = "l0_sweep"
WIDTH_SWEEP = "width_sweep"
SHAPES = "real_shapes"
MEMORY = "peak_memory"
BANDWIDTH = "bandwidth"
BATCH_SWEEP = "batch_sweep"
TABLES = (SUMMARY, SPLIT, L0_SWEEP, WIDTH_SWEEP, SHAPES, MEMORY, BANDWIDTH, BATCH_SWEEP, FORWARD)


@dataclass(frozen=True)
class BenchContext:
    """Everything a table needs: sizes, device, whether Triton modes run, the timer and the weights."""

    config: BenchConfig
    device: torch.device
    dtype: torch.dtype
    triton: bool
    timer: Timer
    weights: WeightCache
    log: Callable[[str], None]

    def spec(self, *, width: int | None = None, l0: int | None = None) -> SAESpec:
        c = self.config
        return spec_from_shape(width or c.width, c.d_model, l0 or c.l0)

    def problem(self, spec: SAESpec, batch: int | None = None) -> Problem:
        return make_problem(spec, batch or self.config.batch, self.weights, seed=self.config.seed)


def summary(ctx: BenchContext) -> list[Measurement]:
    """Table 1: every path at the reference shape, including torch.compile'd dense."""
    problem = ctx.problem(ctx.spec())
    paths = library_paths(ctx.device, ctx.dtype)
    if ctx.config.compile_dense:
        paths.insert(1, compiled_dense_path())
    else:
        paths.insert(1, BenchPath(COMPILED, None, unavailable="left out by the configuration"))
    if ctx.triton:
        paths += triton_paths(problem)
    paths.append(dispatcher_path(problem))
    return compare(problem, paths, ctx.timer, table=SUMMARY)


def kernel_vs_pipeline(ctx: BenchContext) -> list[Measurement]:
    """Table 2: each sparse path from dense activations, and its kernel alone on a structure built before."""
    problem = ctx.problem(ctx.spec())
    paths = library_paths(ctx.device, ctx.dtype, split_extras=True)
    if ctx.triton:
        paths += triton_paths(problem)
    return compare(problem, paths, ctx.timer, table=SPLIT, modes=(FULL, KERNEL))


def _sweep(ctx: BenchContext, table: str, specs: list[SAESpec], labels: list[str]) -> list[Measurement]:
    rows: list[Measurement] = []
    for spec, label in zip(specs, labels, strict=True):
        ctx.log(f"  {table}: {label} (F={spec.width}, D={spec.d_model}, L0={spec.l0})")
        problem = ctx.problem(spec)
        paths = comparison_paths(problem, triton=ctx.triton)
        rows += compare(problem, paths, ctx.timer, table=table, shape=label)
    return rows


def l0_sweep(ctx: BenchContext) -> list[Measurement]:
    """Table 3: L0 from far below to far above real SAEs, at the reference B, F and D."""
    specs = [ctx.spec(l0=l0) for l0 in ctx.config.l0_sweep]
    return _sweep(ctx, L0_SWEEP, specs, [f"L0={l0}" for l0 in ctx.config.l0_sweep])


def width_sweep(ctx: BenchContext) -> list[Measurement]:
    """Table 4: SAE width at the reference B, L0 and D (narrow SAEs are where dense can win)."""
    specs = [ctx.spec(width=f) for f in ctx.config.width_sweep]
    return _sweep(ctx, WIDTH_SWEEP, specs, [f"F={f}" for f in ctx.config.width_sweep])


def real_shapes(ctx: BenchContext) -> list[Measurement]:
    """Table 5: published SAE shapes at the reference batch."""
    cases = ctx.config.shapes
    return _sweep(ctx, SHAPES, [c.spec for c in cases], [c.label for c in cases])


# --- table 6 ------------------------------------------------------------------------------------------


def _measured(ctx: BenchContext, base: Measurement, path: BenchPath, problem: Problem) -> Measurement:
    row = replace(base, path=path.name, metric="peak_bytes", unit="bytes", max_l0=path.max_l0)
    if path.unavailable is not None or path.full is None:
        return replace(row, status=UNAVAILABLE, note=path.unavailable or "")
    full = path.full
    try:
        value, method = peak_bytes(lambda: full(problem.acts, problem.W_dec, problem.b_dec), ctx.device)
    except Exception as exc:  # an out-of-memory is a result of this table, not a crash
        return replace(row, status=ERROR, note=f"{type(exc).__name__}: {exc}"[:300])
    return replace(row, value=float(value), note=method)


def _model(base: Measurement, name: str, value: int, max_l0: int | None = None) -> Measurement:
    return replace(
        base,
        path=name,
        metric="model_bytes",
        value=float(value),
        unit="bytes",
        max_l0=max_l0,
        note=MODEL_METHOD,
    )


def peak_memory(ctx: BenchContext) -> list[Measurement]:
    """Table 6: dense, the library sparse paths, exact allocation and fixed allocation at two caps.

    The Triton modes are measured only where they run (CUDA); their model rows are there everywhere.
    """
    rows: list[Measurement] = []
    act = torch.empty((), dtype=ctx.dtype).element_size()
    for batch in ctx.config.memory_batches:
        ctx.log(f"  {MEMORY}: B={batch}")
        problem = ctx.problem(ctx.spec(), batch)
        base = point(MEMORY, problem)
        out = torch.empty((), dtype=problem.out_dtype).element_size()
        F, D = problem.spec.width, problem.spec.d_model
        for path in library_paths(ctx.device, ctx.dtype):
            rows.append(_measured(ctx, base, path, problem))
        rows.append(_model(base, DENSE, dense_model(batch, D, out)))
        exact = Variant()
        rows.append(_model(base, EXACT, exact_model(batch, F, D, problem.nnz, exact, act, out)))
        modes = [(EXACT, exact)]
        for cap in ctx.config.memory_max_l0s:
            name = f"triton fixed (max_l0={cap})"
            rows.append(_model(base, name, fixed_model(batch, D, cap, act, out), cap))
            modes.append((name, Variant(alloc="fixed", overflow="fallback", max_l0=cap)))
        if ctx.triton:
            for name, variant in modes:
                path = _memory_triton_path(name, variant)
                rows.append(_measured(ctx, base, path, problem))
    return rows


def _memory_triton_path(name: str, variant: Variant) -> BenchPath:
    from sae_tune.decode import sparse_decode

    def full(a: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sparse_decode(a, W, b, variant=variant)

    return BenchPath(name, full, max_l0=variant.max_l0 if variant.alloc == "fixed" else None, triton=True)


# --- table 7 ------------------------------------------------------------------------------------------


def _bandwidth_rows(rows: list[Measurement], problem: Problem, copy_gbps: float) -> list[Measurement]:
    out: list[Measurement] = []
    for r in rows:
        nbytes = model_bytes(r.path, problem) if r.ok and r.metric == "ms" else None
        if nbytes is None or not r.value:
            continue
        gbps = nbytes / (r.value / 1e3) / 1e9
        common = {"table": BANDWIDTH, "vs_dense": None, "spread": None}
        note = f"{nbytes} bytes (model)"
        out.append(replace(r, **common, metric="GB/s", value=gbps, unit="GB/s", note=note))
        out.append(
            replace(r, **common, metric="fraction_of_copy", value=gbps / copy_gbps, unit="1", note=note)
        )
    return out


SPARSE_EXCLUDED = (DENSE, COMPILED, DISPATCHER)


def dense_wins_from(rows: list[Measurement]) -> int | None:
    """Smallest batch from which dense is at least as fast as every sparse path at every larger batch
    of the sweep; None if dense is slower at the largest batch."""
    wins: dict[int, bool] = {}
    for batch in sorted({r.batch for r in rows if r.batch is not None}):
        at = [r for r in rows if r.batch == batch and r.ok and r.metric == "ms"]
        dense = [r.value for r in at if r.path == DENSE and r.value is not None]
        sparse = [r.value for r in at if r.path not in SPARSE_EXCLUDED and r.value is not None]
        if dense and sparse:
            wins[batch] = dense[0] <= min(sparse)
    first = None
    for batch in sorted(wins, reverse=True):
        if not wins[batch]:
            break
        first = batch
    return first


def bandwidth_and_batch(ctx: BenchContext) -> list[Measurement]:
    """Table 7: the copy bandwidth, each path's achieved bandwidth per batch, and where dense wins."""
    ctx.log(f"  {BANDWIDTH}: copy bandwidth ({ctx.config.copy_mib} MiB)")
    copy_gbps = copy_bandwidth(ctx.device, ctx.config.copy_mib, ctx.timer)
    rows = [
        Measurement(
            table=BANDWIDTH,
            path="copy",
            metric="copy_GB/s",
            value=copy_gbps,
            unit="GB/s",
            note=f"dst.copy_(src) of {ctx.config.copy_mib} MiB float32, read + write counted",
        )
    ]
    sweep: list[Measurement] = []
    for batch in ctx.config.batch_sweep:
        ctx.log(f"  {BATCH_SWEEP}: B={batch}")
        problem = ctx.problem(ctx.spec(), batch)
        measured = compare(
            problem, comparison_paths(problem, triton=ctx.triton), ctx.timer, table=BATCH_SWEEP
        )
        sweep += measured
        rows += _bandwidth_rows(measured, problem, copy_gbps)
    first = dense_wins_from(sweep)
    largest = max(ctx.config.batch_sweep)
    note = (
        f"dense is at least as fast as every sparse path from B={first} to B={largest}"
        if first is not None
        else f"dense did not win up to B={largest}"
    )
    rows.append(
        Measurement(
            table=BATCH_SWEEP,
            path=DENSE,
            metric="dense_wins_from_batch",
            value=None if first is None else float(first),
            unit="tokens",
            width=ctx.config.width,
            d_model=ctx.config.d_model,
            l0=ctx.config.l0,
            note=note,
        )
    )
    return sweep + rows


RUNNERS: dict[str, Callable[[BenchContext], list[Measurement]]] = {
    SUMMARY: summary,
    SPLIT: kernel_vs_pipeline,
    L0_SWEEP: l0_sweep,
    WIDTH_SWEEP: width_sweep,
    SHAPES: real_shapes,
    MEMORY: peak_memory,
    BANDWIDTH: bandwidth_and_batch,  # also writes the batch sweep rows
    FORWARD: sae_forward,
}
