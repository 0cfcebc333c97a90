"""Seeded fuzz of ``sparse_decode`` against fp64: from dense activations through the dispatcher, every
target's default and a sample of variants; from ``SparseActs``; and hostile edits of ``SparseActs`` in a
child process with a timeout, so that a crash or a hang fails the test.

A few hundred cases in the default tier, thousands under ``-m slow``. Every failure names its seed;
``SAE_TUNE_FUZZ_SEED=<n>`` moves the whole run to other seeds.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable

import pytest
import torch
from conftest import TOLERANCE
from test_hardening_sparse_acts import run_child

import sae_tune
from sae_tune import SparseActs
from sae_tune.targets import TARGETS
from sae_tune.targets.base import CallFacts, Gated
from sae_tune.targets.cpu.variant import search_space as cpu_space
from sae_tune.targets.triton.variant import Variant

CPU = torch.device("cpu")
BASE_SEED = int(os.environ.get("SAE_TUNE_FUZZ_SEED", "20261203"))
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def close(out: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> str | None:
    """None when ``out`` is within the dtype's tolerance of the fp64 ``ref``, else what differs."""
    if out.shape != ref.shape:
        return f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    tol = TOLERANCE[dtype] * scale + torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    err = (out.double() - ref).abs()
    if err.numel() and not bool((err <= tol).all()):
        worst = int((err - tol).argmax())
        return f"error {err.flatten()[worst]:.3g} over a tolerance of {tol.flatten()[worst]:.3g}"
    return None


# --- dense activations: the dispatcher, every target's default, a sample of variants ---------------------


def dense_case(seed: int, wide: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Random (..., F) activations (per-token L0 from none to all, signs, magnitudes, views), W_dec, b_dec."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = rng.choice(DTYPES)
    F = rng.choice([1, 7, 64, 129, 300, 517]) if wide else rng.choice([1, 40, 300])
    D = rng.randint(1, 300) if wide else rng.randint(33, 64)  # default tier: one C tile width per dtype
    lead = rng.choice([(), (0,), (1,), (5,), (2, 3), (3, 0, 2), (rng.randint(1, 40),)])
    B = math.prod(lead)
    acts = torch.zeros(B, F, dtype=torch.float64)
    for t in range(B):
        k = min(F, rng.choice([0, 1, 2, rng.randint(0, F), F, 72]))
        idx = torch.randperm(F, generator=gen)[:k]
        mag = 10.0 ** rng.uniform(-3, 1 if dtype is torch.float16 else 3)
        acts[t, idx] = (torch.rand(k, generator=gen, dtype=torch.float64) * 2 - 1) * mag
    W = torch.randn(F, D, generator=gen, dtype=torch.float64) / 8
    # default tier: without a bias only in fp32 (each C kernel is compiled per dtype and bias)
    no_bias = rng.random() < 0.3 and (wide or dtype is torch.float32)
    b = None if no_bias else torch.randn(D, generator=gen, dtype=torch.float64)
    acts, W = acts.to(dtype), W.to(dtype)
    if rng.random() < 0.25:  # a transposed view of the activations
        acts = acts.t().contiguous().t()
    if rng.random() < 0.2 and D > 1:  # a column slice of a wider W_dec
        W = torch.cat([W, W], 1)[:, ::2]
    return acts.reshape(*lead, F), W, None if b is None else b.to(dtype)


def reference(
    acts: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    ref, scale = acts.double() @ W.double(), acts.double().abs() @ W.double().abs()
    if b is not None:
        ref, scale = ref + b.double(), scale + b.double().abs()
    return ref, scale


def paths(
    F: int, D: int, dtype: torch.dtype, rng: random.Random, n_cpu: int, n_triton: int
) -> list[tuple[str, dict]]:
    """Every target's default (the library's baselines) and variants sampled from the C and Triton spaces."""
    out: list[tuple[str, dict]] = []
    for target in TARGETS:
        default = target.default(F, D, dtype)
        out += [default] if default else [(impl, {}) for impl in target.baselines(dtype, CPU)]
    cpu = cpu_space(F, D, dtype)
    out += [("cpu", v.to_dict()) for v in rng.sample(cpu, min(n_cpu, len(cpu)))]
    triton = Variant.search_space(F, D, dtype, allow_unchecked=True)  # empty for a narrow D
    return out + [("triton", v.to_dict()) for v in rng.sample(triton, min(n_triton, len(triton)))]


def run_dense_fuzz(n_cases: int, first: int, wide: bool, triton_every: int, sample_every: int) -> None:
    """Each case through the dispatcher, the library paths and the C default; one case in
    ``triton_every`` also through the Triton default (the interpreter is slow), one in ``sample_every``
    through a C and a Triton variant sampled from their spaces (each C variant costs a compile)."""
    failures = []
    for i in range(n_cases):
        seed = BASE_SEED + first + i
        rng = random.Random(seed)
        acts, W, b = dense_case(seed, wide)
        F, D, dtype = W.shape[0], W.shape[1], W.dtype
        ref, scale = reference(acts.reshape(-1, F), W, b)
        runs: list[tuple[str, Callable[..., torch.Tensor]]] = [("dispatch", sae_tune.sparse_decode)]
        triton, sample = i % triton_every == 0, int(i % sample_every == 0)
        for impl, config in paths(F, D, dtype, rng, sample, sample):
            if impl == "triton" and not triton:
                continue
            target = next(t for t in TARGETS if t.owns(impl))
            gated = target.gate(impl, config, CallFacts(CPU, dtype))
            if isinstance(gated, str):
                if target.name == "library":
                    continue  # a torch path that does not take this dtype on CPU
                failures.append(f"seed={seed} {impl} {config}: refused ({gated})")
                continue
            assert isinstance(gated, Gated)
            fn = target.build(gated.impl, gated.config)
            runs.append((target.label(gated.impl, gated.config), fn))
        for label, run in runs:
            try:
                with torch.no_grad():
                    out = run(acts, W, b)
                why = close(out.reshape(-1, D), ref, scale, dtype) if out.dtype == dtype else str(out.dtype)
            except Exception as exc:  # any exception is a failure of a drop-in
                why = f"{type(exc).__name__}: {exc}"
            if why is not None:
                failures.append(
                    f"seed={seed} F={F} D={D} {dtype} lead={tuple(acts.shape[:-1])} {label}: {why}"
                )
    assert not failures, "\n".join(failures[:30]) + f"\n({len(failures)} failures)"


@pytest.fixture
def fixed_rates(isolated_dispatch, monkeypatch):
    """The cost model with fixed rates: the dispatcher's choices are its own, without seconds of measuring."""
    from sae_tune.dispatch import costmodel

    rates = costmodel.Rates(bandwidth=20e9, op_overhead=5e-6, scan=2e9, flops=100e9)
    monkeypatch.setattr(costmodel, "measure_rates", lambda device, dtype=torch.float32: rates)


def test_dense_fuzz_every_target_default_and_sampled_variants(fixed_rates):
    run_dense_fuzz(40, 0, wide=False, triton_every=8, sample_every=20)


@pytest.mark.slow
def test_dense_fuzz_wide(fixed_rates):
    run_dense_fuzz(600, 10_000, wide=True, triton_every=3, sample_every=4)


# --- SparseActs: valid CSRs of every layout decode to the fp64 result ------------------------------------


def csr_case(
    seed: int,
) -> tuple[SparseActs, torch.Tensor, torch.Tensor | None, list[list[tuple[int, float]]]]:
    """A random valid SparseActs (empty rows, repeated features, int32 or int64 indices, strided views),
    W_dec, b_dec, and its rows as Python lists."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    dtype = rng.choice((*DTYPES, torch.float64))
    F, D = rng.choice([1, 5, 64, 300]), rng.randint(1, 48)
    lead = rng.choice([(0,), (1,), (4,), (2, 3), (rng.randint(1, 30),)])
    rows = []
    for _ in range(math.prod(lead)):
        k = rng.choice([0, 1, rng.randint(0, 20), 72])
        rows.append([(rng.randrange(F), rng.uniform(-2, 2)) for _ in range(k)])  # repeats allowed
    offsets = [0]
    for row in rows:
        offsets.append(offsets[-1] + len(row))
    index_dtype = rng.choice((torch.int64, torch.int32))
    idx = torch.tensor([f for row in rows for f, _ in row], dtype=index_dtype)
    val = torch.tensor([v for row in rows for _, v in row], dtype=torch.float64).to(dtype)
    off = torch.tensor(offsets, dtype=torch.int64)
    if rng.random() < 0.3:  # strided views into larger storages, at an offset
        idx = torch.stack([idx, idx]).t().reshape(-1)[1::2] if idx.numel() else idx
        val = torch.cat([val.new_zeros(3), val.repeat_interleave(2)])[3::2]
        off = torch.cat([off.new_zeros(2), off])[2:]
    k = max((len(r) for r in rows), default=0) + rng.choice([0, 5]) if rng.random() < 0.3 else None
    sa = SparseActs(off, idx, val, F, lead_shape=lead, max_per_row=k)
    exact = [
        [(f, float(v)) for f, v in zip(idx[a:b].tolist(), val[a:b].double().tolist(), strict=True)]
        for a, b in zip(offsets, offsets[1:], strict=False)
    ]
    W = (torch.randn(F, D, generator=gen, dtype=torch.float64) / 8).to(dtype)
    b = torch.randn(D, generator=gen, dtype=torch.float64).to(dtype) if rng.random() < 0.6 else None
    return sa, W, b, exact


def csr_reference(rows, W: torch.Tensor, b: torch.Tensor | None, F: int):
    """fp64 result and scale from the rows as Python lists (repeats summed); the fp64 dense acts, their
    absolute sums and the number of values summed into each."""
    sums = [[[0.0, 0.0, 0] for _ in range(F)] for _ in rows]
    for t, row in enumerate(rows):
        for f, v in row:
            cell = sums[t][f]
            cell[0], cell[1], cell[2] = cell[0] + v, cell[1] + abs(v), cell[2] + 1
    both = torch.tensor(sums, dtype=torch.float64).reshape(len(rows), F, 3)
    dense, absd, repeats = both.unbind(-1)
    Wd = W.double()
    ref, scale = dense @ Wd, absd @ Wd.abs()
    if b is not None:
        ref, scale = ref + b.double(), scale + b.double().abs()
    return ref, scale, dense, absd, repeats


def test_sparse_acts_fuzz_decodes_every_layout_to_fp64():
    failures = []
    for i in range(150):
        seed = BASE_SEED + 50_000 + i
        sa, W, b, rows = csr_case(seed)
        ref, scale, dense, absd, repeats = csr_reference(rows, W, b, sa.num_features)
        try:
            out = sae_tune.sparse_decode(sa, W, b)
            why = close(out.reshape(-1, W.shape[1]), ref, scale, W.dtype)
            got = sa.to_dense().reshape(-1, sa.num_features).double()
            # repeats are summed in the values' dtype, one rounding per repeat
            if why is None and bool(((got - dense).abs() > torch.finfo(W.dtype).eps * repeats * absd).any()):
                why = "to_dense differs"
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
        if why is not None:
            failures.append(f"seed={seed} {sa!r}: {why}")
    assert not failures, "\n".join(failures[:30]) + f"\n({len(failures)} failures)"


# --- hostile edits of SparseActs, in a child process --------------------------------------------------------

HOSTILE_CHILD = r"""
import json, math, random, sys, torch
import sae_tune
from sae_tune import SparseActs

first, count = int(sys.argv[1]), int(sys.argv[2])
LIMITS = {torch.int64: (-2**63, 2**63 - 1), torch.int32: (-2**31, 2**31 - 1)}

def freed(t):
    # a read or write of a tensor whose storage was freed crashes torch itself: not an edit to fuzz
    need = (t.storage_offset() + (t.numel() - 1) * t.stride(0) + 1) * t.element_size()
    return t.dim() != 1 or need > t.untyped_storage().nbytes()

def edit(sa, rng):
    # one hostile edit of sa's tensors or fields, as a caller could make it after construction
    n, F = sa.indices.numel(), sa.num_features
    kind = rng.choice(["set", "set", "set", "data", "numpy", "resize", "set_", "free", "field", "dtype"])
    name = rng.choice(["offsets", "indices", "values"])
    t = object.__getattribute__(sa, name)
    values = [-2**63, -10**12, -1, 0, 1, n - 1, n, n + 1, F - 1, F, F + 1, 10**9, 10**12, 2**63 - 1,
              rng.randint(-5, n + 5)]
    if kind in ("set", "data", "numpy") and t.numel() and not freed(t):
        pos = rng.randrange(t.numel())
        if t.is_floating_point():
            v = rng.uniform(-3, 3)  # any value is valid: the contents of values decide nothing
        else:
            lo, hi = LIMITS.get(t.dtype, (-2**63, 2**63 - 1))
            v = min(max(rng.choice(values), lo), hi)
        if kind == "set":
            t[pos] = v
        elif kind == "data":
            t.data[pos] = v
        elif t.dtype != torch.bfloat16:
            t.numpy()[pos] = v
    elif kind == "resize":
        t.resize_(rng.choice([0, 1, max(t.numel() - 1, 0), t.numel() + 1, 2 * t.numel() + 3, 4096]))
    elif kind == "set_":
        t.set_(torch.zeros(rng.randint(0, 8), dtype=t.dtype))
    elif kind == "free":
        t.untyped_storage().resize_(0)
    elif kind == "field":
        field = rng.choice(["num_features", "lead_shape", "max_per_row"])
        new = {"num_features": [0, max(F - 1, 0), F + 3, -1, 2.0],
               "lead_shape": [(sa.n_tokens + 1,), (0,), [sa.n_tokens]],
               "max_per_row": [0, 1, None, -1]}[field]
        object.__setattr__(sa, field, rng.choice(new))
    elif not freed(t):
        t.data = t.data.to(rng.choice([torch.int32, torch.int16, torch.float32, torch.float64]))

def oracle(sa):
    # True when sa is a valid CSR, decided from its fields without sae-tune's checks
    ts = [object.__getattribute__(sa, n) for n in ("offsets", "indices", "values")]
    if not all(isinstance(t, torch.Tensor) and t.layout == torch.strided and t.dim() == 1 for t in ts):
        return False
    off, idx, val = ts
    if off.dtype != torch.int64 or idx.dtype not in (torch.int64, torch.int32):
        return False
    if val.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return False
    for t in ts:
        need = (t.storage_offset() + (t.numel() - 1) * t.stride(0) + 1) * t.element_size() if t.numel() else 0
        if need > t.untyped_storage().nbytes():
            return False
    F, lead, k = sa.num_features, sa.lead_shape, sa.max_per_row
    if type(F) is not int or F < 0 or not isinstance(lead, tuple) or off.numel() < 1:
        return False
    if any(type(x) is not int or x < 0 for x in lead) or math.prod(lead) != off.numel() - 1:
        return False
    if k is not None and (type(k) is not int or k < 0):
        return False
    o, ix = off.tolist(), idx.tolist()
    if len(ix) != val.numel() or o[0] != 0 or o[-1] != len(ix):
        return False
    if any(b < a for a, b in zip(o, o[1:])) or any(not 0 <= f < F for f in ix):
        return False
    return k is None or all(b - a <= k for a, b in zip(o, o[1:]))

def expected(sa, D):
    off, idx, val = sa.offsets.tolist(), sa.indices.tolist(), sa.values.double().tolist()
    B, F = len(off) - 1, sa.num_features
    dense, absd = [[0.0] * F for _ in range(B)], [[0.0] * F for _ in range(B)]
    for t in range(B):
        for j in range(off[t], off[t + 1]):
            dense[t][idx[j]] += val[j]
            absd[t][idx[j]] += abs(val[j])
    as_tensor = lambda x: torch.tensor(x, dtype=torch.float64).reshape(B, F)
    return as_tensor(dense), as_tensor(absd)

TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
asserted = []

def run_reader(sa, reader, W, b, no_sync):
    if no_sync:
        SparseActs._host_checked = frozenset()
        real, torch._assert_async = torch._assert_async, lambda ok, msg="": asserted.append(bool(ok))
    try:
        if reader == "decode":
            return sae_tune.sparse_decode(sa, W, b)
        if reader == "to_dense":
            return sa.to_dense()
        if reader == "rows":
            return sa.rows()
        return sa.row_counts()
    finally:
        if no_sync:
            SparseActs._host_checked = frozenset({"cpu", "meta"})
            torch._assert_async = real

for seed in range(first, first + count):
    print("START", seed, flush=True)
    rng = random.Random(seed)
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.float64])
    F, D, B = rng.randint(1, 12), rng.randint(1, 5), rng.randint(0, 6)
    rows = [[rng.randrange(F) for _ in range(rng.randint(0, 4))] for _ in range(B)]
    off = [0]
    for r in rows:
        off.append(off[-1] + len(r))
    idx = torch.tensor([f for r in rows for f in r], dtype=rng.choice([torch.int64, torch.int32]))
    val = (torch.rand(len(idx), dtype=torch.float64) * 4 - 2).to(dtype)
    k = max(map(len, rows), default=0) if rng.random() < 0.3 else None
    sa = SparseActs(torch.tensor(off), idx, val, F, max_per_row=k)
    for _ in range(rng.randint(1, 3)):
        try:
            edit(sa, rng)
        except (RuntimeError, TypeError, ValueError, OverflowError):
            pass  # torch refused the edit itself (a storage it cannot resize, a value out of range)
    valid = oracle(sa)
    Fw = sa.num_features if type(sa.num_features) is int and sa.num_features >= 0 else F
    vals = object.__getattribute__(sa, "values")
    if isinstance(vals, torch.Tensor) and vals.is_floating_point():
        dtype = vals.dtype  # W_dec follows an edit of the values' dtype
    W = (torch.randn(Fw, D, dtype=torch.float64) / 4).to(dtype)
    b = torch.randn(D, dtype=torch.float64).to(dtype) if rng.random() < 0.5 else None
    if valid:
        dense, absd = expected(sa, D)
    problems = []
    for no_sync in (False, True):
        for reader in ("decode", "to_dense", "rows", "row_counts"):
            asserted.clear()
            try:
                out = run_reader(sa, reader, W, b, no_sync)
            except (TypeError, ValueError) as exc:
                if valid or "SparseActs" not in str(exc):
                    problems.append(f"{reader} no_sync={no_sync}: {type(exc).__name__}: {exc}")
                continue
            except Exception as exc:
                problems.append(f"{reader} no_sync={no_sync}: {type(exc).__name__}: {exc}")
                continue
            if not valid:
                # without a host sync: NaN (floating results) and the asynchronous assert, never an answer
                flagged = no_sync and asserted == [False]
                if not flagged or (out.is_floating_point() and not bool(out.isnan().all())):
                    problems.append(f"{reader} no_sync={no_sync}: answered an invalid CSR")
                continue
            if no_sync and asserted != [True]:
                problems.append(f"{reader} no_sync={no_sync}: asserted {asserted} on a valid CSR")
            if reader == "decode":
                ref, scale = dense @ W.double(), absd @ W.double().abs()
                if b is not None:
                    ref, scale = ref + b.double(), scale + b.double().abs()
                err = (out.reshape(-1, D).double() - ref).abs()
                tol = TOL[dtype] * scale + torch.finfo(dtype).tiny
                good = out.shape == (*sa.lead_shape, D) and bool((err <= tol).all())
            elif reader == "to_dense":
                err = (out.reshape(dense.shape).double() - dense).abs()
                good = out.shape == sa.shape and bool((err <= TOL[dtype] * 4 * absd).all())
            else:
                o = sa.offsets.tolist()
                counts = [o[t + 1] - o[t] for t in range(len(o) - 1)]
                want = [t for t, c in enumerate(counts) for _ in range(c)] if reader == "rows" else counts
                good = out.tolist() == want
            if not good:
                problems.append(f"{reader} no_sync={no_sync}: wrong result")
    print(json.dumps(dict(seed=seed, valid=valid, problems=problems)), flush=True)
print("DONE", flush=True)
"""


def run_hostile_fuzz(first: int, count: int, timeout: float) -> None:
    lines = run_child(HOSTILE_CHILD, [str(first), str(count)], timeout=timeout)
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert len(rows) == count
    failures = [f"seed={r['seed']}: {'; '.join(r['problems'])}" for r in rows if r["problems"]]
    n_valid = sum(r["valid"] for r in rows)
    assert 0 < n_valid < count  # the edits hit both valid and invalid CSRs
    assert not failures, "\n".join(failures[:30]) + f"\n({len(failures)} failures)"


def test_hostile_sparse_acts_fuzz_in_a_child_process():
    run_hostile_fuzz(BASE_SEED, 300, timeout=300)


@pytest.mark.slow
def test_hostile_sparse_acts_fuzz_wide():
    run_hostile_fuzz(BASE_SEED + 1_000_000, 5000, timeout=1800)
