"""Tuning ``sparse_encode``: time every encode candidate of every target for one shape and batch size.

The candidates are few (the targets' ``encode_space``: a handful of chunk sizes, later kernel configs),
so there is no search: each is run once on the workload and its result compared with the library path's
(the first candidate of the first target: what an untuned ``sparse_encode`` runs), then the ones that
agree are timed round-robin (interleaved, so drift of the machine hits all alike) within a time budget,
and the fastest goes to the cache under the encode op ("encode", or "encode_topk" for a TopK SAE).

Agreement: the same offsets and indices, and values equal bit for bit on CPU (every CPU impl computes the
pre-activations with torch's GEMM, as the library path does); within the dtype's tolerance elsewhere.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from sae_tune.autotune.timing import Timing, time_cuda
from sae_tune.autotune.verify import TOLERANCE
from sae_tune.cache.store import CacheKey, Store, format_ms, is_noisy
from sae_tune.targets import TARGETS, Target, templates_hash
from sae_tune.targets.base import EncodeProblem, EncodeRequest, EncodeResult

# Seconds a batch size's race may take, checked runs included: further rounds start only within it, up to
# MAX_ROUNDS samples each. On CPU each candidate's checked run is its first sample (so a slow shape is
# timed once per candidate: the job's extra time stays near one encode per candidate); on CUDA every
# sample is a do_bench median and there are at least CUDA_MIN_ROUNDS.
BUDGET_S = {"cpu": 1.0, "cuda": 2.0}
CUDA_MIN_ROUNDS = 2
MAX_ROUNDS = 7
# On CPU, candidates whose checked run took more than this times the fastest one's are not raced further.
PRUNE = 1.3
# Tokens of the warm-up run each candidate gets before its checked run (loads code, compiles kernels).
WARMUP_TOKENS = 8
STUDY = "encode"


@dataclass(frozen=True, eq=False)
class EncodeCandidate:
    """One (target, impl, config) of the race; equal and hashed by what runs."""

    target: Target
    impl: str
    config: dict[str, Any]

    @property
    def what(self) -> tuple[str, str, str]:
        return self.target.name, self.impl, json.dumps(self.config, sort_keys=True)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EncodeCandidate) and self.what == other.what

    def __hash__(self) -> int:
        return hash(self.what)

    @property
    def label(self) -> str:
        return f"{self.target.name}:{self.target.encode_label(self.impl, self.config)}"

    def run(self, problem: EncodeProblem) -> EncodeResult:
        return self.target.encode(self.impl, self.config, problem)


@dataclass(frozen=True)
class EncodeTuneResult:
    """What one batch size's encode race found (``default_ms``: the untuned default's time)."""

    batch_size: int
    key: CacheKey
    best: EncodeCandidate
    best_ms: float
    default_ms: float | None
    times: dict[str, float]
    failed: dict[str, str]
    seconds: float
    best_spread: float | None = None
    default_spread: float | None = None

    @property
    def noisy(self) -> bool:
        """The winner's or the default's timing was noisy: the times and their ratio are not speeds."""
        return is_noisy(self.best_spread) or is_noisy(self.default_spread)

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "op": self.key.op,
            "winner": self.best.label,
            "impl": self.best.impl,
            "config": self.best.config,
            "ms": round(self.best_ms, 4),
            "default_ms": None if self.default_ms is None else round(self.default_ms, 4),
            "candidates": len(self.times) + len(self.failed),
            "failed": len(self.failed),
            "seconds": round(self.seconds, 2),
            "noisy": self.noisy,
        }


def activation_of(arch: str, k: int | None) -> str:
    """The encode activation a spec's architecture implies: "topk" when it has k, "jumprelu" for JumpReLU
    specs, "relu" otherwise."""
    if k is not None:
        return "topk"
    return "jumprelu" if arch == "jumprelu" else "relu"


def candidates(request: EncodeRequest) -> list[EncodeCandidate]:
    """Every target's encode candidates that can run and be timed here; the reference (the first
    target's default, what an untuned call runs) first."""
    out: list[EncodeCandidate] = []
    for target in TARGETS:
        if not target.encode_impls or not target.timed(request.device):
            continue
        for impl, config in target.encode_space(request):
            if target.encode_gate(impl, config, request) is None:
                cand = EncodeCandidate(target, impl, target.encode_parse(impl, config))
                if cand not in out:
                    out.append(cand)
    return out


def random_w_enc(F: int, D: int, *, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """Seeded W_enc (D, F) with columns of norm ~1 (the tuning job reuses its decoder's W_dec instead)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(D, F, generator=gen).div_(math.sqrt(D)).to(device=device, dtype=dtype)


def workload(request: EncodeRequest, W_enc: torch.Tensor, l0: float, seed: int) -> EncodeProblem:
    """Seeded inputs whose activations fire about ``l0`` features per token (k for TopK): x ~ N(0, 1) and
    W_enc columns of norm ~1 make pre-activations ~N(b, 1); the threshold (JumpReLU) or the bias (ReLU)
    sets the firing rate. Timings depend on the shape and the density, not on the values."""
    F, D = request.F, request.D
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(request.n_tokens, D, generator=gen)
    rate = min(max(l0 / F, 1e-6), 0.5)
    cut = float(torch.special.ndtri(torch.tensor(1.0 - rate, dtype=torch.float64)))
    b = torch.randn(F, generator=gen).mul_(0.05)
    thr = None
    if request.activation == "jumprelu":
        thr = torch.full((F,), cut)
    elif request.activation == "relu":
        b.sub_(cut)

    def put(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=request.device, dtype=request.dtype)

    return EncodeProblem(put(x), W_enc, put(b), put(thr), request.k)  # type: ignore[arg-type]


def disagreement(got: EncodeResult, ref: EncodeResult, problem: EncodeProblem, exact: bool) -> str | None:
    """None when ``got`` has the reference's non-zeros (values bit for bit if ``exact``, else within the
    dtype's tolerance of |x| |W_enc| + |b_enc|), else what differs."""
    if not (isinstance(got, tuple) and len(got) == 3 and all(isinstance(t, torch.Tensor) for t in got)):
        return f"returned {type(got).__name__}, not (offsets, indices, values)"
    offsets, indices, values = got
    r_off, r_idx, r_val = ref
    if offsets.dtype != torch.int64 or indices.dtype != torch.int64 or values.dtype != r_val.dtype:
        got_dtypes = f"{offsets.dtype}, {indices.dtype}, {values.dtype}"
        return f"dtypes {got_dtypes} (expected torch.int64, torch.int64, {r_val.dtype})"
    if offsets.shape != r_off.shape or not torch.equal(offsets, r_off):
        return "different non-zeros per token (offsets differ)"
    if indices.shape != r_idx.shape or not torch.equal(indices, r_idx):
        return "different features fired (indices differ)"
    if values.shape != r_val.shape:
        return f"values of shape {tuple(values.shape)}, expected {tuple(r_val.shape)}"
    if exact:
        if bool(((values == r_val) | (values.isnan() & r_val.isnan())).all()):
            return None
        return "values differ from the library encode's (bit for bit expected)"
    rows = torch.repeat_interleave(
        torch.arange(len(r_off) - 1, device=r_off.device), r_off.diff(), output_size=len(r_idx)
    )
    x_norm = problem.x.double().norm(dim=1)
    w_norm = problem.W_enc.double().norm(dim=0)
    scale = x_norm[rows] * w_norm[r_idx]
    if problem.b_enc is not None:
        scale = scale + problem.b_enc.double().abs()[r_idx]
    err = (values.double() - r_val.double()).abs()
    bad = (err > TOLERANCE[r_val.dtype] * scale) & ~(values.isnan() & r_val.isnan())
    if bool(bad.any()):
        return f"values differ from the library encode's by up to {float(err.max()):.3g}"
    return None


def _timed(fn: Callable[[], object], cuda: bool) -> float:
    if cuda:
        return time_cuda(fn, warmup=5, rep=25).ms
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def race(
    request: EncodeRequest,
    problem: EncodeProblem,
    *,
    budget_s: float | None = None,
    progress: Callable[[list[EncodeCandidate]], Iterable[EncodeCandidate]] = iter,
) -> tuple[dict[EncodeCandidate, Timing], dict[EncodeCandidate, str], list[EncodeCandidate]]:
    """Check every candidate against the reference, then time those that agree, interleaved; returns
    (timings, failures, finalists: the candidates raced to the end, among which the fastest wins).
    ``progress`` wraps the candidates checked (a first run of a generated encode may compile it: minutes
    on a GPU), such as ``sae_tune.progress.track``; the timed rounds after it stop within the budget."""
    started = time.perf_counter()
    cands = candidates(request)
    cuda = request.device.type == "cuda"
    exact = request.device.type == "cpu"
    budget = BUDGET_S["cuda" if cuda else "cpu"] if budget_s is None else budget_s
    failures: dict[EncodeCandidate, str] = {}
    ok: list[EncodeCandidate] = []
    ref: EncodeResult | None = None
    warm = EncodeProblem(
        problem.x[:WARMUP_TOKENS], problem.W_enc, problem.b_enc, problem.threshold, problem.k
    )
    first: dict[EncodeCandidate, float] = {}
    for cand in progress(cands):
        try:
            cand.run(warm)
            t0 = time.perf_counter()
            got = cand.run(problem)
            if cuda:
                torch.cuda.synchronize(request.device)
            first[cand] = (time.perf_counter() - t0) * 1e3
        except Exception as exc:  # a kernel that fails to build or run is a failed candidate
            failures[cand] = f"{type(exc).__name__}: {exc}"[:2000]
            continue
        if ref is None:
            if cand is not cands[0]:
                failures[cand] = "no reference: the library encode failed"
                continue
            ref = got
        else:
            why = disagreement(got, ref, problem, exact)
            if why is not None:
                failures[cand] = f"wrong result: {why}"
                continue
        ok.append(cand)
        del got
    # On CPU the checked run is the first sample (the warm-up run loaded the code); on CUDA every sample
    # is a do_bench median.
    samples: dict[EncodeCandidate, list[float]] = {c: [] if cuda else [first[c]] for c in ok}
    racing = list(ok)
    if not cuda and ok:
        fastest = min(first[c] for c in ok)
        racing = [c for c in ok if first[c] <= PRUNE * fastest]
    done = 0 if cuda else 1
    least = CUDA_MIN_ROUNDS if cuda else 1
    while racing and done < MAX_ROUNDS and (len(racing) > 1 or done < least):
        if done >= least and time.perf_counter() - started > budget:
            break
        for cand in racing:
            samples[cand].append(_timed(lambda c=cand: c.run(problem), cuda))
        done += 1
    timings = {c: Timing(statistics.median(s), tuple(s)) for c, s in samples.items() if s}
    return timings, failures, racing


def tune_encode(
    store: Store,
    W_enc: torch.Tensor,
    *,
    batch_size: int,
    activation: str,
    k: int | None,
    l0: float,
    info: Any,
    seed: int = 0,
    budget_s: float | None = None,
    forgotten: set[CacheKey] | None = None,
    progress: Callable[[list[EncodeCandidate]], Iterable[EncodeCandidate]] = iter,
) -> EncodeTuneResult:
    """Race the encode candidates for ``W_enc``'s shape, dtype and device at one batch size; record every
    trial, the default's time (as the key's baseline) and the winner. ``info`` is the ``DeviceInfo`` the
    decode tuner keys its records with. With ``forgotten`` (``--retune``), what the key had is forgotten
    first, once per key (batch sizes of one bucket share a key). ``progress`` wraps the candidates checked
    (see ``race``)."""
    started = time.perf_counter()
    (D, F), dtype, device = W_enc.shape, W_enc.dtype, W_enc.device
    request = EncodeRequest(batch_size, F, D, dtype, device, activation, k)
    key = CacheKey.for_encode(
        info, template_hash=templates_hash(), dtype=dtype, F=F, D=D, batch_size=batch_size, k=k
    )
    problem = workload(request, W_enc, float(k) if k is not None else l0, seed)
    timings, failures, finalists = race(request, problem, budget_s=budget_s, progress=progress)
    del problem
    if not timings:
        detail = "; ".join(f"{c.label}: {why}" for c, why in failures.items()) or "no candidates"
        raise RuntimeError(f"no encode candidate ran for F={F} D={D} B={batch_size}: {detail}")
    if forgotten is not None and key not in forgotten:
        forgotten.add(key)
        store.forget_key(key)
    for cand, why in failures.items():
        store.record_trial(key, cand.impl, cand.config, None, ok=False, error=why, study=STUDY)
    for cand, timing in timings.items():
        store.record_trial(key, cand.impl, cand.config, timing.ms, study=STUDY, spread=spread_of(timing))
    best = min(finalists, key=lambda c: timings[c].ms)
    default = next(iter(timings))  # the reference: what an untuned call runs
    default_ms = timings[default].ms
    store.record_baseline(key, default.impl, default_ms, default.config, spread=spread_of(timings[default]))
    best_timing = timings[best]
    store.set_winner_if_faster(key, best.impl, best.config, best_timing.ms, spread=spread_of(best_timing))
    return EncodeTuneResult(
        batch_size,
        key,
        best,
        best_timing.ms,
        default_ms,
        {c.label: t.ms for c, t in timings.items()},
        {c.label: why for c, why in failures.items()},
        time.perf_counter() - started,
        spread_of(best_timing),
        spread_of(timings[default]),
    )


def spread_of(timing: Timing) -> float | None:
    """The relative IQR of a timing's samples; None (unknown) for a single sample."""
    return timing.spread if len(timing.samples) > 1 else None


def describe(result: EncodeTuneResult) -> str:
    """One line for the tuning job's output (a noisy time says so)."""

    def ms(value: float, spread: float | None) -> str:
        return format_ms(value, None) + (" (noisy)" if is_noisy(spread) else "")

    default = None if result.default_ms is None else ms(result.default_ms, result.default_spread)
    vs = "" if default is None else f" (untuned default {default})"
    return (
        f"encode B={result.batch_size}: {result.best.label} {ms(result.best_ms, result.best_spread)}{vs}, "
        f"{len(result.times)} raced, {len(result.failed)} failed, {result.seconds:.1f} s"
    )
