"""Progress on stderr for every long step (sae_tune.progress): a bar on a terminal, else a line at most every
SAE_TUNE_PROGRESS_INTERVAL seconds with done/total and an estimate; stdout (tables, JSON) stays as it was."""

import io
import os
import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from sae_tune.progress import INTERVAL_ENV, Progress, ProgressSettingError, duration, progress_interval

# a progress line: "<desc>: 3/10 <unit>s, 12.0 s elapsed, about 28.0 s left"
LINE = re.compile(r"^(?P<desc>.+): (?P<done>\d+)/(?P<total>\d+) \w+, (?P<elapsed>.+) elapsed, (?P<eta>.+)$")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def piped(total=10, interval=5.0, **options):
    clock, stream = FakeClock(), io.StringIO()
    bar = Progress(
        total, "compile sm_90", unit="variant", stream=stream, interval=interval, clock=clock, **options
    )
    return bar, clock, stream


def test_piped_lines_carry_done_total_and_an_estimate_at_most_one_per_interval():
    bar, clock, stream = piped()
    times = []
    for step in range(10):
        clock.now += 2.0  # a variant every 2 s: a line every third variant at most (interval 5 s)
        before = stream.getvalue().count("\n")
        bar.update()
        if stream.getvalue().count("\n") > before:
            times.append(clock.now)
        assert bar.done == step + 1
    lines = stream.getvalue().splitlines()
    assert len(lines) == len(times) == 3  # at t = 6, 12, 18 s (every 5 s would allow 4 in 20 s: never more)
    assert all(b - a >= 5.0 for a, b in zip([100.0, *times], times, strict=False))
    first = LINE.match(lines[0])
    assert first and first["desc"] == "compile sm_90" and (first["done"], first["total"]) == ("3", "10")
    # 3 done in 6 s, 7 to go: about 14 s left
    assert first["elapsed"] == "6.0 s" and first["eta"] == "about 14.0 s left", lines[0]
    bar.close()
    bar.close()  # closing twice writes one closing line
    final = stream.getvalue().splitlines()[3:]
    assert final == ["compile sm_90: done, 10/10 variants in 20.0 s"]


def test_a_step_stopped_early_says_how_far_it_got_and_a_quick_one_stays_quiet():
    bar, clock, stream = piped()
    with pytest.raises(KeyError), bar:
        clock.now += 7.0
        bar.update(note="best 0.1 ms")
        raise KeyError("interrupted")
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith("about 1 min 03 s left (best 0.1 ms)"), lines
    assert lines[-1] == "compile sm_90: stopped at 1/10 variants in 7.0 s (best 0.1 ms)"
    quick, clock, stream = piped()
    with quick:
        clock.now += 1.0
        quick.update(3)
    assert stream.getvalue() == ""  # 1 s < the interval: nothing to say
    off, clock, stream = piped(interval=0.0, enabled=False)
    with off:
        clock.now += 60
        off.update()
    assert stream.getvalue() == ""


def test_interval_zero_prints_every_step_and_unknown_totals_have_no_estimate():
    bar, clock, stream = piped(total=None, interval=0.0)
    for _ in bar.wrap(["a", "b"]):
        clock.now += 1
    lines = stream.getvalue().splitlines()
    assert lines == [
        "compile sm_90: 1 variants, 1.0 s elapsed",
        "compile sm_90: 2 variants, 2.0 s elapsed",
        "compile sm_90: done, 2 variants in 2.0 s",
    ]
    assert duration(3725) == "1 h 02 min" and duration(65.4) == "1 min 05 s"


def test_on_a_terminal_it_is_a_tqdm_bar_on_that_stream():
    bar, _, stream = piped(tty=True)
    with bar:
        bar.update(3, "best 1.0 ms")
    assert "3/10" in stream.getvalue() and "best 1.0 ms" in stream.getvalue()


def test_bad_settings_are_refused_by_name(monkeypatch):
    with pytest.raises(ValueError, match="total"):
        Progress(-1, "x", stream=io.StringIO())
    with pytest.raises(ValueError, match="interval"):
        Progress(3, "x", stream=io.StringIO(), interval=-1.0)
    for bad in ("abc", "-1", "nan", "inf"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(ProgressSettingError, match=INTERVAL_ENV):
            progress_interval()
    monkeypatch.setenv(INTERVAL_ENV, "0.5")
    assert progress_interval() == 0.5
    # the command line refuses it in one line before any work, never with a traceback
    from sae_tune.cli.main import main

    monkeypatch.setenv(INTERVAL_ENV, "soon")
    result = CliRunner().invoke(main, ["compile-check", "--target", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Error: {INTERVAL_ENV}='soon'" in result.output


# --- every command family, piped, with a line per step ---------------------------------------------------


def progress_lines(stderr: str, desc: str) -> list[re.Match]:
    return [m for m in map(LINE.match, stderr.splitlines()) if m and m["desc"] == desc]


def test_selftest_reports_its_cases_on_stderr_and_stdout_is_unchanged(monkeypatch):
    from sae_tune.cli import selftest as selftest_mod
    from sae_tune.cli.main import main

    real_cases, real_encodes = selftest_mod.cases, selftest_mod.encode_cases
    monkeypatch.setattr(selftest_mod, "cases", lambda full: list(real_cases(full))[:2])
    monkeypatch.setattr(selftest_mod, "encode_cases", lambda dev: real_encodes(dev)[:2])
    monkeypatch.setenv(INTERVAL_ENV, "0")
    result = CliRunner().invoke(main, ["selftest", "--device", "cpu", "--no-tune"])
    assert result.exit_code == 0, result.output
    for desc in ("selftest correctness", "selftest encode"):
        lines = progress_lines(result.stderr, desc)
        assert [(m["done"], m["total"]) for m in lines] == [("1", "2"), ("2", "2")], result.stderr
        assert f"{desc}: done, 2/2 cases in " in result.stderr
    stdout = result.stdout.splitlines()
    assert len(stdout) == 4 and stdout[0].startswith("selftest on cpu") and stdout[-1] == "verdict: PASS"
    assert stdout[1].startswith("correctness: 2 of 2 cases (")
    assert stdout[2].startswith("encode: 2 of 2 cases (")


def test_compile_check_reports_every_variant_compiled(monkeypatch):
    """Decode (the compile faked: the loop is what is checked) in process; the encode with real ptxas, one
    variant, in a child process without the interpreter."""
    from sae_tune.cli.main import main
    from sae_tune.targets.triton import compile_check as compile_mod
    from sae_tune.targets.triton import support

    def fake_compile_check(space, arch, dtype, progress, F=None, D=None):
        usage = (compile_mod.KernelUsage("k", 32, 0, 1024),)
        return [compile_mod.CompileResult(v.name, arch, "float32", True, usage) for v in progress(space[:3])]

    monkeypatch.setattr(compile_mod, "compile_check", fake_compile_check)
    monkeypatch.setattr(support, "interpreter_active", lambda: False)
    monkeypatch.setattr(support, "triton_installed", lambda: True)
    monkeypatch.setenv(INTERVAL_ENV, "0")
    args = ["compile-check", "--arch", "sm_80", "--arch", "sm_90", "--width", "4096", "--d-model", "256"]
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    for arch in ("sm_80", "sm_90"):
        lines = progress_lines(result.stderr, f"compile {arch}")
        assert [(m["done"], m["total"]) for m in lines] == [("1", "3"), ("2", "3"), ("3", "3")]
        assert "left" in lines[0]["eta"] and f"compile {arch}: done, 3/3 variants" in result.stderr
    assert len(__import__("json").loads(result.stdout)) == 6  # stdout: the JSON only

    code = (
        "import sys; import sae_tune.targets.triton.encode as e; "
        "e.all_variants = lambda dtype: (e.EncodeVariant(block_m=16, block_n=32, block_k=16, slots=2, "
        "num_warps=1),); from sae_tune.cli.main import main; "
        "sys.argv = ['sae-tune', 'compile-check', '--op', 'encode', '--arch', 'sm_90', '--dtype', "
        "'float16']; main()"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {INTERVAL_ENV: "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = progress_lines(done.stderr, "compile sm_90 encode")
    assert [(m["done"], m["total"]) for m in lines] == [("1", "1")], done.stderr
    assert "compile sm_90 encode: done, 1/1 variants in " in done.stderr
    (row,) = done.stdout.splitlines()
    assert row.startswith("sm_90  enc-m16-n32-k16") and " ok " in row  # stdout: the table only


def test_tune_reports_trials_and_encode_checks_on_stderr_only(tmp_path, monkeypatch):
    from sae_tune.cli.main import main

    monkeypatch.setenv(INTERVAL_ENV, "0")
    args = ["--width", "512", "--d-model", "32", "--l0", "8", "--device", "cpu", "--trials", "2"]
    result = CliRunner().invoke(main, [*args, "--batch-size", "2", "--cache", str(tmp_path / "c.sqlite")])
    assert result.exit_code == 0, result.output
    trials = progress_lines(result.stderr, "B=2: search")
    assert [(m["done"], m["total"]) for m in trials] == [("1", "2"), ("2", "2")], result.stderr
    assert "(best " in trials[0]["eta"]
    checks = progress_lines(result.stderr, "encode B=2: checks")
    assert checks and checks[0]["done"] == "1" and checks[-1]["done"] == checks[-1]["total"]
    assert "elapsed" not in result.stdout and any(
        line.startswith("B  ") for line in result.stdout.splitlines()
    )


def test_bench_reports_tables_done_on_stderr(tmp_path, monkeypatch):
    from test_bench import TINY

    from sae_tune.bench.runner import run_bench
    from sae_tune.cli.bench import bench_command

    monkeypatch.setattr("sae_tune.bench.QUICK", TINY)
    monkeypatch.setenv(INTERVAL_ENV, "0")
    args = ["--quick", "--device", "cpu", "--table", "summary", "--table", "peak_memory"]
    result = CliRunner().invoke(bench_command, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    lines = progress_lines(result.stderr, "bench")
    assert [(m["done"], m["total"]) for m in lines] == [("1", "2"), ("2", "2")], result.stderr
    assert "bench: done, 2/2 tables in " in result.stderr and "elapsed" not in result.stdout
    # a library call shows progress only when asked
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    run_bench(TINY, torch.device("cpu"), tables=("summary",))
    assert stream.getvalue() == ""


def test_selftest_quick_tune_reports_its_trials(monkeypatch, capsys):
    from sae_tune.cli import selftest as selftest_mod

    monkeypatch.setenv(INTERVAL_ENV, "0")
    summary = selftest_mod.quick_tune(torch.device("cpu"), 5.0)
    err = capsys.readouterr().err
    trials = [m for m in map(LINE.match, err.splitlines()) if m and m["desc"].startswith("selftest tune B=8")]
    assert trials and trials[0]["done"] == "1" and trials[0]["total"] == "4", err
    assert "search" in trials[0]["desc"] and "elapsed" not in summary


def test_a_noisy_final_re_timing_says_each_repeat(tmp_path, monkeypatch):
    from sae_tune.autotune import search
    from sae_tune.autotune.candidates import Candidate
    from sae_tune.autotune.timing import NOISY_RETRIES, Timing
    from sae_tune.cache.store import Store
    from sae_tune.specs import spec_from_shape

    calls = []

    def noisy_then_quiet(runs, device):
        calls.append(1)
        samples = (0.1, 1.0, 9.0, 20.0) if len(calls) == 1 else (1.0, 1.0, 1.01, 1.0)
        return {label: Timing(1.0, samples) for label in runs}

    monkeypatch.setattr(search, "time_interleaved", noisy_then_quiet)
    phases: list[str] = []
    with Store(tmp_path / "c.sqlite") as store:
        tuner = search.Tuner(spec_from_shape(256, 16, 4), store=store, phase=phases.append)
        work = tuner.workload(2)
        dense = Candidate.of("dense", {})
        best, final = tuner._final({dense: 1.0}, work, ["dense"], "B=2")
    assert best == dense and len(calls) == 2 and not final[dense].noisy
    assert phases == [f"B=2: final re-timing was noisy, run 2 of up to {NOISY_RETRIES + 1}"]
