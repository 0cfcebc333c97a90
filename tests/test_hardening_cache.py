"""Cache hardening: FIFOs never hang, measured times are the truth for their key, spreads are kept, a cache
someone else owns is read without leaving files and refused for writes, and the cache commands say what
they would do."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import pytest
import tabulate  # noqa: F401 - imported here for `cache show` in a forked child of another uid
import torch
from click.testing import CliRunner
from conftest import CPU_KEY_FIELDS, make_key, random_acts, random_weights

from sae_tune.cache.share import (
    ConfigFileError,
    ConfigFileUnreadable,
    ShippedConfigWarning,
    import_file,
    load_file,
    load_shipped,
    validate_payload,
    write_export,
)
from sae_tune.cache.store import (
    SCHEMA_VERSION,
    CacheError,
    CacheKey,
    CacheReadOnlyError,
    FieldError,
    Provenance,
    Store,
    WinnerRecord,
)
from sae_tune.cli.main import main
from sae_tune.dispatch.identity import Identity
from sae_tune.dispatch.index import CacheIndex, read_local

PROV = {"date": "2025-06-01T12:00:00+00:00", "sae_tune_version": "0.1.0", "host_kind": "linux-x86_64"}
CPU = {**CPU_KEY_FIELDS, "triton_version": None}
HANG_S = 20.0


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_TUNE_CACHE", str(tmp_path / "env-cache.sqlite"))
    monkeypatch.delenv("SAE_TUNE_SHIPPED_DIR", raising=False)


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def record(**over) -> dict:
    rec = {**CPU, "impl": "dense", "config": {}, "ms": 2.0, "dense_ms": 2.0, "provenance": dict(PROV)}
    rec.update(over)
    return rec


def payload(records: list[dict]) -> dict:
    return {"schema": "sae-tune/configs", "version": 1, "provenance": dict(PROV), "records": records}


def write_file(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(payload(records)))
    return path


# --- item 6: FIFOs and other non-regular files never block -----------------------------------------------


def _unblock(fifo: Path) -> None:
    """Release a reader stuck in open() of ``fifo`` (old code), so no thread is left behind."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass


def _call_with_timeout(fifo: Path, fn, *args):
    """Run ``fn(*args)`` in a thread; fail (not hang) if it blocks. Returns its exception, or None."""
    box: dict[str, BaseException | None] = {"exc": None}

    def target() -> None:
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["exc"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(HANG_S)
    if thread.is_alive():
        _unblock(fifo)
        thread.join(5)
        pytest.fail(f"{fn.__name__} blocked on the FIFO {fifo}")
    return box["exc"]


def test_fifo_config_file_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "configs.json"
    os.mkfifo(fifo)
    exc = _call_with_timeout(fifo, load_file, fifo)
    assert isinstance(exc, ConfigFileUnreadable)
    assert str(fifo) in str(exc) and "FIFO" in str(exc) and "not a regular file" in str(exc)


def test_fifo_in_the_shipped_folder_is_skipped_with_a_warning(tmp_path):
    folder = tmp_path / "shipped"
    folder.mkdir()
    write_file(folder / "good.json", [record()])
    os.mkfifo(folder / "evil.json")
    out: dict[str, object] = {}

    def load() -> None:
        with pytest.warns(ShippedConfigWarning, match="evil.json") as caught:
            out["records"] = load_shipped(folder)
        out["messages"] = [str(w.message) for w in caught]

    exc = _call_with_timeout(folder / "evil.json", load)
    assert exc is None, exc
    assert len(out["records"]) == 1
    assert any("not a regular file" in m for m in out["messages"])


def test_cli_import_of_a_fifo_exits_2_without_a_traceback(tmp_path):
    fifo = tmp_path / "configs.json"
    os.mkfifo(fifo)
    code = "from sae_tune.cli.main import main; main()"
    cmd = [sys.executable, "-c", code, "cache", "import", "--cache", str(tmp_path / "c.sqlite"), str(fifo)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        _unblock(fifo)
        pytest.fail("sae-tune cache import blocked on a FIFO")
    assert done.returncode == 2, done.stderr
    assert "not a regular file" in done.stderr and str(fifo) in done.stderr
    assert "Traceback" not in done.stderr


def test_fifo_at_the_cache_path_never_blocks(tmp_path):
    fifo = tmp_path / "cache.sqlite"
    os.mkfifo(fifo)
    exc = _call_with_timeout(fifo, Store, fifo)
    assert isinstance(exc, CacheError) and "not a regular file" in str(exc)
    with pytest.warns(Warning, match="not a regular file"):
        exc = _call_with_timeout(fifo, read_local, fifo)
    assert exc is None


def test_oversized_file_names_the_file_and_the_cap(tmp_path):
    from sae_tune.cache.share import MAX_FILE_BYTES

    big = tmp_path / "big.json"
    with big.open("wb") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ConfigFileUnreadable) as err:
        load_file(big)
    assert str(big) in str(err.value) and f"{MAX_FILE_BYTES // (1024 * 1024)} MiB" in str(err.value)
    result = run("cache", "import", "--cache", str(tmp_path / "c.sqlite"), str(big))
    assert result.exit_code == 2 and "MiB limit" in result.output


# --- item 7: a time measured here is the truth for its key ----------------------------------------------


def test_import_never_replaces_a_measured_winner(tmp_path):
    key = CacheKey(**CPU)
    with Store(tmp_path / "c.sqlite") as store:
        store.set_winner_if_faster(key, "embedding_bag_csr", {"chunk": 16}, 1.0, dense_ms=4.0)
        absurd = write_file(tmp_path / "absurd.json", [record(ms=5e-324)])
        result = import_file(store, absurd)
        assert (result.updated, result.kept_local) == (0, 1)
        winner = store.winner(key)
        assert (winner.impl, winner.ms, winner.provenance.source) == ("embedding_bag_csr", 1.0, "measured")
    out = run("cache", "import", "--cache", str(tmp_path / "c.sqlite"), str(absurd))
    assert out.exit_code == 0 and "0 added, 0 updated, 1 kept local" in out.output


def test_a_later_measurement_replaces_an_imported_winner(tmp_path):
    key = CacheKey(**CPU)
    with Store(tmp_path / "c.sqlite") as store:
        import_file(store, write_file(tmp_path / "shared.json", [record(ms=0.001)]))
        assert store.winner(key).provenance.source == "imported"
        assert store.winner(key).origin == "shared.json"
        assert store.set_winner_if_faster(key, "embedding_bag_csr", {"chunk": 16}, 3.0)  # slower, measured
        winner = store.winner(key)
        assert (winner.impl, winner.ms, winner.provenance.source, winner.origin) == (
            "embedding_bag_csr",
            3.0,
            "measured",
            None,
        )
        assert not store.set_winner_if_faster(key, "dense", {}, 4.0)  # measured vs measured: fastest wins


IDENT = Identity(CPU["device_name"], None, CPU["torch_version"], None)


def _rec(source: str, *, impl: str = "dense", ms: float = 1.0, batch_bucket: int = 32, origin=None):
    prov = Provenance(**PROV, source=source)
    key = CacheKey(**{**CPU, "batch_bucket": batch_bucket})
    config = {"chunk": 16} if impl == "embedding_bag_csr" else {}
    return WinnerRecord(key, impl, config, ms, 10.0, prov, 0.03, origin)


def _tiers(index: CacheIndex, bucket: int):
    return index.tiers(IDENT, CPU["dtype"], CPU["F"], CPU["D"], bucket)


def test_index_ranks_measured_over_imported_over_shipped_for_one_key():
    imported = _rec("imported", impl="sparse_coo", ms=1e-300, origin="theirs.json")
    measured = _rec("measured", impl="embedding_bag_csr", ms=5.0)
    shipped = _rec("shipped", impl="sparse_csr", ms=1e-300)
    tiers = _tiers(CacheIndex(local=[imported, measured], shipped=[shipped]), 32)
    flat = [o for t in tiers for o in t.options]
    assert [o.impl for o in flat] == ["embedding_bag_csr", "sparse_coo", "sparse_csr"]
    assert flat[0].reason.startswith("measured here (2025-06-01) on ") and "5 ms ±3%" in flat[0].reason
    assert flat[1].reason.startswith("imported from theirs.json (measured 2025-06-01) for ")
    assert flat[2].reason.startswith("shipped (measured 2025-06-01) for ")


def test_shipped_records_apply_only_within_a_factor_of_two_of_their_batch_bucket():
    index = CacheIndex(shipped=[_rec("shipped", batch_bucket=8)])
    assert [len(_tiers(index, b)) for b in (2, 4, 8, 16, 32, 1024)] == [0, 1, 1, 1, 0, 0]
    (tier,) = _tiers(index, 16)
    assert "nearest to this batch bucket 16" in tier.options[0].reason


@pytest.fixture
def dispatch_here(isolated_dispatch):
    """This test's own cache and shipped folder for the process-wide dispatcher, reset afterwards."""
    from sae_tune.dispatch import reload

    yield isolated_dispatch
    reload()


def test_explain_says_a_shipped_record_for_another_batch_bucket_yields_to_the_cost_model(dispatch_here):
    from sae_tune import explain
    from sae_tune.dispatch import reload

    F, D = 512, 48
    rec = record(**{"F": F, "D": D, "l0_bucket": 8, "impl": "sparse_coo", "batch_bucket": 8})
    from sae_tune.device import describe_device

    info = describe_device("cpu")
    rec.update(device_name=info.name, torch_version=info.torch_version, triton_version=info.triton_version)
    write_file(dispatch_here / "cpu.json", [rec])
    reload()
    W, b = random_weights(F, D, torch.float32)
    near = explain(random_acts(16, F, 6, torch.float32), W, b)
    assert (near.implementation, near.source) == ("sparse_coo", "shipped")
    assert near.reason.startswith("shipped (measured 2025-06-01)")
    far = explain(random_acts(256, F, 6, torch.float32), W, b)
    assert far.source == "model"


def test_explain_names_the_imported_file(dispatch_here, tmp_path):
    from sae_tune import explain
    from sae_tune.device import describe_device
    from sae_tune.dispatch import reload

    F, D = 512, 48
    info = describe_device("cpu")
    rec = record(
        **{"F": F, "D": D, "l0_bucket": 8, "impl": "sparse_coo", "batch_bucket": 8},
        device_name=info.name,
        torch_version=info.torch_version,
        triton_version=info.triton_version,
    )
    shared = write_file(tmp_path / "colleague-cpu.json", [rec])
    assert run("cache", "import", str(shared)).exit_code == 0
    reload()
    W, b = random_weights(F, D, torch.float32)
    decision = explain(random_acts(8, F, 6, torch.float32), W, b)
    assert (decision.implementation, decision.source) == ("sparse_coo", "cache")
    assert decision.reason.startswith("imported from colleague-cpu.json (measured 2025-06-01)")


# --- item 8: spreads are stored, shown, exported and imported; forget_key ---------------------------------


def test_spread_is_stored_for_trials_baselines_and_winners(tmp_path):
    key = make_key()
    with Store(tmp_path / "c.sqlite") as store:
        store.record_trial(
            key, "dense", {}, 4.01, ok=True, error=None, study="s", trial_number=0, spread=0.03
        )
        store.record_baseline(key, "dense", 4.01, spread=0.5)
        store.set_winner_if_faster(key, "sparse_csr", {}, 1.0, 4.01, spread=0.0)
        assert store.trials()[0].spread == 0.03
        assert store.baselines()[0].spread == 0.5
        assert store.winner(key).spread == 0.0
        for bad in (float("nan"), float("inf"), -0.1, True, "3%"):
            with pytest.raises(FieldError) as err:
                store.record_trial(key, "dense", {}, 1.0, spread=bad)
            assert err.value.field == "spread"
        assert len(store.trials()) == 1


def test_show_prints_the_spread(tmp_path):
    path = tmp_path / "c.sqlite"
    with Store(path) as store:
        store.set_winner_if_faster(make_key(), "sparse_csr", {}, 4.01, 8.0, spread=0.031)
        store.set_winner_if_faster(make_key(batch_bucket=64), "dense", {}, 2.0)
    shown = run("cache", "show", "--cache", str(path))
    assert shown.exit_code == 0 and "4.010 ms ±3%" in shown.output and "2.000 ms" in shown.output
    as_json = json.loads(run("cache", "show", "--cache", str(path), "--json").output)
    assert sorted(str(w["spread"]) for w in as_json["winners_list"]) == ["0.031", "None"]


def test_spread_round_trips_through_export_and_import_and_is_validated(tmp_path):
    src = tmp_path / "src.sqlite"
    with Store(src) as store:
        store.set_winner_if_faster(make_key(), "sparse_csr", {}, 1.0, 2.0, spread=0.25)
        store.set_winner_if_faster(make_key(batch_bucket=64), "dense", {}, 2.0)
        out = tmp_path / "out.json"
        written = write_export(out, store)
    spreads = sorted(str(r.get("spread")) for r in written["records"])
    assert spreads == ["0.25", "None"]  # an unknown spread is left out of the file
    with Store(tmp_path / "dst.sqlite") as dst:
        import_file(dst, out)
        assert sorted(str(w.spread) for w in dst.winners()) == ["0.25", "None"]
    for bad in (-1, "wide", [0.1], 1e300 * 10):
        with pytest.raises(ConfigFileError) as err:
            validate_payload(payload([record(spread=bad)]))
        assert (err.value.record, err.value.field) == (0, "spread")


def test_forget_key_deletes_everything_of_one_key(tmp_path):
    key, other = CacheKey(**CPU), CacheKey(**{**CPU, "batch_bucket": 64})
    with Store(tmp_path / "c.sqlite") as store:
        for k in (key, other):
            store.record_trial(k, "dense", {}, 1.0)
            store.record_trial(k, "sparse_csr", {}, 0.5)
            store.record_baseline(k, "dense", 1.0)
            store.set_winner_if_faster(k, "sparse_csr", {}, 0.5)
        assert store.forget_key(key) == 4  # 2 trials, 1 baseline, 1 winner
        assert store.winner(key) is None and store.trials(key) == [] and store.baselines(key) == []
        assert store.winner(other) is not None and len(store.trials(other)) == 2
        import_file(store, write_file(tmp_path / "x.json", [record(batch_bucket=32)]))
        assert store.winner(key).provenance.source == "imported"
        assert store.forget_key(key) == 1  # imported winners too
        assert store.forget_key(key) == 0


def _as_schema_1(path: Path) -> None:
    """Turn a current cache into what sae-tune wrote with schema version 1."""
    conn = sqlite3.connect(path)
    for table, columns in (
        ("trials", ["spread"]),
        ("baselines", ["spread"]),
        ("winners", ["spread", "origin"]),
    ):
        for column in columns:
            conn.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()


def test_a_schema_1_cache_opens_migrates_and_keeps_every_row(tmp_path):
    path = tmp_path / "old.sqlite"
    with Store(path) as store:
        store.record_trial(make_key(), "dense", {}, 1.0)
        store.record_baseline(make_key(), "dense", 1.0)
        store.set_winner_if_faster(make_key(), "sparse_csr", {}, 0.5)
    _as_schema_1(path)
    (rec,) = read_local(path)  # the dispatcher reads it as it is
    assert (rec.impl, rec.spread) == ("sparse_csr", None)
    with Store(path, read_only=True) as store:  # and so does a reader that may not write
        assert store.summary()["schema_version"] == 1 and store.winner(make_key()).spread is None
    with Store(path) as store:
        assert store.summary()["schema_version"] == SCHEMA_VERSION == 2
        assert (len(store.trials()), len(store.baselines()), len(store.winners())) == (1, 1, 1)
        assert store.trials()[0].spread is None
        store.record_trial(make_key(), "dense", {}, 1.0, spread=0.1)
        assert store.trials()[1].spread == 0.1


# --- item 10: someone else's cache --------------------------------------------------------------------


@pytest.fixture
def cannot_write(monkeypatch):
    """Pretend this process lacks write permission on the given paths (tests run as root, where
    permissions are not enforced)."""
    denied: set[Path] = set()
    real = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve() in denied:
            return False
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    return lambda *paths: denied.update(Path(p).resolve() for p in paths)


def _populated(path: Path) -> Path:
    with Store(path) as store:
        store.record_trial(make_key(), "dense", {}, 2.0)
        store.set_winner_if_faster(make_key(), "sparse_csr", {}, 1.0, 2.0)
    return path


@pytest.mark.parametrize("what", ["file", "folder"])
def test_writing_to_a_read_only_cache_is_a_clear_error(tmp_path, cannot_write, what):
    path = _populated(tmp_path / "shared" / "cache.sqlite")
    cannot_write(path if what == "file" else path.parent)
    with pytest.raises(CacheReadOnlyError, match=f"sae-tune cache {path} is read-only: "):
        Store(path)
    shared = write_file(tmp_path / "in.json", [record(batch_bucket=64)])
    for args in (("import", "--cache", str(path), str(shared)), ("clear", "--cache", str(path), "--yes")):
        result = run("cache", *args)
        assert result.exit_code == 2, result.output
        assert "is read-only" in result.output and "Traceback" not in result.output


def test_reading_commands_open_a_read_only_cache_and_leave_no_files(tmp_path, cannot_write):
    path = _populated(tmp_path / "shared" / "cache.sqlite")
    cannot_write(path, path.parent)
    before = sorted(p.name for p in path.parent.iterdir())
    assert before == ["cache.sqlite"]
    shown = run("cache", "show", "--cache", str(path))
    assert shown.exit_code == 0 and "(read-only)" in shown.output and "sparse_csr" in shown.output
    out = tmp_path / "out.json"
    assert run("cache", "export", "--cache", str(path), "-o", str(out)).exit_code == 0
    assert len(json.loads(out.read_text())["records"]) == 1
    assert [r.impl for r in read_local(path)] == ["sparse_csr"]
    with Store.for_reading(path) as store:
        assert store.read_only
        with pytest.raises(CacheReadOnlyError, match="is read-only"):
            store.record_trial(make_key(), "dense", {}, 1.0)
    assert sorted(p.name for p in path.parent.iterdir()) == before


def _as_user(uid: int, fn, *args) -> int:
    """Run ``fn(*args)`` in a forked child under ``uid`` (a real second user); its exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgid(uid)
            os.setuid(uid)
            fn(*args)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _owner_writes(path: str, n: int) -> None:
    with Store(path) as store:
        store.record_trial(make_key(), "dense", {}, 1.0 + n)
        store.set_winner_if_faster(make_key(), "sparse_csr", {}, 1.0 / (n + 1), 2.0)


def _other_reads(path: str) -> None:
    shown = CliRunner().invoke(main, ["cache", "show", "--cache", path])
    assert shown.exit_code == 0 and "sparse_csr" in shown.output, shown.output
    assert [r.impl for r in read_local(Path(path))] == ["sparse_csr"]


def _other_writes(path: str) -> None:
    shared = Path(tempfile.mkdtemp()) / "in.json"
    write_file(shared, [record(batch_bucket=64)])
    tried = CliRunner().invoke(main, ["cache", "import", "--cache", path, str(shared)])
    assert tried.exit_code == 2 and "is read-only" in tried.output, tried.output


def test_a_second_user_reads_without_locking_the_owner_out():
    """Real permissions: the owner's cache in a folder everyone may write (like /tmp), file mode 0644.

    As root the two users are real (forked children with their own uids); otherwise this user plays
    the second one by taking away its own write permission on the file.
    """
    root = os.geteuid() == 0
    owner, other = (4242, 65534) if root else (None, None)
    folder = Path(tempfile.mkdtemp(prefix="sae-tune-shared-"))
    try:
        os.chmod(folder, 0o777)
        path = str(folder / "cache.sqlite")
        assert (_as_user(owner, _owner_writes, path, 0) if root else _run(_owner_writes, path, 0)) == 0
        os.chmod(path, 0o644 if root else 0o444)
        assert (_as_user(other, _other_reads, path) if root else _run(_other_reads, path)) == 0
        assert sorted(p.name for p in folder.iterdir()) == ["cache.sqlite"]  # no -wal/-shm left behind
        assert (_as_user(other, _other_writes, path) if root else _run(_other_writes, path)) == 0
        assert sorted(p.name for p in folder.iterdir()) == ["cache.sqlite"]
        os.chmod(path, 0o644)
        assert (_as_user(owner, _owner_writes, path, 1) if root else _run(_owner_writes, path, 1)) == 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run(fn, *args) -> int:
    fn(*args)
    return 0


# --- item 11: cache clear asks with the real counts -------------------------------------------------------


def test_clear_asks_with_the_real_counts(tmp_path):
    path = tmp_path / "c.sqlite"
    with Store(path) as store:
        for i in range(3):
            store.record_trial(make_key(), "dense", {}, 1.0 + i)
        store.record_baseline(make_key(), "dense", 1.0)
        store.set_winner_if_faster(make_key(), "dense", {}, 1.0)
        store.set_winner_if_faster(make_key(batch_bucket=64), "dense", {}, 1.0)
    result = CliRunner().invoke(main, ["cache", "clear", "--cache", str(path)], input="n\n")
    assert f"delete 3 trials, 1 baselines and 2 winners from {path}?" in result.output.lower()
    assert result.exit_code == 1  # aborted
    with Store(path) as store:
        assert len(store.winners()) == 2
