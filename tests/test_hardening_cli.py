"""A user's mistake on the command line is a usage error (exit 2) that names the option, never a
traceback; options that do not apply are refused; progress goes to stderr, JSON alone to stdout."""

import inspect
import json

import pytest
from click.testing import CliRunner

from sae_tune.cache.store import Store
from sae_tune.cli import tune as tune_cli
from sae_tune.cli.main import main

SHAPE = ["--width", "64", "--d-model", "8", "--l0", "4"]
SMALL = ["--width", "2048", "--d-model", "32", "--l0", "8", "--device", "cpu", "--trials", "2"]


def runner() -> CliRunner:
    if "mix_stderr" in inspect.signature(CliRunner).parameters:  # click < 8.2
        return CliRunner(mix_stderr=False)
    return CliRunner()


def sae_dir(root, cfg, name="sae"):
    path = root / name
    path.mkdir()
    (path / "cfg.json").write_text(json.dumps(cfg))
    return path


def bad_values(tmp):
    """(arguments, the option the message must name) for every option of the commands this covers."""
    a_file = tmp / "a_file"
    a_file.write_text("x")
    wrong_width = tmp / "acts.npy"
    import numpy as np

    np.save(wrong_width, np.zeros((4, 10), dtype=np.float32))
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"not a tensor")
    return [
        # the main job
        (["--device", "tpu", *SHAPE], "--device"),
        (["--device", "cuda:99", *SHAPE], "--device"),
        (["--storage", "bogus://x", *SHAPE], "--storage"),
        (["--storage", "journal:/missing/dir/x.log", *SHAPE], "--storage"),
        (["--storage", f"journal:{tmp}", *SHAPE], "--storage"),
        (["--storage", "sqlite:////missing/dir/x.db", *SHAPE], "--storage"),
        (["--storage", "nonsense", *SHAPE], "--storage"),
        (["--cache", str(a_file / "c.sqlite"), *SHAPE], "--cache"),
        (["--sae", "./no/such/sae"], "--sae"),
        (["--sae", "~/no-such-sae-dir"], "--sae"),
        (["--sae", str(a_file)], "--sae"),
        (["--sae", "gemma-2b-l99"], "--sae"),
        (["--sae", "gemma-2b-l20", "--k", "5"], "--k"),
        (["--sae", "gemma-2b-l20", "--arch", "topk"], "--arch"),
        (["--sae", "qwen3.5-2b-topk50", "--arch", "jumprelu"], "--arch"),
        (["--sae", "qwen3.5-2b-topk50", "--l0", "20"], "--l0"),
        (["--sae", "qwen3.5-2b-topk50", "--k", "40000"], "--k"),
        (["--sae", "gemma-2b-l20", "--l0", "70000"], "--l0"),
        (["--sae", "gemma-2b-l20", "--d-model", "5"], "--d-model"),
        (["--sae", "gemma-2b-l20", "--width", "5"], "--width"),
        ([*SHAPE, "--k", "3"], "--k"),
        (["--width", "64", "--d-model", "8", "--l0", "100"], "--l0"),
        (["--width", "64", "--d-model", "8", "--arch", "topk", "--k", "3", "--l0", "5"], "--l0"),
        (["--width", "64", "--d-model", "8", "--arch", "topk", "--k", "65"], "--k"),
        (["--width", "64"], "--d-model"),
        (["--width", "0", "--d-model", "8", "--l0", "4"], "--width"),
        (["--arch", "gated", *SHAPE], "--arch"),
        (["--dtype", "int8", *SHAPE], "--dtype"),
        (["--batch-size", "0", *SHAPE], "--batch-size"),
        (["--batch-size", str(10**14), *SHAPE], "--batch-size"),
        (["--width", str(10**13), "--d-model", "8", "--l0", "4"], "--width"),
        (["--trials", "0", *SHAPE], "--trials"),
        (["--time-budget", "0", *SHAPE], "--time-budget"),
        (["--seed", "-1", *SHAPE], "--seed"),
        (["--acts", str(tmp / "missing.pt"), *SHAPE], "--acts"),
        (["--acts", str(garbage), *SHAPE], "--acts"),
        (["--acts", str(wrong_width), *SHAPE], "--acts"),
        (["--sae", "gemma-2b-l20", "list"], "--sae"),
        (["--l0", "4"], "--sae"),
        # show-kernel
        (["show-kernel", "--block-d", "100"], "--block-d"),
        (["show-kernel", "--num-warps", "3"], "--num-warps"),
        (["show-kernel", "--alloc", "exact", "--max-l0", "64"], "--max-l0"),
        (["show-kernel", "--overflow", "ignore"], "--overflow"),
        # compile-check (checked before it looks for a real Triton)
        (["compile-check", "--arch", "sm_1"], "--arch"),
        (["compile-check", "--width", "1", "--d-model", "1"], "--width"),
        (["compile-check", "--dtype", "float64"], "--dtype"),
        # bench (checked before it measures anything)
        (["bench", "--device", "tpu"], "--device"),
        (["bench", "--device", "cuda:0"], "--device"),
        (["bench", "--out", str(a_file)], "--out"),
        (["bench", "--out", str(a_file / "sub")], "--out"),
    ]


def test_every_bad_value_is_a_usage_error_naming_its_option(tmp_path):
    cases = bad_values(tmp_path)
    for args, option in cases:
        if args[0] not in ("show-kernel", "compile-check", "bench") and "--cache" not in args:
            args = [*args, "--cache", str(tmp_path / "c.sqlite")]
        result = runner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert isinstance(result.exception, SystemExit), (args, result.exception)
        assert "Traceback" not in result.output and option in result.stderr, (args, result.stderr)
        assert "Error:" in result.stderr and "Error:" not in result.stdout, (args, result.stdout)


def test_a_missing_sae_path_is_not_called_an_unknown_preset():
    result = runner().invoke(main, ["--sae", "./checkpoints/my-sae"])
    assert result.exit_code == 2 and "no such directory: ./checkpoints/my-sae" in result.stderr
    assert "preset" not in result.stderr


def test_k_on_a_topk_preset_sets_its_k_and_l0(tmp_path):
    resolved = tune_cli.resolve_spec("qwen3.5-2b-topk50", None, None, None, None, 32)
    assert (resolved.spec.k, resolved.spec.l0, resolved.spec.arch) == (32, 32, "topk")
    same = tune_cli.resolve_spec("qwen3.5-2b-topk50", None, None, None, "topk", None)
    assert (same.spec.k, same.l0_source) == (50, "preset qwen3.5-2b-topk50")


def test_assumed_l0_of_a_saelens_dir_is_said_on_stderr_and_in_json(tmp_path):
    path = sae_dir(tmp_path, {"d_in": 32, "d_sae": 2048, "architecture": "gated"})
    args = ["--sae", str(path), "--device", "cpu", "--trials", "1", "--batch-size", "2"]
    result = runner().invoke(main, [*args, "--cache", str(tmp_path / "c.sqlite"), "--json"])
    assert result.exit_code == 0, result.output
    assert "assumed L0=4" in result.stderr and "give --l0" in result.stderr
    payload = json.loads(result.stdout)
    assert payload["l0"] == 4 and payload["l0_assumed"] is True and payload["arch"] == "relu"
    assert "cfg.json states no L0" in payload["l0_source"]
    given = runner().invoke(main, [*args, "--l0", "6", "--cache", str(tmp_path / "c.sqlite"), "--json"])
    assert given.exit_code == 0 and "assumed" not in given.stderr
    assert json.loads(given.stdout)["l0"] == 6 and json.loads(given.stdout)["l0_assumed"] is False


def test_progress_lines_go_to_stderr_and_json_stays_parseable(tmp_path):
    result = runner().invoke(
        main, [*SMALL, "--batch-size", "4", "--batch-size", "8", "--cache", str(tmp_path / "c"), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert [r["batch_size"] for r in json.loads(result.stdout)["results"]] == [4, 8]
    lines = result.stderr.splitlines()
    for b in (4, 8):
        for phase in ("baselines", "search", "final re-timing", "done"):
            assert any(
                f"B={b}: {phase}" in line and line.startswith("[") and " s] " in line for line in lines
            )


def test_the_bar_stays_on_stderr_with_json_on_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(tune_cli, "stderr_is_terminal", lambda: True)
    result = runner().invoke(main, [*SMALL, "--batch-size", "4", "--cache", str(tmp_path / "c"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["batch_size"] == 4
    assert "trial" in result.stderr and "B=4" in result.stderr  # tqdm's bar
    assert "] B=4: baselines" not in result.stderr  # the bar replaces the phase lines


def test_progress_lines_for_the_table_too(tmp_path):
    result = runner().invoke(main, [*SMALL, "--batch-size", "2", "--cache", str(tmp_path / "c")])
    assert result.exit_code == 0
    assert "B=2: search" in result.stderr and "B=2: search" not in result.stdout
    assert "winner" in result.stdout


def test_a_cache_that_becomes_unusable_while_tuning_is_a_usage_error(tmp_path, monkeypatch):
    from sae_tune.cache.store import CacheError

    def refuse(self, *args, **kwargs):
        raise CacheError(f"sae-tune cache {self.path} is read-only")

    monkeypatch.setattr(Store, "record_trial", refuse)
    result = runner().invoke(main, [*SMALL, "--batch-size", "2", "--cache", str(tmp_path / "c.sqlite")])
    assert result.exit_code == 2 and "'--cache'" in result.stderr and "read-only" in result.stderr
    assert isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("args", [["--sae", "gemma-2b-l20"], ["--dtype", "float16"]])
def test_main_job_options_before_a_subcommand_are_refused(args):
    result = runner().invoke(main, [*args, "list"])
    assert result.exit_code == 2 and args[0] in result.stderr and "list" in result.stderr


def test_compile_check_prints_a_line_per_architecture_on_stderr(monkeypatch):
    """Off a terminal compile-check says what it compiles; its JSON on stdout stays parseable."""
    import sae_tune.targets.triton.compile_check as compile_mod
    import sae_tune.targets.triton.support as support

    def fake_compile_check(space, arch, dtype, progress, F=None, D=None):
        return [
            compile_mod.CompileResult(
                v.name, arch, "float32", True, (compile_mod.KernelUsage("k", 32, 0, 1024),)
            )
            for v in progress(space[:2])
        ]

    monkeypatch.setattr(compile_mod, "compile_check", fake_compile_check)
    monkeypatch.setattr(support, "interpreter_active", lambda: False)
    monkeypatch.setattr(support, "triton_installed", lambda: True)
    args = ["compile-check", "--arch", "sm_80", "--arch", "sm_90", "--width", "4096", "--d-model", "256"]
    result = runner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 4
    assert "compile sm_80:" in result.stderr and "compile sm_90:" in result.stderr
    assert "compile-check done" in result.stderr


def test_an_unsafe_kernel_folder_is_a_clear_error_not_a_traceback_or_failed_trials(tmp_path, monkeypatch):
    """A kernel folder others can write to is refused by name: show-kernel --path and the tuner stop with
    the reason instead of a traceback or one failed trial per generated candidate."""
    from sae_tune.targets.cpu.launch import forget_built

    shared = tmp_path / "shared-kernels"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("SAE_TUNE_KERNEL_DIR", str(shared))
    forget_built()  # kernels loaded earlier in this process would not touch the folder again
    runner = CliRunner()
    shown = runner.invoke(main, ["show-kernel", "--path"])
    assert shown.exit_code == 1 and "writable by group or others" in shown.output, shown.output
    assert shown.exception is None or isinstance(shown.exception, SystemExit)
    args = ["--width", "2048", "--d-model", "32", "--l0", "8", "--batch-size", "8", "--trials", "3"]
    tuned = runner.invoke(main, [*args, "--device", "cpu", "--cache", str(tmp_path / "c.sqlite")])
    assert tuned.exit_code == 1 and "writable by group or others" in tuned.output, tuned.output
    assert tuned.exception is None or isinstance(tuned.exception, SystemExit)
