"""Light commands stay light, and a user's mistake reaches the CLI user as one line, never a traceback.

``sae-tune --help``, ``sae-tune list`` and every ``--help`` import no torch, numpy, pandas, Triton or
Optuna (checked in a fresh interpreter, command by command); ``import sae_tune`` stays light and still
exports its names. Errors meant for the user (FieldError, CacheError, ...) that reach the command line
are ``Error: <message>`` with exit status 1 (2 where the command cannot run as given).
"""

import dataclasses
import json
import os
import re
import sqlite3
import subprocess
import sys

import pytest
from click.testing import CliRunner
from conftest import make_key

from sae_tune.cache.store import DTYPES, CacheError, CacheReadOnlyError, FieldError, Store
from sae_tune.cli.main import main
from sae_tune.targets import GENERATED
from sae_tune.targets.triton.variant import ALLOCS, OVERFLOWS, Variant

HEAVY = ("torch", "numpy", "pandas", "pyarrow", "sqlite_utils", "triton", "optuna", "sae_lens")

# every help of the command line, then `list` and `--version`, each run in-process in one fresh
# interpreter; prints what each one left in sys.modules of HEAVY, and its output
LIGHT_RUNS = """
import contextlib, io, json, sys
import click
from sae_tune.cli.main import main
argvs = [["--help"], ["list"], ["--version"]]
for name in sorted(main.commands):
    argvs.append([name, "--help"])
    command = main.commands[name]
    if isinstance(command, click.Group):
        argvs += [[name, sub, "--help"] for sub in sorted(command.commands)]
report = []
for argv in argvs:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv, prog_name="sae-tune", standalone_mode=False)
        except SystemExit:
            pass
    heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    report.append({"argv": argv, "heavy": heavy, "output": out.getvalue()})
print(json.dumps(report))
"""


def run_fresh(script: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "SAE_TUNE_AUTOPATCH"}
    proc = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n" + script],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "100"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def light_runs() -> dict[str, dict]:
    return {" ".join(r["argv"]): r for r in json.loads(run_fresh(LIGHT_RUNS))}


def test_help_list_and_every_subcommand_help_import_nothing_heavy_and_say_the_same(light_runs):
    assert {"--help", "list", "show-kernel --help", "cache --help", "cache show --help"} <= set(light_runs)
    heavy = {argv: r["heavy"] for argv, r in light_runs.items() if r["heavy"]}
    assert not heavy, f"commands that need no tensor imported {heavy}"
    assert "gemma-2b-l20" in light_runs["list"]["output"]
    assert "compile-check" in light_runs["--help"]["output"]
    # the options spell out defaults, targets and dtypes to stay light: they must be the kernels' own
    text = " ".join(light_runs["show-kernel --help"]["output"].split())
    defaults = dataclasses.asdict(Variant())
    for field in ("alloc", "block_f", "block_d", "block_l", "num_warps", "num_warps_build", "num_stages"):
        flag = "--" + field.replace("_", "-")
        assert re.search(rf"{flag} \S+ \[default: {defaults[field]}\]", text), flag
    for field in ("overflow", "max_l0", "chunk_slots", "unit_chunks"):
        flag = "--" + field.replace("_", "-")
        assert re.search(rf"{flag} \S+ --alloc \w+ only[^\[]*\[default: {defaults[field]}\]", text), flag
    assert f"[{'|'.join(ALLOCS)}]" in text and f"[{'|'.join(OVERFLOWS)}]" in text
    assert f"--target [{'|'.join(t.name for t in GENERATED)}]" in text
    assert f"--dtype [{'|'.join(DTYPES)}]" in text


def test_import_sae_tune_is_light_and_keeps_its_names():
    out = run_fresh(
        "import sys\nimport sae_tune\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & set(HEAVY))\n"
        "active = sae_tune.integrations.is_active()\n"
        "names = {n: type(getattr(sae_tune, n)).__name__ for n in sae_tune.__all__}\n"
        "import sae_tune.decode, sae_tune.dispatch\n"
        "same = sae_tune.sparse_decode is sae_tune.decode.sparse_decode and sae_tune.explain is "
        "sae_tune.dispatch.explain\n"
        "print(heavy, active, same, set(sae_tune.__all__) <= set(dir(sae_tune)), hasattr(sae_tune, 'nope'))\n"
        "print(names['sparse_decode'], names['Variant'], names['SparseActs'], names['patch'])\n"
    )
    assert out == "[] True True True False\nfunction type type function\n"


# --- a user's mistake is one line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, option",
    [
        (["--width", "1", "--d-model", str((1 << 18) + 1), "--l0", "1"], "--d-model"),
        (["--width", str((1 << 26) + 1), "--d-model", "1", "--l0", "1"], "--width"),
        (["--width", "2", "--d-model", "1", "--l0", "1", "--batch-size", str((1 << 24) + 1)], "--batch-size"),
    ],
    ids=["d-model", "width", "batch-size"],
)
def test_a_shape_or_batch_the_cache_cannot_key_is_a_usage_error_before_tuning(tmp_path, args, option):
    cache = tmp_path / "cache.sqlite"
    result = CliRunner().invoke(main, [*args, "--device", "cpu", "--trials", "1", "--cache", str(cache)])
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2 and f"'{option}'" in result.output, result.output
    assert "the cache can key" in result.output and not cache.exists()  # refused before any measuring


def damaged(tmp_path, name: str, sql: str):
    """A cache with one valid winner, then edited behind sae-tune's back with ``sql``."""
    path = tmp_path / f"{name}.sqlite"
    with Store(path) as store:
        store.set_winner_if_faster(make_key(), "embedding_bag_csr", {}, 1.5, dense_ms=30.0)
    with sqlite3.connect(path) as conn:
        conn.execute(sql)
    return path


@pytest.mark.parametrize(
    "sql, words",
    [
        ("UPDATE winners SET ms = 'abc'", "invalid row in winners: ms: not a number: 'abc'"),
        ("UPDATE winners SET dense_ms = 'x'", "invalid row in winners: dense_ms"),
        ("UPDATE winners SET F = -5", "invalid row in winners: F: must be in"),
        ("UPDATE winners SET recorded_at = 'yesterday'", "invalid row in winners: provenance.date"),
    ],
    ids=["ms", "dense_ms", "F", "date"],
)
@pytest.mark.parametrize("command", [["cache", "show"], ["cache", "show", "--json"], ["cache", "export"]])
def test_a_damaged_cache_row_is_a_one_line_error(tmp_path, sql, words, command):
    path = damaged(tmp_path, "damaged", sql)
    out = tmp_path / "out.json"
    args = [*command, "--cache", str(path)] + (["-o", str(out)] if "export" in command else [])
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1 and words in result.output, result.output
    assert result.output.startswith("Error: ") and len(result.output.splitlines()) == 1
    assert not out.exists()


def test_export_of_a_stored_winner_a_config_file_may_not_hold_is_one_line(tmp_path):
    path = damaged(tmp_path, "config", "UPDATE winners SET config = '{\"block_q\": 3}'")
    out = tmp_path / "out.json"
    result = CliRunner().invoke(main, ["cache", "export", "--cache", str(path), "-o", str(out)])
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1 and "cannot export" in result.output and "block_q" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "error, status",
    [
        (FieldError("F", "must be in [1, 67108864], got 0"), 1),
        (CacheError("sae-tune cache x: damaged"), 1),
        (CacheReadOnlyError("sae-tune cache x: not writable by this user"), 2),
    ],
    ids=["FieldError", "CacheError", "CacheReadOnlyError"],
)
def test_a_user_error_no_command_caught_is_one_line_not_a_traceback(monkeypatch, error, status):
    import sae_tune.specs

    def fail():
        raise error

    monkeypatch.setattr(sae_tune.specs, "list_specs", fail)
    result = CliRunner().invoke(main, ["list"])
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == status and result.output == f"Error: {error}\n"
    error = KeyError("a bug")  # only the errors meant for the user become a line: a bug stays visible
    assert isinstance(CliRunner().invoke(main, ["list"]).exception, KeyError)


@pytest.mark.parametrize(
    "content", [b"not a journal\n", b"\x00\xff binary", b'{"a": 1}\n'], ids=["text", "binary", "other-json"]
)
def test_a_storage_file_that_is_not_an_optuna_journal_is_refused_and_left_alone(tmp_path, content):
    path = tmp_path / "notes.log"
    path.write_bytes(content)
    args = ["--width", "8", "--d-model", "4", "--l0", "1", "--device", "cpu", "--trials", "1"]
    args += ["--batch-size", "1", "--cache", str(tmp_path / "c.sqlite"), "--storage", f"journal:{path}"]
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert (
        result.exit_code == 2 and "'--storage'" in result.output and "not an Optuna journal" in result.output
    )
    assert path.read_bytes() == content
