import json

from click.testing import CliRunner
from conftest import make_key

from sae_tune.cache.store import CacheKey, Store
from sae_tune.cli.main import main


def key(batch_bucket: int = 32) -> CacheKey:
    return make_key(device_name="Test GPU", capability="9.0", F=65536, batch_bucket=batch_bucket)


def populated(path):
    with Store(path) as store:
        store.set_winner_if_faster(key(32), "embedding_bag_csr", {"chunk": 16}, 1.5, dense_ms=30.0)
        store.set_winner_if_faster(key(1), "triton", {"alloc": "exact", "block_d": 128}, 0.05, dense_ms=2.0)
    return path


def run(*args):
    return CliRunner().invoke(main, list(args))


def test_export_import_round_trip_into_an_empty_cache(tmp_path):
    src = populated(tmp_path / "src.sqlite")
    out = tmp_path / "configs.json"
    assert run("cache", "export", "--cache", str(src), "-o", str(out)).exit_code == 0
    payload = json.loads(out.read_text())
    assert payload["schema"] and payload["version"] == 1 and len(payload["records"]) == 2
    assert "provenance" in payload and "date" in payload["records"][0]["provenance"]
    dst = tmp_path / "dst.sqlite"
    result = run("cache", "import", "--cache", str(dst), str(out))
    assert result.exit_code == 0 and "2 added, 0 updated" in result.output
    with Store(src) as a, Store(dst) as b:
        strip = [(w.key, w.impl, w.config, w.ms, w.dense_ms) for w in a.winners()]
        assert strip == [(w.key, w.impl, w.config, w.ms, w.dense_ms) for w in b.winners()]
    # importing again changes nothing; a slower record never replaces a faster one
    assert "0 added, 0 updated, 2 unchanged" in run("cache", "import", "--cache", str(dst), str(out)).output


def test_export_of_one_device_ignores_case_and_refuses_unknown_names(tmp_path):
    src = populated(tmp_path / "src.sqlite")
    out = tmp_path / "one.json"
    assert run("cache", "export", "--cache", str(src), "--device", "test gpu", "-o", str(out)).exit_code == 0
    assert {r["device_name"] for r in json.loads(out.read_text())["records"]} == {"Test GPU"}
    none = tmp_path / "none.json"
    result = run("cache", "export", "--cache", str(src), "--device", "Other GPU", "-o", str(none))
    assert result.exit_code == 2 and "'Other GPU'" in result.output and "'Test GPU'" in result.output
    assert not none.exists() and "Traceback" not in result.output


def test_hostile_and_malformed_files_are_rejected_and_store_nothing(tmp_path):
    src = populated(tmp_path / "src.sqlite")
    good = tmp_path / "good.json"
    run("cache", "export", "--cache", str(src), "-o", str(good))
    payload = json.loads(good.read_text())
    variants = []
    for field, value in [
        ("block_d", "128)\nimport os  #"),
        ("block_d", "128"),
        ("block_d", 100),
        ("alloc", "exact; rm -rf /"),
        ("extra", 1),
    ]:
        bad = json.loads(json.dumps(payload))
        bad["records"][1]["config"][field] = value
        variants.append((f"config.{field}", bad))
    bad = json.loads(json.dumps(payload))
    bad["records"][0]["F"] = "65536"
    variants.append(("F", bad))
    bad = json.loads(json.dumps(payload))
    bad["records"][0]["ms"] = -1
    variants.append(("ms", bad))
    dst = tmp_path / "dst.sqlite"
    for i, (field, obj) in enumerate(variants):
        path = tmp_path / f"bad{i}.json"
        path.write_text(json.dumps(obj))
        result = run("cache", "import", "--cache", str(dst), str(path))
        assert result.exit_code == 1, (field, result.output)
        assert field.split(".")[-1] in result.output, (field, result.output)
    (tmp_path / "junk.json").write_text("{not json")
    assert run("cache", "import", "--cache", str(dst), str(tmp_path / "junk.json")).exit_code == 1
    with Store(dst) as store:
        assert store.winners() == []


def test_show_and_clear(tmp_path):
    src = populated(tmp_path / "src.sqlite")
    shown = run("cache", "show", "--cache", str(src))
    assert shown.exit_code == 0 and "embedding_bag_csr" in shown.output and "20.00x" in shown.output
    assert "L0 bucket" in run("cache", "show", "--cache", str(src), "--wide").output
    as_json = json.loads(run("cache", "show", "--cache", str(src), "--json").output)
    assert as_json["winners"] == 2 and len(as_json["winners_list"]) == 2
    assert run("cache", "clear", "--cache", str(src), "--yes").exit_code == 0
    with Store(src) as store:
        assert store.winners() == []


def test_cache_commands_on_a_foreign_file(tmp_path):
    import sqlite3

    path = tmp_path / "foreign.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    before = path.read_bytes()
    result = run("cache", "show", "--cache", str(path))
    assert result.exit_code == 1 and str(path) in result.output
    assert path.read_bytes() == before
