"""``sae-tune selftest``: the first command on a new machine, and the one that publishes a GPU's tables.

It checks every family of the Triton default space against an fp64 reference on the local device (the
interpreter on CPU, a short subset unless --full), runs the edge cases (empty tokens, a token with every
feature fired, chunks and tokens far above any cap), checks every target's encode on the device (and the
Triton encode, in the interpreter on CPU) against the exact non-zeros, runs a quick tune and prints its
summary against the dense product, then one verdict. Timings on CPU or under the interpreter are never
speed.
"""

from __future__ import annotations

import itertools
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from sae_tune.cli.options import DeviceType
from sae_tune.progress import Progress, progress_interval, track

if TYPE_CHECKING:
    import torch

# relative to |acts| @ |W_dec| + |b_dec| (fp32 accumulation, one rounding to the output dtype), by dtype
# name (torch is imported when the selftest runs, not when the command line loads)
TOLERANCE = {"float32": 2e-6, "float16": 1e-3, "bfloat16": 8e-3}


@dataclass(frozen=True)
class Case:
    """One correctness case: a variant on a shape with per-token L0s."""

    variant: object  # sae_tune.targets.triton.variant.Variant (imported lazily)
    dtype: torch.dtype
    F: int
    D: int
    l0s: tuple[int, ...]
    bias: bool

    @property
    def label(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.variant.name} {dtype} F={self.F} D={self.D} L0={list(self.l0s)}"  # type: ignore[attr-defined]


def family_variants() -> list:
    """One variant per family of the default space: chunked (one unit and several), exact, fixed."""
    from sae_tune.targets.triton.variant import Variant

    return [
        Variant(),
        Variant(block_f=256, chunk_slots=4, unit_chunks=2, block_l=8, block_d=64),
        Variant(alloc="exact", block_d=64),
        Variant(alloc="fixed", overflow="fallback", max_l0=16, block_d=64),
        Variant(alloc="fixed", overflow="validate", max_l0=1024, block_l=4, block_d=128),
    ]


def cases(full: bool) -> Iterator[Case]:
    """The short subset (every family x dtype on a shape with empty, light and over-full tokens), or with
    ``full`` also the shape grid."""
    import torch

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    for variant, dtype in itertools.product(family_variants(), dtypes):
        yield Case(variant, dtype, 700, 130, (0, 3, 700, 40, 17), True)
    if full:
        shapes = itertools.product((256, 1024, 16384), (128, 512, 768), (1, 8, 100))
        for variant, dtype, (F, D, l0) in itertools.product(family_variants(), dtypes, shapes):
            yield Case(variant, dtype, F, D, (l0,) * 4 + (min(F, 4 * l0),), l0 % 2 == 0)


def run_case(case: Case, device: torch.device) -> str | None:
    """None when the result matches the fp64 reference within the dtype's tolerance, else why not."""
    import torch

    from sae_tune.inputs import check_decode_inputs
    from sae_tune.targets.triton.launch import run_variant

    gen = torch.Generator().manual_seed(case.F * 31 + case.D)
    acts = torch.zeros(len(case.l0s), case.F, dtype=torch.float64)
    for t, k in enumerate(case.l0s):
        idx = torch.randperm(case.F, generator=gen)[:k]
        acts[t, idx] = (torch.rand(k, generator=gen, dtype=torch.float64) * 2 + 0.1) * torch.where(
            torch.rand(k, generator=gen) < 0.3, -1.0, 1.0
        ).double()
    W = torch.randn(case.F, case.D, generator=gen, dtype=torch.float64) / 8
    b = torch.randn(case.D, generator=gen, dtype=torch.float64) if case.bias else None
    acts_d, W_d = acts.to(device, case.dtype), W.to(device, case.dtype)
    b_d = None if b is None else b.to(device, case.dtype)
    out = run_variant(check_decode_inputs(acts_d, W_d, b_d), case.variant).double().cpu()  # type: ignore[arg-type]
    acts, W = acts_d.double().cpu(), W_d.double().cpu()
    ref, scale = acts @ W, acts.abs() @ W.abs()
    if b_d is not None:
        ref, scale = ref + b_d.double().cpu(), scale + b_d.double().cpu().abs()
    tol = TOLERANCE[str(case.dtype).removeprefix("torch.")] * scale + torch.finfo(case.dtype).tiny
    excess = ((out - ref).abs() - tol).max().item()
    return None if excess <= 0 else f"error exceeds the tolerance by {excess:.3g}"


@dataclass(frozen=True)
class EncodeCase:
    """One encode check: a target's impl and config for a dtype and activation."""

    target: object  # sae_tune.targets.base.Target
    impl: str
    config: dict
    dtype: torch.dtype
    activation: str

    @property
    def label(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"encode {self.target.encode_label(self.impl, self.config)} {dtype} {self.activation}"  # type: ignore[attr-defined]


def encode_inputs(
    dtype: torch.dtype, activation: str, device: torch.device, B: int = 6, F: int = 300, D: int = 32
):
    """An encode problem whose pre-activations are exact in every dtype and every summation order
    (multiples of 1/8 below 32) and never equal a cut (thresholds at odd multiples of 1/16): every correct
    encode gives the same non-zeros and values, bit for bit. Token 1 fires every feature, token 2 none.
    Returns the problem and the exact pre-activations and cut (fp64, on CPU)."""
    import torch

    from sae_tune.targets.base import EncodeProblem

    gen = torch.Generator().manual_seed(7)
    x = torch.randint(-1, 2, (B, D), generator=gen).double()
    W = torch.randint(-2, 3, (D, F), generator=gen).double() / 8
    x[:, 0], W[0] = 0.0, 1.0
    x[1, 0], x[2, 0] = 16.0, -16.0
    b = torch.randint(-4, 5, (F,), generator=gen).double() / 8
    thr = None
    cut = torch.zeros(F, dtype=torch.float64)
    if activation == "jumprelu":
        thr = torch.randint(0, 8, (F,), generator=gen).double() / 8 + 1 / 16
        thr[::7] = -1 / 16  # a negative threshold: the cut is max(threshold, 0)
        cut = thr.clamp_min(0)
    pre = x @ W + b

    def put(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device, dtype)

    return EncodeProblem(put(x), put(W), put(b), put(thr), None), pre, cut  # type: ignore[arg-type]


def encode_cases(device: torch.device) -> list[EncodeCase]:
    """Every target's encode candidates that can run on ``device`` (its default and, for the Triton encode,
    one with slots too few for its pairs), for ReLU and JumpReLU in the three dtypes."""
    import torch

    from sae_tune.targets import TARGETS
    from sae_tune.targets.base import EncodeRequest
    from sae_tune.targets.triton import ENCODE_IMPL
    from sae_tune.targets.triton import encode as triton_encode

    out = []
    for dtype, activation in itertools.product(
        (torch.float32, torch.float16, torch.bfloat16), ("relu", "jumprelu")
    ):
        request = EncodeRequest(6, 300, 32, dtype, device, activation)
        for target in TARGETS:
            if target.available(device) is not None:
                continue
            for impl, config in target.encode_space(request)[:1]:
                if target.encode_gate(impl, config, request) is None:
                    out.append(EncodeCase(target, impl, config, dtype, activation))
        # the Triton encode on CPU runs in the interpreter (never a candidate there: its timings mean nothing)
        variants = triton_encode.encode_space(request, interpreter=True)[:1]
        variants.append(triton_encode.EncodeVariant(block_m=16, block_n=32, block_k=16, slots=2, num_warps=1))
        for target in TARGETS:
            if ENCODE_IMPL in target.encode_impls and target.available(device) is None:
                for v in variants:
                    out.append(EncodeCase(target, ENCODE_IMPL, v.to_dict(), dtype, activation))
    return list({(c.label, c.dtype): c for c in out}.values())


def run_encode_case(case: EncodeCase, device: torch.device) -> str | None:
    """None when the encode's CSR holds exactly the non-zeros and values of the exact pre-activations."""
    import torch

    problem, pre, cut = encode_inputs(case.dtype, case.activation, device)
    offsets, indices, values = case.target.encode(case.impl, case.config, problem)  # type: ignore[attr-defined]
    fired = pre > cut
    want_offsets = torch.zeros(len(pre) + 1, dtype=torch.int64)
    torch.cumsum(fired.sum(1), 0, out=want_offsets[1:])
    rows, cols = fired.nonzero(as_tuple=True)
    if not torch.equal(offsets.cpu(), want_offsets):
        return "different non-zeros per token"
    if not torch.equal(indices.cpu(), cols):
        return "different features fired"
    if not torch.equal(values.double().cpu(), pre[rows, cols]):
        return "values differ from the exact pre-activations"
    return None


def quick_tune(device: torch.device, seconds: float) -> str:
    """A short tune of a small SAE into a throw-away cache; the summary line of its result."""
    from sae_tune.autotune.search import Tuner, quiet_optuna
    from sae_tune.cache.store import Store
    from sae_tune.specs import SAESpec

    quiet_optuna()
    spec = SAESpec(name="selftest", width=2048, d_model=256, l0=32)
    with tempfile.TemporaryDirectory(prefix="sae-tune-selftest-") as folder:
        store = Store(os.path.join(folder, "cache.sqlite"))
        try:
            with Progress(4, "selftest tune B=8", unit="trial") as bar:
                tuner = Tuner(
                    spec, device=device, store=store, seed=0,
                    phase=lambda message: bar.describe(f"selftest tune {message}"),
                    progress=lambda n, best: bar.update(n, best),
                )  # fmt: skip
                result = tuner.tune_batch(8, trials=4, time_budget=seconds)
        finally:
            store.close()
    # the CPU note on a line of its own keeps each line within 120 columns
    cpu_note = "\n      (CPU: a check that tuning runs, not a measurement of speed)"
    note = "" if device.type == "cuda" else cpu_note
    return (
        f"F={spec.width} D={spec.d_model} L0={spec.l0} B=8: winner {result.best.label} "
        f"{result.best_ms:.3f} ms, dense {result.dense_ms:.3f} ms, {result.speedup:.2f}x dense{note}"
    )


def bench_summary(device: torch.device) -> tuple[list[str], list[str]]:
    """The bench's summary table (table 1) on ``device``: its lines, and the paths that were wrong.

    On a GPU it is `sae-tune bench --quick`'s summary; on CPU a smaller shape, to stay short (and the
    Triton modes are left out there: interpreter timings are not speed)."""
    from dataclasses import replace

    from sae_tune.bench.config import QUICK
    from sae_tune.bench.measure import ERROR, OK, WRONG
    from sae_tune.bench.paths import COMPILED
    from sae_tune.bench.report import fmt_ms, fmt_x
    from sae_tune.bench.runner import run_bench

    config = QUICK
    if device.type == "cpu":
        config = replace(
            QUICK, width=16384, d_model=256, rounds=3, budget_s=1.0, copy_mib=64, flush_mib=0,
            compile_dense=False, name="selftest",
        )  # fmt: skip
    result = run_bench(config, device, tables=("summary",), progress=True)
    lines, wrong = [], []
    for r in result.measurements:
        if r.metric != "ms":
            continue
        reason = None
        if r.status != OK:
            reason = r.note.strip().splitlines()[0] if r.note.strip() else "no reason recorded"
            if r.path == COMPILED and not config.compile_dense:
                reason = "left out of the CPU selftest to keep it short; `sae-tune bench` times it"
        lines += bench_lines(r.path, fmt_ms(r.value), fmt_x(r.vs_dense), r.status, reason)
        if r.status in (WRONG, ERROR):
            wrong.append(f"bench {r.path}: {r.status}" + (f": {reason}" if reason else ""))
    return lines, wrong


def bench_lines(
    path: str, ms: str, vs_dense: str, status: str, reason: str | None, width: int = 120
) -> list[str]:
    """One row of the selftest's bench summary; a row that is not ok says why on a line of its own (its
    end elided to keep it within ``width`` columns)."""
    lines = [f"  {path:40s} {ms:>9s} ms  {vs_dense:>8s} vs dense  {status}"]
    if reason:
        why = f"    {status}: {reason}"
        lines.append(why if len(why) <= width else why[: width - 3] + "...")
    return lines


def _interpreter_for_cpu(device: torch.device) -> str | None:
    """Kernels on CPU tensors run in Triton's interpreter, which must be chosen before triton is imported."""
    if device.type != "cpu" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return None
    if "triton" in sys.modules:
        return "Triton was imported before the interpreter could be chosen; run with TRITON_INTERPRET=1"
    os.environ["TRITON_INTERPRET"] = "1"
    return None


@click.command("selftest")
@click.option("--device", type=DeviceType(), default=None, help="Default: cuda when present, else cpu.")
@click.option("--full", is_flag=True, help="The whole shape grid, not the short subset.")
@click.option("--no-tune", is_flag=True, help="Skip the quick tune and the bench summary.")
@click.option("--tune-seconds", type=click.FloatRange(0.1), default=5.0, show_default=True)
def selftest_command(device: str | None, full: bool, no_tune: bool, tune_seconds: float) -> None:
    """Check the kernels on this device, run a quick tune, print one verdict (exit 1 on a failure)."""
    import torch

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    problem = _interpreter_for_cpu(dev)
    if problem is not None:
        raise click.ClickException(problem)
    from sae_tune.targets.triton.support import triton_unavailable_reason

    progress_interval()  # a bad SAE_TUNE_PROGRESS_INTERVAL is refused before any work
    reason = triton_unavailable_reason(dev)
    if reason is not None:
        raise click.ClickException(f"the Triton kernels cannot run on {dev}: {reason}")
    mode = "GPU" if dev.type == "cuda" else "Triton's interpreter (correctness only)"
    click.echo(f"selftest on {dev}: {mode}")
    started = time.perf_counter()
    failures: list[str] = []
    todo = list(cases(full))
    for case in track(todo, "selftest correctness", unit="case"):
        try:
            why = run_case(case, dev)
        except Exception as exc:  # a crash of one case is a failure of the selftest, not of the command
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if why is not None:
            failures.append(f"{case.label}: {why}")
            click.echo(f"  FAILED {case.label}: {why}")
    passed = len(todo) - len(failures)
    click.echo(f"correctness: {passed} of {len(todo)} cases ({time.perf_counter() - started:.1f} s)")
    started, encodes, bad = time.perf_counter(), encode_cases(dev), 0
    for case in track(encodes, "selftest encode", unit="case"):
        try:
            why = run_encode_case(case, dev)
        except Exception as exc:
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if why is not None:
            bad += 1
            failures.append(f"{case.label}: {why}")
            click.echo(f"  FAILED {case.label}: {why}")
    targets = ", ".join(sorted({c.target.name for c in encodes}))  # type: ignore[attr-defined]
    took = time.perf_counter() - started
    click.echo(f"encode: {len(encodes) - bad} of {len(encodes)} cases ({targets}; {took:.1f} s)")
    if not no_tune:
        try:
            click.echo("tune: " + quick_tune(dev, tune_seconds))
        except Exception as exc:
            failures.append(f"quick tune: {type(exc).__name__}: {exc}")
            click.echo(f"  FAILED quick tune: {type(exc).__name__}: {exc}")
    if not no_tune:
        try:
            lines, wrong = bench_summary(dev)
            click.echo("bench summary (table 1 of `sae-tune bench`):")
            click.echo("\n".join(lines))
            failures += wrong
        except Exception as exc:
            failures.append(f"bench summary: {type(exc).__name__}: {exc}")
            click.echo(f"  FAILED bench summary: {type(exc).__name__}: {exc}")
    if failures:
        click.echo(f"verdict: FAIL ({len(failures)} problem(s))")
        sys.exit(1)
    click.echo("verdict: PASS")
