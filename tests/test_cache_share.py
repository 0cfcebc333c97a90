"""Export / import of tuned configs: round trips, hostile files, all-or-nothing, shipped per-GPU files."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
from conftest import CPU_KEY_FIELDS
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_tune.cache import share
from sae_tune.cache.share import (
    MAX_FILE_BYTES,
    SHIPPED_DIR,
    ConfigFileError,
    ShippedConfigWarning,
    export_records,
    import_file,
    load_file,
    load_shipped,
    parse_json,
    validate_payload,
    write_export,
)
from sae_tune.cache.store import CacheKey, Provenance, Store
from sae_tune.targets.library.paths import TORCH_PATHS

CPU = {**CPU_KEY_FIELDS, "triton_version": None}
GPU = {**CPU, "device_name": "NVIDIA GeForce RTX 4090", "capability": "8.9", "triton_version": "3.2.0"}
PROV = {"date": "2025-06-01T12:00:00+00:00", "sae_tune_version": "0.1.0", "host_kind": "linux-x86_64"}
TRITON_CONFIG = {"alloc": "fixed", "overflow": "fallback", "max_l0": 128, "block_d": 128, "block_l": 16}


def record(**over) -> dict:
    rec = {**GPU, "impl": "triton", "config": dict(TRITON_CONFIG), "ms": 0.05, "dense_ms": 0.4}
    rec["provenance"] = dict(PROV)
    rec.update(over)
    return rec


def payload(records: list[dict]) -> dict:
    return {"schema": "sae-tune/configs", "version": 1, "provenance": dict(PROV), "records": records}


def good_records() -> list[dict]:
    return [
        record(),
        record(batch_bucket=64, impl="embedding_bag_topk", config={"k": 64, "chunk": 1024}, ms=0.3),
        record(**{**CPU, "impl": "sparse_csr", "config": {}, "ms": 1.5, "dense_ms": 3.0}),
    ]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_TUNE_CACHE", str(tmp_path / "env-cache.sqlite"))
    monkeypatch.delenv("SAE_TUNE_SHIPPED_DIR", raising=False)


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "target.sqlite") as s:
        yield s


def comparable(store: Store) -> list[tuple]:
    return [(w.key, w.impl, w.config, w.ms, w.dense_ms, w.provenance.to_dict()) for w in store.winners()]


# --- round trip ---------------------------------------------------------------------------------------


def test_round_trip_into_an_empty_store(tmp_path):
    src = Store(tmp_path / "src.sqlite")
    prov = Provenance(**PROV)
    for rec in validate_payload(payload(good_records())):
        src.set_winner_if_faster(rec.key, rec.impl, rec.config, rec.ms, rec.dense_ms, provenance=prov)
    path = tmp_path / "out" / "rtx4090.json"
    written = write_export(path, src)
    assert [p.name for p in path.parent.iterdir()] == ["rtx4090.json"]  # no temp file left behind
    on_disk = json.loads(path.read_text())
    assert on_disk == written
    assert (on_disk["schema"], on_disk["version"], len(on_disk["records"])) == ("sae-tune/configs", 1, 3)
    assert set(on_disk["provenance"]) == {"date", "sae_tune_version", "host_kind"}

    with Store(tmp_path / "dst.sqlite") as dst:
        result = import_file(dst, path)
        assert (result.records, result.added, result.updated) == (3, 3, 0)
        assert comparable(dst) == comparable(src)
        assert {w.provenance.source for w in dst.winners()} == {"imported"}
        assert dst.trials() == []  # imports are winners, not local measurements
        for w in dst.winners():
            if w.impl != "triton":
                TORCH_PATHS[w.impl].build(**w.config)  # imported torch-path configs are buildable
    src.close()


def test_export_filters_by_device(store):
    for rec in validate_payload(payload(good_records())):
        store.set_winner_if_faster(rec.key, rec.impl, rec.config, rec.ms, rec.dense_ms)
    out = export_records(store, device_name=CPU["device_name"])
    assert [r["impl"] for r in out["records"]] == ["sparse_csr"]
    assert out["records"][0]["provenance"]["host_kind"]


def test_merge_keeps_local_measurements_and_the_fastest_import(tmp_path, store):
    key = CacheKey(**GPU)
    store.set_winner_if_faster(key, "dense", {}, 0.01)  # measured here, faster than the file's
    slow_key = CacheKey(**{**GPU, "batch_bucket": 64})
    store.set_winner_if_faster(slow_key, "dense", {}, 9.0)  # measured here, slower than the file's
    path = tmp_path / "in.json"
    path.write_text(json.dumps(payload(good_records())))
    result = import_file(store, path)
    assert (result.added, result.updated, result.kept_local) == (1, 0, 2)  # only the CPU key was new
    assert store.winner(key).ms == 0.01 and store.winner(slow_key).ms == 9.0
    assert {w.provenance.source for w in store.winners()} == {"measured", "imported"}
    faster = tmp_path / "faster.json"
    faster.write_text(json.dumps(payload([record(**{**CPU, "impl": "dense", "config": {}, "ms": 1.0})])))
    assert import_file(store, faster).updated == 1  # among imported records the fastest wins
    assert store.winner(CacheKey(**CPU)).provenance.source == "imported"


def test_duplicate_keys_in_one_file_keep_the_fastest(tmp_path, store):
    path = tmp_path / "in.json"
    path.write_text(json.dumps(payload([record(ms=0.5), record(ms=0.2), record(ms=0.9)])))
    import_file(store, path)
    (w,) = store.winners()
    assert w.ms == 0.2


def test_triton_config_is_canonicalized():
    exact = {"alloc": "exact", "overflow": "fallback", "max_l0": 128, "block_d": 64}
    (rec,) = validate_payload(payload([record(config=exact)]))
    assert rec.config["block_d"] == 64 and "overflow" not in rec.config and "max_l0" not in rec.config


# --- hostile records: rejected with record and field named, nothing stored ----------------------------

HOSTILE = [
    ({"config": {**TRITON_CONFIG, "block_d": "128; import os"}}, "config"),
    ({"config": {**TRITON_CONFIG, "block_d": {"__import__": "os"}}}, "config"),
    ({"config": {**TRITON_CONFIG, "block_d": [128]}}, "config"),
    ({"config": {**TRITON_CONFIG, "block_d": 100}}, "config"),
    ({"config": {**TRITON_CONFIG, "block_d": 10**30}}, "config"),
    ({"config": {**TRITON_CONFIG, "block_d": True}}, "config"),
    ({"config": {**TRITON_CONFIG, "code": "tl.store(ptr, 0)"}}, "config"),
    ({"config": "exact"}, "config"),
    ({"impl": "dense", "config": {"cmd": "__import__('os').system('x')"}}, "config"),
    ({"impl": "dense", "config": {"nested": {"a": 1}}}, "config"),
    ({"impl": "dense", "config": {"Bad Key": 1}}, "config"),
    ({"impl": "dense", "config": {"chunk": {"a": 1}}}, "config.chunk"),
    ({"impl": "embedding_bag_topk", "config": {"k": 10**30}}, "config.k"),
    ({"impl": "embedding_bag_topk", "config": {"k": "64"}}, "config.k"),
    ({"impl": "embedding_bag_topk", "config": {}}, "config.k"),
    ({"F": 10**30}, "F"),
    ({"F": "16384"}, "F"),
    ({"F": True}, "F"),
    ({"F": 16384.0}, "F"),
    ({"D": -1}, "D"),
    ({"batch_bucket": 48}, "batch_bucket"),
    ({"l0_bucket": 1 << 25}, "l0_bucket"),
    ({"dtype": "float64"}, "dtype"),
    ({"op": "backward"}, "op"),
    ({"capability": "9.0; rm -rf /"}, "capability"),
    ({"capability": None}, "impl"),  # a triton time on a CPU key
    ({"device_name": "A" * 10_000}, "device_name"),
    ({"device_name": "RTX\x1b[2J"}, "device_name"),
    ({"torch_version": "2.4.0\nimport os"}, "torch_version"),
    ({"template_hash": "../../etc/passwd"}, "template_hash"),
    ({"impl": "os.system"}, "impl"),
    ({"impl": 3}, "impl"),
    ({"ms": "0.05"}, "ms"),
    ({"ms": -1.0}, "ms"),
    ({"ms": 0}, "ms"),
    ({"ms": None}, "ms"),
    ({"ms": True}, "ms"),
    ({"dense_ms": -0.1}, "dense_ms"),
    ({"exec": "import os"}, "exec"),
    ({"provenance": {**PROV, "extra": 1}}, "provenance.extra"),
    ({"provenance": {**PROV, "date": "yesterday"}}, "provenance.date"),
    ({"provenance": {**PROV, "host_kind": "My Laptop"}}, "provenance.host_kind"),
    ({"provenance": "me"}, "provenance"),
]


@pytest.mark.parametrize(("change", "field"), HOSTILE, ids=[f for _, f in HOSTILE])
def test_hostile_record_rejected_and_nothing_stored(tmp_path, store, change, field):
    store.set_winner_if_faster(CacheKey(**CPU), "dense", {}, 7.0)
    before = comparable(store)
    records = good_records()
    records[1] = record(**change)
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(payload(records)))
    with pytest.raises(ConfigFileError) as err:
        import_file(store, path)
    assert (err.value.record, err.value.field) == (1, field)
    assert str(path) in str(err.value) and "record 1" in str(err.value) and repr(field) in str(err.value)
    assert comparable(store) == before  # all or nothing: record 0 was valid and is not stored either


def test_overflowing_float_literal_is_rejected_by_field(tmp_path, store):
    text = json.dumps(payload([record(ms=12345.0)])).replace("12345.0", "1e400")  # Python reads inf
    path = tmp_path / "inf.json"
    path.write_text(text)
    with pytest.raises(ConfigFileError) as err:
        import_file(store, path)
    assert (err.value.record, err.value.field) == (0, "ms")
    assert store.winners() == []


@pytest.mark.parametrize("missing", ["dense_ms", "config", "F", "provenance"])
def test_missing_field(missing):
    rec = record()
    del rec[missing]
    with pytest.raises(ConfigFileError) as err:
        validate_payload(payload([rec]))
    assert (err.value.record, err.value.field) == (0, missing)


def test_non_object_record():
    with pytest.raises(ConfigFileError) as err:
        validate_payload(payload([record(), ["not", "a", "record"]]))
    assert (err.value.record, err.value.field) == (1, None)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"schema": "other/configs"}, "schema"),
        ({"version": 2}, "version"),
        ({"version": "1"}, "version"),
        ({"version": True}, "version"),
        ({"records": {"0": {}}}, "records"),
        ({"provenance": {}}, "provenance.date"),
        ({"run": "me"}, "run"),
    ],
)
def test_bad_top_level(change, field):
    obj = {**payload(good_records()), **change}
    with pytest.raises(ConfigFileError) as err:
        validate_payload(obj)
    assert (err.value.record, err.value.field) == (None, field)


def test_newer_version_says_so():
    with pytest.raises(ConfigFileError, match="newer sae-tune"):
        validate_payload({**payload([]), "version": 2})


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00binary", "not UTF-8"),
        (b"import os; os.system('rm -rf /')", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"schema": "sae-tune/configs", "schema": "x"}', "duplicate key"),
        (b'{"ms": NaN}', "NaN"),
        (b'{"ms": -Infinity}', "Infinity"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"F": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_unparseable_files(tmp_path, store, data, needle):
    path = tmp_path / "bad.json"
    path.write_bytes(data)
    with pytest.raises(ConfigFileError, match=needle) as err:
        import_file(store, path)
    assert str(path) in str(err.value)
    assert store.winners() == []


def test_huge_file_is_refused_without_reading_it_all(tmp_path, store):
    path = tmp_path / "huge.json"
    with path.open("wb") as fh:
        fh.truncate(MAX_FILE_BYTES + 10)  # sparse: cheap to make
    with pytest.raises(ConfigFileError, match="16 MiB"):
        import_file(store, path)


def test_missing_file(tmp_path, store):
    with pytest.raises(ConfigFileError, match="cannot read"):
        import_file(store, tmp_path / "nope.json")


def test_parse_json_accepts_plain_json():
    assert parse_json('{"a": [1, 2.5, null, true]}') == {"a": [1, 2.5, None, True]}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None, database=None)
@given(field=st.sampled_from((*share.RECORD_FIELDS, *share.OPTIONAL_RECORD_FIELDS)), value=JSON)
def test_fuzzed_field_is_accepted_or_cleanly_rejected(field, value):
    """Any JSON value in any field either validates, or raises ConfigFileError naming that field."""
    rec = record(**{field: value})
    try:
        (out,) = validate_payload(payload([rec]))
    except ConfigFileError as err:
        assert err.record == 0
        assert err.field is not None
        # capability -> impl (a triton time on a CPU key); impl -> config (config of another impl)
        allowed = {field, "impl"} | ({"config"} if field == "impl" else set())
        assert err.field.split(".")[0] in allowed
        return
    again = share.record_to_dict(out)  # what we accept exports back to something we accept
    assert validate_payload(payload([again]))[0] == out


# --- shipped per-GPU files ----------------------------------------------------------------------------


def test_package_shipped_folder_holds_only_measured_files():
    assert (SHIPPED_DIR / "README.md").is_file()
    for path in SHIPPED_DIR.glob("*.json"):
        assert load_file(path, source="shipped")  # every shipped file validates and is not empty


def test_package_shipped_folder_loads_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = load_shipped()
    assert all(r.provenance.source == "shipped" for r in records)


def test_shipped_dir_env_override_skips_bad_files(tmp_path, monkeypatch):
    folder = tmp_path / "shipped"
    folder.mkdir()
    (folder / "NVIDIA_GeForce_RTX_4090.json").write_text(json.dumps(payload(good_records())))
    bad = copy.deepcopy(payload(good_records()))
    bad["records"][0]["config"]["block_d"] = "128; import os"
    (folder / "evil.json").write_text(json.dumps(bad))
    (folder / "notes.txt").write_text("ignored")
    monkeypatch.setenv("SAE_TUNE_SHIPPED_DIR", str(folder))
    with pytest.warns(ShippedConfigWarning, match="evil.json") as caught:
        records = load_shipped()
    assert len(caught) == 1 and "field 'config'" in str(caught[0].message)
    assert len(records) == 3 and {r.provenance.source for r in records} == {"shipped"}
    with pytest.warns(ShippedConfigWarning):
        gpu_only = load_shipped(device_name="NVIDIA GeForce RTX 4090")
    assert {r.key.device_name for r in gpu_only} == {"NVIDIA GeForce RTX 4090"} and len(gpu_only) == 2


def test_shipped_missing_folder_warns(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_TUNE_SHIPPED_DIR", str(tmp_path / "absent"))
    with pytest.warns(ShippedConfigWarning, match="does not exist"):
        assert load_shipped() == []
