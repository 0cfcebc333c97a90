"""A SparseActs is data from outside: no edit of its tensors after construction makes a reader crash, hang,
read out of bounds or answer wrong; each gets a TypeError / ValueError naming the field.

The edits run in a child process with a timeout (on the code before this check, several of them died with
SIGSEGV or hung), so that a crash or a hang fails the test instead of killing pytest.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from sae_tune import SparseActs
from sae_tune.sparse_acts import _content_stats

# Each case: (name, a pattern its error must match (the field), code that edits ``sa``: 3 tokens, nnz 4, F 8).
HOSTILE = [
    ("offsets_huge_negative", "offsets", "sa.offsets[1] = -10**12"),
    ("offsets_small_negative", "offsets", "sa.offsets[1] = -1"),
    ("offsets_last_below_nnz", "offsets", "sa.offsets[-1] = 3"),
    ("offsets_last_above_nnz", "offsets", "sa.offsets[-1] = 10**6"),
    ("offsets_first_not_zero", "offsets", "sa.offsets[0] = 1"),
    ("offsets_decreasing", "offsets", "sa.offsets[2] = 1"),
    ("offsets_far_past_nnz", "offsets", "sa.offsets[2] = 10**12"),
    ("offsets_int64_max", "offsets", "sa.offsets[1] = 2**63 - 1"),
    ("offsets_wrap_around", "offsets", "sa.offsets[1:3] = torch.tensor([3 * 2**61, -3 * 2**61])"),
    ("offsets_via_data", "offsets", "sa.offsets.data[1] = -1"),
    ("offsets_via_numpy", "offsets", "sa.offsets.numpy()[2] = 99"),
    ("indices_equal_F", "indices", "sa.indices[0] = 8"),
    ("indices_negative", "indices", "sa.indices[1] = -1"),
    ("indices_huge", "indices", "sa.indices[2] = 10**9"),
    ("indices_int64_min", "indices", "sa.indices[3] = -(2**63)"),
    ("indices_int32_max", "indices", "sa = base(torch.int32); sa.indices[0] = 2**31 - 1"),
    ("indices_via_numpy", "indices", "sa.indices.numpy()[0] = 8"),
    ("indices_enlarged", "indices", "sa.indices.resize_(1000)"),
    ("indices_shrunk", "indices", "sa.indices.resize_(2)"),
    ("offsets_enlarged", "offsets", "sa.offsets.resize_(1000)"),
    ("offsets_shrunk", "offsets", "sa.offsets.resize_(1)"),
    ("values_enlarged", "values", "sa.values.resize_(1000)"),
    ("no_rows_but_nnz", "offsets", "object.__setattr__(sa, 'lead_shape', (0,)); sa.offsets.resize_(1)"),
    ("indices_and_values_enlarged", "offsets", "sa.indices.resize_(10**5); sa.values.resize_(10**5)"),
    ("indices_set_", "indices", "sa.indices.set_(torch.arange(6))"),
    ("indices_storage_freed", "indices", "sa.indices.untyped_storage().resize_(0)"),
    ("offsets_storage_freed", "offsets", "sa.offsets.untyped_storage().resize_(0)"),
    ("values_storage_freed", "values", "sa.values.untyped_storage().resize_(0)"),
    ("offsets_dtype_via_data", "offsets", "sa.offsets.data = sa.offsets.data.int()"),
    ("indices_dtype_via_data", "indices", "sa.indices.data = sa.indices.data.short()"),
    ("values_dtype_via_data", "values", "sa.values.data = sa.values.data.long()"),
    ("indices_0_dim", "indices", "sa.indices.data = torch.tensor(1)"),
    ("offsets_2_dim", "offsets", "sa.offsets.data = sa.offsets.data.reshape(2, 2)"),
    ("values_on_meta", "device", "object.__setattr__(sa, 'values', sa.values.to('meta'))"),
    # W_dec no longer matches: the decode says so first
    (
        "num_features_lowered",
        r"indices|W_dec must have shape \(4, D\)",
        "object.__setattr__(sa, 'num_features', 4)",
    ),
    ("num_features_not_int", "num_features", "object.__setattr__(sa, 'num_features', '8')"),
    ("lead_shape_changed", "lead_shape", "object.__setattr__(sa, 'lead_shape', (2,))"),
    ("max_per_row_lowered", "max_per_row", "object.__setattr__(sa, 'max_per_row', 1)"),
    ("offsets_a_list", "offsets", "object.__setattr__(sa, 'offsets', [0, 2, 3, 4])"),
    ("indices_sparse", "indices", "object.__setattr__(sa, 'indices', sa.indices.to_sparse())"),
]

# Runs every case through every reader, for each value dtype; one JSON line per call, a START line before.
CHILD = r"""
import json, sys, torch
import sae_tune
from sae_tune import SparseActs

CASES = json.loads(sys.argv[1])

def base(index_dtype=torch.int64, dtype=None):
    dtype = dtype or DTYPE
    values = torch.tensor([1.5, -2.0, 0.5, 3.0], dtype=dtype)
    idx = torch.tensor([1, 5, 7, 2], dtype=index_dtype)
    return SparseActs(torch.tensor([0, 2, 3, 4]), idx, values, 8, max_per_row=2)

asserted = []
def fake_assert(ok, msg=""):
    asserted.append(bool(ok))

def no_sync(fn):
    # the path other devices take (clamped copies, a device-side flag), run here on CPU
    def run(sa):
        SparseActs._host_checked = frozenset()
        real, torch._assert_async = torch._assert_async, fake_assert
        try:
            return fn(sa)
        finally:
            SparseActs._host_checked = frozenset({"cpu", "meta"})
            torch._assert_async = real
    return run

READERS = {
    "sparse_decode": lambda sa: sae_tune.sparse_decode(sa, W, b),
    "sparse_decode_no_bias": lambda sa: sae_tune.sparse_decode(sa, W),
    "to_dense": lambda sa: sa.to_dense(),
    "rows": lambda sa: sa.rows(),
    "row_counts": lambda sa: sa.row_counts(),
    "validate": lambda sa: sa.validate(),
    "explain": lambda sa: sae_tune.explain(sa, W, b),
    "no_sync_decode": no_sync(lambda sa: sae_tune.sparse_decode(sa, W, b)),
    "no_sync_to_dense": no_sync(lambda sa: sa.to_dense()),
}

for DTYPE in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
    W, b = torch.randn(8, 5, dtype=DTYPE), torch.randn(5, dtype=DTYPE)
    for name, code in CASES:
        for reader, fn in READERS.items():
            print("START", name, DTYPE, reader, flush=True)
            sa = base()
            exec(code)
            asserted.clear()
            row = dict(case=name, dtype=str(DTYPE), reader=reader)
            try:
                out = fn(sa)
                row.update(outcome="result", asserted=list(asserted),
                           all_nan=bool(out.is_floating_point() and out.isnan().all()))
            except Exception as exc:
                row.update(outcome="error", type=type(exc).__name__, message=str(exc)[:300])
            row["repr"] = repr(sa)[:200]
            print(json.dumps(row), flush=True)
print("DONE", flush=True)
"""


def run_child(script: str, args: list[str], timeout: float) -> list[str]:
    """Run ``script`` in a fresh interpreter; a crash, a hang or a non-zero exit fails the test with the
    last call it started."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        started = [line for line in out.splitlines() if line.startswith("START")]
        pytest.fail(f"hung for {timeout} s in {started[-1] if started else 'start-up'}")
    lines = proc.stdout.splitlines()
    if proc.returncode != 0 or not lines or lines[-1] != "DONE":
        started = [line for line in lines if line.startswith("START")]
        pytest.fail(
            f"child exited with {proc.returncode} in {started[-1] if started else 'start-up'}:\n"
            f"{proc.stderr[-2000:]}"
        )
    return lines


def test_hostile_edits_give_a_named_error_never_a_crash_hang_or_wrong_result():
    cases = [(name, code) for name, _, code in HOSTILE]
    lines = run_child(CHILD, [json.dumps(cases)], timeout=240)
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    field = {name: f for name, f, _ in HOSTILE}
    assert len(rows) == len(HOSTILE) * 4 * 9
    bad = []
    for row in rows:
        where = f"{row['case']} {row['dtype']} {row['reader']}"
        if row["outcome"] == "error":
            message = row["message"]
            named = re.search(field[row["case"]], message) and ("SparseActs" in message or "W_dec" in message)
            if row["type"] not in ("TypeError", "ValueError") or not named:
                bad.append(f"{where}: {row['type']}: {row['message']}")
        elif not row["reader"].startswith("no_sync"):
            bad.append(f"{where}: returned a result")
        elif not (row["all_nan"] and row["asserted"] == [False]):
            # no host sync: the contents are only known on the device, so NaN plus the async assert
            bad.append(f"{where}: all NaN {row['all_nan']}, asserted {row['asserted']}")
        if "SparseActs(" not in row["repr"]:
            bad.append(f"{where}: repr gave {row['repr']!r}")
    assert not bad, "\n".join(bad[:40]) + f"\n({len(bad)} in all)"


def base(index_dtype: torch.dtype = torch.int64) -> SparseActs:
    idx = torch.tensor([1, 5, 7, 2], dtype=index_dtype)
    return SparseActs(torch.tensor([0, 2, 3, 4]), idx, torch.tensor([1.5, -2.0, 0.5, 3.0]), 8, max_per_row=2)


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda sa: sa.indices.resize_(9), "indices"),
        (lambda sa: sa.values.resize_(1), "values"),
        (lambda sa: sa.offsets.resize_(7), "offsets"),
        (lambda sa: object.__setattr__(sa, "indices", None), "indices"),
    ],
)
def test_size_properties_check_the_layout(edit, field):
    sa = base()
    edit(sa)
    for read in (lambda: sa.nnz, lambda: sa.n_tokens, lambda: sa.shape, lambda: sa.dtype):
        with pytest.raises((TypeError, ValueError), match=f"SparseActs.*{field}"):
            read()
    assert repr(sa).startswith("SparseActs(<invalid:")


def test_unsynced_csr_is_in_bounds_and_flags_invalid_contents():
    """The no-sync path (other devices) hands the kernels offsets from 0 to nnz, non-decreasing, and indices
    in [0, F) whatever the contents, with a flag that is False exactly when they were invalid."""
    gen = torch.Generator().manual_seed(0)
    hostile = [-(2**63), -(10**12), -1, 0, 1, 3, 4, 5, 8, 10**12, 2**63 - 1]
    for trial in range(200):
        sa = base(torch.int32 if trial % 2 else torch.int64)
        for _ in range(int(torch.randint(1, 4, (), generator=gen))):
            tensor = (sa.offsets, sa.indices)[int(torch.randint(0, 2, (), generator=gen))]
            pos = int(torch.randint(0, tensor.numel(), (), generator=gen))
            value = hostile[int(torch.randint(0, len(hostile), (), generator=gen))]
            info = torch.iinfo(tensor.dtype)
            tensor[pos] = min(max(value, info.min), info.max)
        valid = True
        try:
            sa.validate()
        except ValueError:
            valid = False
        offsets, indices, ok = sa._csr(sync=False)
        assert ok is not None and bool(ok) == valid, (trial, sa.offsets.tolist(), sa.indices.tolist())
        assert offsets[0] == 0 and offsets[-1] == 4 and bool((offsets.diff() >= 0).all())
        assert indices.dtype == torch.int64 and 0 <= int(indices.min()) and int(indices.max()) < 8
        if valid:
            assert torch.equal(offsets, sa.offsets) and torch.equal(indices, sa.indices.long())


def test_host_check_gives_the_same_facts_through_numpy_and_torch():
    """On CPU the contents are read through numpy (single-threaded); other devices use torch's reductions.
    Both must report the same facts for any contents, hostile int64 extremes included."""
    gen = torch.Generator().manual_seed(1)
    extremes = torch.tensor([-(2**63), -1, 0, 1, 2**62, 2**63 - 1])
    for trial in range(100):
        n_off, n_idx = (
            int(torch.randint(1, 9, (), generator=gen)),
            int(torch.randint(0, 9, (), generator=gen)),
        )
        offsets = torch.randint(-3, 12, (n_off,), generator=gen)
        indices = torch.randint(-3, 12, (n_idx,), generator=gen, dtype=(torch.int64, torch.int32)[trial % 2])
        if trial % 3 == 0:
            offsets[torch.randint(0, n_off, (), generator=gen)] = extremes[trial % 6]
        if trial % 4 == 1:  # strided views at a storage offset, garbage in between
            wide = torch.full((3 * n_off + 1,), 10**15)
            wide[1::3] = offsets
            wide_idx = torch.full((3 * n_idx + 1,), -(10**6), dtype=indices.dtype)
            wide_idx[1::3] = indices
            offsets, indices = wide[1::3], wide_idx[1::3]
        facts = _content_stats(offsets, indices, use_numpy=True)
        assert facts == _content_stats(offsets, indices, use_numpy=False), (offsets, indices)
        o = offsets.tolist()
        down = [t for t in range(n_off - 1) if o[t + 1] < o[t]]
        assert facts[:3] == (o[0], o[-1], down[0] if down else None)
        assert facts[4:] == ((min(indices.tolist()), max(indices.tolist())) if n_idx else (0, -1))
