"""Nothing measured is lost when a bench run stops: each table is written as soon as it is done (through a
temporary file and a rename), the run says where on start, and --resume measures only the tables the
folder does not hold yet."""

import csv
import inspect

import pytest
from click.testing import CliRunner
from test_bench import TINY

from sae_tune.bench import tables as bench_tables
from sae_tune.bench.output import OutputError, write_atomic
from sae_tune.bench.report import HEADINGS
from sae_tune.cli.bench import bench_command

CHOSEN = ("summary", "kernel_vs_pipeline", "l0_sweep")
ARGS = ["--quick", "--device", "cpu", *(a for t in CHOSEN for a in ("--table", t))]


def runner() -> CliRunner:
    """stdout and stderr apart (click < 8.2 needs mix_stderr=False for that)."""
    if "mix_stderr" in inspect.signature(CliRunner).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()


@pytest.fixture
def calls(monkeypatch):
    """The tiny configuration, with every chosen table's runner counting its calls."""
    monkeypatch.setattr("sae_tune.bench.QUICK", TINY)
    called: list[str] = []
    for name in CHOSEN:
        real = bench_tables.RUNNERS[name]

        def counted(ctx, real=real, name=name):
            called.append(name)
            return real(ctx)

        monkeypatch.setitem(bench_tables.RUNNERS, name, counted)
    return called


def interrupt_second_table(monkeypatch, called):
    def stop(ctx):
        called.append("kernel_vs_pipeline")
        raise KeyboardInterrupt

    monkeypatch.setitem(bench_tables.RUNNERS, "kernel_vs_pipeline", stop)


def csv_rows(path):
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_a_stopped_run_keeps_its_first_table_and_resume_measures_only_the_rest(monkeypatch, tmp_path, calls):
    out = tmp_path / "o"
    counted_second = bench_tables.RUNNERS["kernel_vs_pipeline"]
    interrupt_second_table(monkeypatch, calls)
    stopped = runner().invoke(bench_command, [*ARGS, "--out", str(out)])
    assert stopped.exit_code != 0 and calls == ["summary", "kernel_vs_pipeline"]
    assert f"results go to {out}/" in stopped.stderr and "--resume" in stopped.stderr
    first = csv_rows(out / "tables" / "summary.csv")
    assert first and {r["table"] for r in first} == {"summary"} and {r["config"] for r in first} == {"tiny"}
    assert csv_rows(out / "bench.csv") == first
    md = (out / "bench.md").read_text()
    assert HEADINGS["summary"] in md and HEADINGS["kernel_vs_pipeline"] not in md
    assert not (out / "tables" / "kernel_vs_pipeline.csv").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # no temporary file left behind

    calls.clear()
    monkeypatch.setitem(bench_tables.RUNNERS, "kernel_vs_pipeline", counted_second)
    resumed = runner().invoke(bench_command, [*ARGS, "--out", str(out), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert calls == ["kernel_vs_pipeline", "l0_sweep"]  # summary kept, not measured again
    assert "summary: kept from" in resumed.stderr
    rows = csv_rows(out / "bench.csv")
    assert [r for r in rows if r["table"] == "summary"] == first  # the kept rows, stamp and all, unchanged
    assert {r["table"] for r in rows} == {"summary", "kernel_vs_pipeline", "l0_sweep"}
    md = (out / "bench.md").read_text()
    assert all(HEADINGS[t] in md for t in CHOSEN) and "kept from an earlier run" in md
    assert (out / "l0_sweep.png").stat().st_size > 0
    assert "| dense |" in resumed.stdout  # the summary is echoed from the kept rows


def test_without_resume_every_table_is_measured_again(tmp_path, calls):
    out = tmp_path / "o"
    args = ["--quick", "--device", "cpu", "--table", "kernel_vs_pipeline", "--out", str(out)]
    assert runner().invoke(bench_command, args).exit_code == 0
    assert runner().invoke(bench_command, args).exit_code == 0
    assert calls == ["kernel_vs_pipeline", "kernel_vs_pipeline"]


def test_a_table_file_that_is_not_complete_or_from_another_run_is_measured_again(tmp_path, calls):
    out = tmp_path / "o"
    args = ["--quick", "--device", "cpu", "--out", str(out), *("--table", "summary")]
    args += ["--table", "kernel_vs_pipeline"]
    assert runner().invoke(bench_command, args).exit_code == 0
    summary, split = out / "tables" / "summary.csv", out / "tables" / "kernel_vs_pipeline.csv"
    summary.write_text(summary.read_text()[:-40])  # cut inside its last row
    split.write_text(split.read_text().replace(",tiny,", ",full,"))  # as if a full run had written it
    calls.clear()
    again = runner().invoke(bench_command, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert calls == ["summary", "kernel_vs_pipeline"]
    assert "summary.csv is not kept (line" in again.stderr
    assert "pipeline.csv is not kept (it was measured by another kind of run (config 'full'))" in again.stderr
    assert {r["config"] for r in csv_rows(out / "bench.csv")} == {"tiny"}


def test_an_atomic_write_that_fails_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "bench.md"
    path.write_text("old, complete")

    def dies_half_way(tmp):
        tmp.write_text("new, half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, dies_half_way)
    assert path.read_text() == "old, complete" and [p.name for p in tmp_path.iterdir()] == ["bench.md"]
    with pytest.raises(OutputError, match="cannot write .*missing"):
        write_atomic(tmp_path / "missing" / "bench.md", lambda p: p.write_text("x"))
