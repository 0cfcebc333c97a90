"""The SQLite store: keys, keep-fastest winners, concurrency, and refusing files that are not ours."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest
from conftest import make_key
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_tune.cache import store as store_mod
from sae_tune.cache.store import (
    SCHEMA_VERSION,
    CacheError,
    CacheKey,
    FieldError,
    Provenance,
    Store,
    batch_bucket,
    default_cache_path,
    l0_bucket,
    resolve_cache_path,
)

GPU_KEY = make_key(device_name="NVIDIA GeForce RTX 4090", capability="8.9")


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "cache.sqlite") as s:
        yield s


@pytest.fixture(autouse=True)
def _no_real_cache(monkeypatch, tmp_path):
    # Any Store() without a path lands in tmp_path, never in the user's cache dir.
    monkeypatch.setenv("SAE_TUNE_CACHE", str(tmp_path / "env-cache.sqlite"))


# --- buckets and keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("b", "want"), [(1, 1), (2, 2), (3, 4), (32, 32), (33, 64), (4097, 8192)])
def test_batch_bucket(b, want):
    assert batch_bucket(b) == want


@pytest.mark.parametrize(("l0", "want"), [(0, 1), (0.5, 1), (1, 1), (64, 64), (64.2, 128), (80, 128)])
def test_l0_bucket(l0, want):
    assert l0_bucket(l0) == want


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "32"])
def test_batch_bucket_rejects(bad):
    with pytest.raises(ValueError):
        batch_bucket(bad)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), True, "80"])
def test_l0_bucket_rejects(bad):
    with pytest.raises(ValueError):
        l0_bucket(bad)


@settings(database=None)
@given(st.integers(min_value=1, max_value=1 << 24))
def test_batch_bucket_is_smallest_power_of_two_at_least_b(b):
    bucket = batch_bucket(b)
    assert bucket >= b and bucket & (bucket - 1) == 0 and bucket < 2 * b


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("F", True),
        ("F", "16384"),
        ("F", 0),
        ("F", 1 << 40),
        ("D", 2304.0),
        ("batch_bucket", 48),
        ("l0_bucket", 1 << 20),  # wider than F
        ("capability", "9"),
        ("capability", 9.0),
        ("dtype", "float64"),
        ("op", "backward"),  # "encode" and "encode_topk" are ops since encode tuning
        ("device_name", ""),
        ("device_name", "GPU\x1b[31m"),
        ("device_name", "x" * 500),
        ("torch_version", "2.4; import os"),
        ("template_hash", "abc def"),
    ],
)
def test_cache_key_rejects(field, value):
    with pytest.raises(FieldError) as err:
        make_key(**{field: value})
    assert err.value.field == field


def test_key_id_is_stable_and_null_safe():
    assert make_key().id == make_key().id
    assert make_key().id != make_key(capability="9.0").id
    assert make_key(triton_version=None).id != make_key().id


def test_for_device_computes_buckets():
    from sae_tune.device import describe_device

    info = describe_device("cpu")
    key = CacheKey.for_device(
        info, template_hash="feed", dtype="torch.bfloat16", F=4096, D=512, batch_size=33, mean_l0=70.5
    )
    assert (key.batch_bucket, key.l0_bucket, key.dtype, key.device_name) == (64, 128, "bfloat16", info.name)
    assert key.capability is None


# --- path resolution ----------------------------------------------------------------------------------


def test_path_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_TUNE_CACHE", str(tmp_path / "from-env.sqlite"))
    assert resolve_cache_path() == tmp_path / "from-env.sqlite"
    assert resolve_cache_path(tmp_path / "arg.sqlite") == tmp_path / "arg.sqlite"
    assert resolve_cache_path(tmp_path) == tmp_path / "cache.sqlite"
    monkeypatch.delenv("SAE_TUNE_CACHE")
    assert resolve_cache_path() == default_cache_path()
    assert default_cache_path().name == "cache.sqlite" and "sae-tune" in str(default_cache_path())


def test_env_var_store(tmp_path):
    with Store() as s:
        assert s.path == tmp_path / "env-cache.sqlite"
    assert (tmp_path / "env-cache.sqlite").exists()


def test_creates_parent_dirs(tmp_path):
    with Store(tmp_path / "a" / "b" / "c.sqlite") as s:
        assert s.summary()["schema_version"] == SCHEMA_VERSION


# --- trials, baselines, winners -----------------------------------------------------------------------


def test_wal_and_busy_timeout(store):
    assert store.db.journal_mode == "wal"
    assert store.db.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


def test_trials_roundtrip_with_provenance(store):
    k = make_key()
    tid = store.record_trial(k, "dense", {}, 1.25, study="s1", trial_number=0)
    store.record_trial(k, "sparse_csr", {}, None, ok=False, error="boom" * 2000, study="s1", trial_number=1)
    store.record_trial(make_key(F=8192), "dense", {}, 0.5)
    trials = store.trials(k)
    assert [t.impl for t in trials] == ["dense", "sparse_csr"]
    assert trials[0].id == tid and trials[0].ms == 1.25 and trials[0].ok
    assert trials[1].ms is None and not trials[1].ok and len(trials[1].error) == 4000
    assert trials[0].key == k
    prov = trials[0].provenance
    assert prov.date and prov.sae_tune_version and prov.host_kind and prov.source == "measured"
    assert len(store.trials()) == 3


def test_ok_trial_needs_a_time(store):
    with pytest.raises(FieldError, match="ms"):
        store.record_trial(make_key(), "dense", {}, None)
    with pytest.raises(FieldError, match="ms"):
        store.record_trial(make_key(), "dense", {}, float("nan"))
    assert store.trials() == []


def test_triton_configs_are_validated_and_canonical(store):
    store.record_trial(make_key(), "triton", {"alloc": "exact", "overflow": "fallback", "block_d": 128}, 1.0)
    (trial,) = store.trials()
    assert trial.config["block_d"] == 128 and "overflow" not in trial.config
    for bad in ({"block_d": "128; import os"}, {"block_d": 100}, {"code": "print(1)"}, {"block_d": True}):
        with pytest.raises(FieldError) as err:
            store.record_trial(make_key(), "triton", bad, 1.0)
        assert err.value.field == "config"
    with pytest.raises(FieldError) as err:
        store.record_trial(make_key(), "dense", {"cmd": "__import__('os')"}, 1.0)
    assert err.value.field == "config"
    with pytest.raises(FieldError) as err:
        store.record_trial(make_key(), "pytorch_eval", {}, 1.0)
    assert err.value.field == "impl"
    assert len(store.trials()) == 1


def test_winner_keeps_fastest(store):
    k = make_key()
    assert store.winner(k) is None
    assert store.set_winner_if_faster(k, "dense", {}, 2.0)
    assert not store.set_winner_if_faster(k, "sparse_csr", {}, 3.0)
    assert not store.set_winner_if_faster(k, "sparse_csr", {}, 2.0)  # a tie keeps the incumbent
    assert store.set_winner_if_faster(k, "embedding_bag_topk", {"k": 64}, 0.5, dense_ms=2.0)
    w = store.winner(k)
    assert (w.impl, w.config, w.ms) == ("embedding_bag_topk", {"k": 64}, 0.5)
    assert (w.dense_ms, w.speedup) == (2.0, 4.0)
    assert len(store.winners()) == 1


def test_winner_takes_dense_ms_from_baseline(store):
    k = make_key()
    store.record_baseline(k, "dense", 3.0)
    store.record_baseline(k, "dense", 4.0)  # the latest baseline replaces the previous one
    store.record_baseline(k, "sparse_csr", 5.0)
    assert [(b.impl, b.ms) for b in store.baselines(k)] == [("dense", 4.0), ("sparse_csr", 5.0)]
    store.set_winner_if_faster(k, "sparse_csr", {}, 1.0)
    assert store.winner(k).dense_ms == 4.0
    assert store.winner(k).speedup == 4.0


def test_no_triton_winner_on_cpu(store):
    with pytest.raises(FieldError, match="interpreter"):
        store.set_winner_if_faster(make_key(), "triton", {}, 0.1)
    assert store.set_winner_if_faster(GPU_KEY, "triton", {"block_d": 64}, 0.1)
    assert store.winner(GPU_KEY).config["block_d"] == 64


def test_winners_by_device_clear_and_summary(store):
    store.set_winner_if_faster(make_key(), "dense", {}, 1.0)
    store.set_winner_if_faster(make_key(batch_bucket=64), "dense", {}, 1.5)
    store.set_winner_if_faster(GPU_KEY, "dense", {}, 0.2)
    store.record_trial(make_key(), "dense", {}, None, ok=False, error="x")
    store.record_baseline(make_key(), "dense", 1.0)
    assert len(store.winners()) == 3
    assert {w.key.batch_bucket for w in store.winners("Intel(R) Xeon(R) Processor")} == {32, 64}
    assert [w.key for w in store.winners("NVIDIA GeForce RTX 4090")] == [GPU_KEY]
    s = store.summary()
    assert (s["trials"], s["failed_trials"], s["winners"], s["baselines"]) == (1, 1, 3, 1)
    assert s["devices"] == ["Intel(R) Xeon(R) Processor", "NVIDIA GeForce RTX 4090"]
    store.clear()
    s = store.summary()
    assert (s["trials"], s["winners"], s["baselines"], s["schema_version"]) == (0, 0, 0, SCHEMA_VERSION)


def test_data_survives_reopen(tmp_path):
    path = tmp_path / "c.sqlite"
    with Store(path) as s:
        s.set_winner_if_faster(
            GPU_KEY, "triton", {"alloc": "fixed", "overflow": "validate", "max_l0": 64}, 0.3
        )
    with Store(path) as s:
        (w,) = s.winners()
        assert w.key == GPU_KEY and w.config["max_l0"] == 64


def test_imported_provenance_is_kept(store):
    prov = Provenance(date="2025-01-02T03:04:05+00:00", sae_tune_version="0.0.9", host_kind="linux-x86_64")
    store.set_winner_if_faster(GPU_KEY, "dense", {}, 1.0, provenance=prov)
    assert store.winner(GPU_KEY).provenance == prov


# --- several processes at once ------------------------------------------------------------------------

N_PER_WORKER = 40
WORKERS = 4
RACE_KEY = make_key(device_name="race device")
START_METHOD = "spawn"  # clean children on every platform; fork would also inherit the parent's store


def _writer(path: str, worker: int, n: int, barrier) -> None:
    barrier.wait(timeout=60)  # everyone opens the fresh file at the same moment
    with Store(path, timeout=60) as s:
        for i in range(n):
            s.record_trial(RACE_KEY, "dense", {}, 1.0 + i, study=f"w{worker}", trial_number=i)
            s.set_winner_if_faster(
                RACE_KEY, "embedding_bag_topk", {"k": worker + 1}, 10.0 + worker + i / 1000
            )


def test_concurrent_writers_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    )
    path = str(tmp_path / "shared.sqlite")
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_writer, args=(path, w, N_PER_WORKER, barrier)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * WORKERS
    with Store(path) as s:
        trials = s.trials()
        assert len(trials) == WORKERS * N_PER_WORKER
        assert {(t.study, t.trial_number) for t in trials} == {
            (f"w{w}", i) for w in range(WORKERS) for i in range(N_PER_WORKER)
        }
        (winner,) = s.winners()
        assert winner.ms == 10.0 and winner.config == {"k": 1}


# --- files that are not ours --------------------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _assert_refused(path: Path, *needles: str) -> None:
    before = _snapshot(path.parent)
    with pytest.raises(CacheError) as err:
        Store(path)
    message = str(err.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message
    # no chained sqlite3 traceback
    assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)
    assert _snapshot(path.parent) == before  # not one byte changed, no -wal/-shm/-journal left behind


def test_garbage_file_is_refused_untouched(tmp_path):
    path = tmp_path / "cache.sqlite"
    path.write_bytes(os.urandom(4096) + b"not a database")
    _assert_refused(path, "not a usable SQLite database")


def test_text_file_is_refused_untouched(tmp_path):
    path = tmp_path / "cache.sqlite"
    path.write_text("SQLite format 3 is what I claim to be\n" * 50)
    _assert_refused(path, "not a usable SQLite database")


def test_foreign_sqlite_db_is_refused_untouched(tmp_path):
    path = tmp_path / "cache.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, title TEXT)")
    conn.execute("INSERT INTO photos (title) VALUES ('cat')")
    conn.commit()
    conn.close()
    _assert_refused(path, "belongs to something else", "photos")


def test_foreign_meta_table_is_refused_untouched(tmp_path):
    path = tmp_path / "cache.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE meta (name TEXT, data BLOB)")
    conn.commit()
    conn.close()
    _assert_refused(path, "belongs to something else")


def test_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "cache.sqlite"
    with Store(path) as s:
        s.set_winner_if_faster(make_key(), "dense", {}, 1.0)
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    _assert_refused(path, "newer sae-tune", f"schema version {SCHEMA_VERSION + 1}")


def test_truncated_cache_is_refused_untouched(tmp_path):
    path = tmp_path / "cache.sqlite"
    with Store(path) as s:
        for i in range(300):
            s.record_trial(make_key(), "dense", {}, 1.0 + i, error="x" * 200)
    data = path.read_bytes()
    assert len(data) > 8 * 4096
    path.write_bytes(data[: len(data) // 2])
    _assert_refused(path)


def test_empty_file_becomes_a_cache(tmp_path):
    path = tmp_path / "cache.sqlite"
    path.touch()
    with Store(path) as s:
        assert s.summary()["winners"] == 0


def test_directory_at_cache_path_is_resolved_not_clobbered(tmp_path):
    (tmp_path / "dir").mkdir()
    with Store(tmp_path / "dir") as s:
        assert s.path == tmp_path / "dir" / "cache.sqlite"


def test_store_error_during_use_is_a_cache_error(store, monkeypatch):
    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(store_mod.Table, "insert", broken)
    with pytest.raises(CacheError, match="recording a trial failed: database is locked"):
        store.record_trial(make_key(), "dense", {}, 1.0)
    monkeypatch.undo()
    assert store.trials() == []  # the transaction was rolled back, the store is still usable
    store.record_trial(make_key(), "dense", {}, 1.0)
    assert len(store.trials()) == 1


def test_import_winners_is_all_or_nothing(store):
    good = store_mod.WinnerRecord(
        key=make_key(), impl="dense", config={}, ms=1.0, dense_ms=None, provenance=Provenance.current()
    )
    bad = store_mod.WinnerRecord(
        key=make_key(batch_bucket=64),
        impl="dense",
        config={"x": "rm -rf /"},
        ms=1.0,
        dense_ms=None,
        provenance=Provenance.current(),
    )
    with pytest.raises(FieldError, match="record 1") as err:
        store.import_winners([good, bad])
    assert err.value.field == "config"
    assert store.winners() == []
    assert store.import_winners([good]) == 1


def test_torch_path_configs_are_exactly_their_build_params(store):
    from sae_tune.targets.library.paths import TORCH_PATHS

    store.record_trial(make_key(), "embedding_bag_topk", {"k": 64, "chunk": None}, 1.0)
    store.record_trial(make_key(), "dense", {"chunk": 4096}, 1.0)
    configs = [t.config for t in store.trials()]
    assert configs == [{"k": 64, "chunk": None}, {"chunk": 4096}]
    for t in store.trials():
        TORCH_PATHS[t.impl].build(**t.config)  # what is stored can be built
    for config, field in [
        ({}, "config.k"),
        ({"k": "64"}, "config.k"),
        ({"k": True}, "config.k"),
        ({"k": 0}, "config.k"),
        ({"k": 64, "chunk": 2.5}, "config.chunk"),
        ({"k": 64, "mode": "sum"}, "config"),
    ]:
        with pytest.raises(FieldError) as err:
            store.record_trial(make_key(), "embedding_bag_topk", config, 1.0)
        assert err.value.field == field
    assert len(store.trials()) == 2


def test_version_falls_back_to_the_package_when_metadata_is_unreadable(monkeypatch):
    """``metadata.version`` returns None when the install folder cannot be read (another user): the
    provenance must still hold a version string, or every write fails validation."""
    import sae_tune
    from sae_tune.cache import store as store_mod

    monkeypatch.setattr(store_mod.metadata, "version", lambda name: None)
    assert store_mod.sae_tune_version() == sae_tune.__version__
