import csv
import dataclasses

import pytest
import torch
from click.testing import CliRunner

import sae_tune
from sae_tune.autotune.verify import Reference
from sae_tune.bench import BenchConfig, ShapeCase, run_bench, write_outputs
from sae_tune.bench import paths as bench_paths
from sae_tune.bench.config import ForwardCase
from sae_tune.bench.flush import CacheFlush, last_level_cache_bytes
from sae_tune.bench.measure import ERROR, OK, UNAVAILABLE, WRONG, Measurement, Timer, compare
from sae_tune.bench.memory import cpu_peak_bytes, dense_model
from sae_tune.bench.paths import DENSE, DISPATCHER, TRITON_MODES, BenchPath, library_paths
from sae_tune.bench.problem import WeightCache, make_problem, sparse_reference
from sae_tune.bench.report import HEADINGS
from sae_tune.bench.tables import SUMMARY, dense_wins_from
from sae_tune.cli.bench import bench_command
from sae_tune.specs import spec_from_shape

TINY = BenchConfig(
    batch=4,
    width=1024,
    d_model=16,
    l0=8,
    l0_sweep=(4, 16),
    width_sweep=(256, 1024),
    shapes=(
        ShapeCase("tiny jumprelu", spec_from_shape(512, 24, 6)),
        ShapeCase("tiny topk", spec_from_shape(512, 16, 5, "topk"), "a TopK shape"),
    ),
    memory_batches=(4, 16),
    memory_max_l0s=(16, 32),
    batch_sweep=(2, 4),
    rounds=3,
    budget_s=0.05,
    copy_mib=1,
    flush_mib=1,
    compile_dense=False,
    forward_cases=(ForwardCase("tiny forward", spec_from_shape(512, 16, 6), (4,)),),
    name="tiny",
)
STAMP_COLUMNS = (
    "device_kind",
    "device",
    "capability",
    "cpu_model",
    "torch",
    "triton",
    "date",
    "cache_flush_mib",
)
CPU = torch.device("cpu")


def tiny_problem(batch=6, width=512, d_model=16, l0=6):
    weights = WeightCache(dtype=torch.float32, device=CPU, seed=0)
    return make_problem(spec_from_shape(width, d_model, l0), batch, weights, seed=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The whole benchmark on tiny shapes, with the Triton modes forced on (they run in the interpreter
    here, which is what exercises the GPU rows' code on CPU)."""
    result = run_bench(TINY, "cpu", triton=True)
    out = tmp_path_factory.mktemp("bench")
    return result, out, write_outputs(result, out)


def test_writes_markdown_csv_and_plots(tiny_run):
    result, out, files = tiny_run
    names = {p.name for p in files}
    assert names == {"bench.md", "bench.csv", "l0_sweep.png", "width_sweep.png", "batch_sweep.png"}
    for png in ("l0_sweep.png", "width_sweep.png", "batch_sweep.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    text = (out / "bench.md").read_text()
    for heading in HEADINGS.values():
        assert heading in text
    assert len(HEADINGS) == 8
    assert result.stamp.device in text and result.stamp.torch in text
    assert "interpreter" in text  # forced Triton on CPU is labelled as not speed
    assert "cold cache (1 MiB rewritten" in text


def test_csv_rows_are_stamped(tiny_run):
    result, out, _ = tiny_run
    with (out / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result.measurements) > 50
    for column in STAMP_COLUMNS:
        assert column in rows[0]
    for row in rows:
        assert row["device_kind"] == "cpu" and row["device"] and row["torch"] == torch.__version__
        assert row["date"] and row["config"] == "tiny"
    tables = {row["table"] for row in rows}
    assert {"summary", "kernel_vs_pipeline", "l0_sweep", "width_sweep", "real_shapes"} <= tables
    assert {"peak_memory", "bandwidth", "batch_sweep", "sae_forward"} <= tables


def test_every_timed_path_was_checked_and_triton_modes_ran(tiny_run):
    result, _, _ = tiny_run
    summary_rows = {r.path: r for r in result.measurements if r.table == SUMMARY}
    for mode in TRITON_MODES:
        assert summary_rows[mode].status == OK, summary_rows[mode]
        assert summary_rows[mode].max_abs_diff < 1e-4
    assert summary_rows[DENSE].vs_dense == pytest.approx(1.0)
    dispatcher = summary_rows[DISPATCHER]
    assert dispatcher.status in (OK, UNAVAILABLE)
    if dispatcher.status == UNAVAILABLE:
        assert "variant" in dispatcher.note
    for r in result.measurements:
        if r.metric == "ms":
            assert (r.value is not None) == (r.status == OK), r
    split = [r for r in result.measurements if r.table == "kernel_vs_pipeline" and r.mode == "kernel"]
    assert {r.path for r in split} >= {"embedding_bag", *TRITON_MODES}


def test_memory_table_measures_dense_exactly_on_cpu(tiny_run):
    result, _, _ = tiny_run
    for batch in TINY.memory_batches:
        rows = [r for r in result.measurements if r.table == "peak_memory" and r.batch == batch]
        measured = next(r for r in rows if r.path == DENSE and r.metric == "peak_bytes")
        model = next(r for r in rows if r.path == DENSE and r.metric == "model_bytes")
        assert measured.value == model.value == dense_model(batch, TINY.d_model, 4)
        assert "profiler" in measured.note
        caps = {r.max_l0 for r in rows if r.metric == "model_bytes" and r.path.startswith("triton fixed")}
        assert caps == set(TINY.memory_max_l0s)


def test_bandwidth_rows_and_copy_bandwidth(tiny_run):
    result, _, _ = tiny_run
    copy = [r for r in result.measurements if r.metric == "copy_GB/s"]
    assert len(copy) == 1 and copy[0].value > 0
    frac = [r for r in result.measurements if r.metric == "fraction_of_copy"]
    assert frac and all(r.value > 0 for r in frac)
    assert not any(r.path == DISPATCHER for r in frac)
    assert any(r.metric == "dense_wins_from_batch" for r in result.measurements)


# --- the measuring core ---------------------------------------------------------------------------------


def test_wrong_and_failing_paths_are_flagged_and_not_timed():
    problem = tiny_problem()

    def off_by_one(a, W, b):
        return a @ W + b + 1

    def crashes(a, W, b):
        raise RuntimeError("no kernel")

    paths = library_paths(CPU, torch.float32)[:1] + [
        BenchPath("wrong", off_by_one),
        BenchPath("crashes", crashes),
        BenchPath("absent", None, unavailable="not here"),
    ]
    rows = {r.path: r for r in compare(problem, paths, Timer(CPU, rounds=3), table="t")}
    assert rows[DENSE].status == OK and rows[DENSE].value > 0
    assert rows["wrong"].status == WRONG and rows["wrong"].value is None
    assert rows["wrong"].max_abs_diff == pytest.approx(1.0)
    assert rows["crashes"].status == ERROR and "no kernel" in rows["crashes"].note
    assert rows["absent"].status == UNAVAILABLE and rows["absent"].value is None


def test_a_path_failing_while_timed_is_an_error_and_dense_keeps_its_time():
    problem = tiny_problem()
    calls = []

    def flaky(a, W, b):
        calls.append(1)
        if len(calls) > 1:
            raise MemoryError("out of memory on the second call")
        return a @ W + b

    paths = [*library_paths(CPU, torch.float32)[:1], BenchPath("flaky", flaky)]
    rows = {r.path: r for r in compare(problem, paths, Timer(CPU, rounds=3), table="t")}
    assert rows["flaky"].status == ERROR and rows["flaky"].value is None
    assert "second call" in rows["flaky"].note
    assert rows[DENSE].status == OK and rows[DENSE].value > 0


def test_compare_needs_dense_first():
    with pytest.raises(ValueError, match="dense"):
        compare(tiny_problem(), library_paths(CPU, torch.float32)[1:], Timer(CPU), table="t")


def test_sparse_reference_equals_the_dense_fp64_product():
    problem = tiny_problem(batch=9)
    ref = Reference.of(problem.acts, problem.W_dec, problem.b_dec)
    ours = sparse_reference(problem.acts, problem.W_dec, problem.b_dec)
    torch.testing.assert_close(ours.value, ref.value, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.scale, ref.scale, rtol=1e-12, atol=1e-12)


def test_cpu_peak_bytes_sees_temporaries():
    x = torch.ones(1000)
    assert cpu_peak_bytes(lambda: x.clone() + x) == 8000  # the clone and the sum are alive at once


def test_last_level_cache_is_read_from_sysfs(tmp_path):
    for index, (level, size) in enumerate([(1, "48K"), (2, "2048K"), (3, "491520K"), (2, "junk")]):
        entry = tmp_path / f"index{index}"
        entry.mkdir()
        (entry / "level").write_text(f"{level}\n")
        (entry / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 480 << 20
    assert last_level_cache_bytes(tmp_path / "missing") is None


def test_cache_flush_touches_its_buffer():
    flush = CacheFlush(4096)
    flush()
    flush()
    assert flush._buffer is not None and int(flush._buffer.min()) == 2 and flush._buffer.numel() == 1024
    CacheFlush(0)()  # off: nothing allocated
    with pytest.raises(ValueError):
        CacheFlush(-1)


def test_compile_failure_is_an_error_row_not_a_crash(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args):
            raise RuntimeError("InductorError: no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    config = dataclasses.replace(TINY, compile_dense=True)
    rows = run_bench(config, "cpu", tables=("summary",)).measurements
    compiled = next(r for r in rows if r.path == bench_paths.COMPILED)
    assert compiled.status == ERROR and "no C++ compiler" in compiled.note
    assert next(r for r in rows if r.path == DENSE).status == OK


def test_dispatcher_row_is_not_available_while_a_variant_is_required(monkeypatch):
    def needs_variant(feature_acts, W_dec, b_dec=None, *, variant):
        raise AssertionError("must not be called")

    monkeypatch.setattr(sae_tune, "sparse_decode", needs_variant)
    path = bench_paths.dispatcher_path(tiny_problem())
    assert path.full is None and "variant" in path.unavailable


def test_dispatcher_row_calls_sparse_decode_without_a_variant(monkeypatch):
    calls = []

    def dispatching(feature_acts, W_dec, b_dec=None, *, variant=None):
        calls.append(variant)
        return feature_acts @ W_dec + b_dec

    monkeypatch.setattr(sae_tune, "sparse_decode", dispatching)
    problem = tiny_problem()
    path = bench_paths.dispatcher_path(problem)
    paths = [*library_paths(CPU, torch.float32)[:1], path]
    rows = {r.path: r for r in compare(problem, paths, Timer(CPU, rounds=3), table="t")}
    assert rows[DISPATCHER].status == OK and calls and calls[0] is None


def _ms(path, batch, value):
    return Measurement(table="batch_sweep", path=path, metric="ms", value=value, unit="ms", batch=batch)


def test_dense_wins_from_is_the_start_of_the_last_winning_run():
    rows = [
        _ms(DENSE, 1, 5.0),
        _ms("embedding_bag", 1, 1.0),
        _ms(DENSE, 8, 2.0),  # a lone win below a loss does not count
        _ms("embedding_bag", 8, 3.0),
        _ms(DENSE, 64, 9.0),
        _ms("embedding_bag", 64, 4.0),
        _ms(DENSE, 512, 10.0),
        _ms("embedding_bag", 512, 20.0),
        _ms(DISPATCHER, 512, 1.0),  # the dispatcher is not a sparse path to beat
        _ms(DENSE, 4096, 50.0),
        _ms("embedding_bag", 4096, 80.0),
    ]
    assert dense_wins_from(rows) == 512
    assert dense_wins_from(rows[:6]) is None


def test_cpu_summary_has_the_library_paths_and_no_triton_rows():
    result = run_bench(TINY, "cpu", tables=("summary",))
    names = [r.path for r in result.measurements]
    assert names[:4] == [DENSE, bench_paths.COMPILED, bench_paths.SPARSE_CSR, bench_paths.EMBEDDING_BAG]
    assert not any(n in names for n in TRITON_MODES)  # CPU default: no interpreter timings
    assert "left out on CPU" in result.triton_note


# --- the command ------------------------------------------------------------------------------------


def test_command_quick_writes_into_out(monkeypatch, tmp_path):
    monkeypatch.setattr("sae_tune.bench.QUICK", TINY)
    result = CliRunner().invoke(bench_command, ["--quick", "--device", "cpu", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "bench.md").is_file() and (tmp_path / "o" / "bench.csv").is_file()
    assert "| dense |" in result.output and "tiny run" in result.output


def test_command_refuses_cuda_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(bench_command, ["--device", "cuda", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "no CUDA device" in result.output
