"""The SAE forward table of ``sae-tune bench`` (bench/forward.py) on tiny SAELens SAEs."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sae_tune.bench import FULL, QUICK, BenchConfig, run_bench
from sae_tune.bench import forward as fwd
from sae_tune.bench.config import ForwardCase
from sae_tune.bench.forward import DECODE_ONLY, FORWARD, MODES, SPARSE, UNPATCHED
from sae_tune.bench.measure import OK, UNAVAILABLE, WRONG
from sae_tune.bench.report import forward_section, markdown
from sae_tune.bench.tables import RUNNERS
from sae_tune.cli.bench import TABLE_NAMES, bench_command
from sae_tune.specs import get_spec, spec_from_shape

WIDTH, D_MODEL, L0 = 512, 16, 6
BATCHES = (4, 32)
TINY = BenchConfig(
    forward_cases=(ForwardCase("tiny jumprelu", spec_from_shape(WIDTH, D_MODEL, L0), BATCHES),),
    rounds=3,
    budget_s=0.05,
    flush_mib=0,
    name="tiny",
)


def forward_rows(config=TINY):
    return run_bench(config, "cpu", tables=(FORWARD,))


@pytest.fixture(scope="module")
def tiny_result():
    return forward_rows()


def by_key(result):
    return {(r.batch, r.path, r.metric): r for r in result.measurements}


def test_every_mode_is_checked_timed_and_measured(tiny_result):
    rows = by_key(tiny_result)
    assert {r.table for r in tiny_result.measurements} == {FORWARD}
    assert len(rows) == len(tiny_result.measurements) == len(BATCHES) * len(MODES) * 2
    for batch in BATCHES:
        for mode in MODES:
            for metric in ("ms", "peak_bytes"):
                r = rows[(batch, mode, metric)]
                assert r.status == OK and r.value > 0, r
                assert r.of_baseline > 0 and r.width == WIDTH and r.d_model == D_MODEL
                assert r.l0_mean > 0 and r.l0_max >= 1
            assert rows[(batch, mode, "peak_bytes")].max_abs_diff < 1e-5
        assert rows[(batch, UNPATCHED, "ms")].of_baseline == pytest.approx(1.0)
        assert rows[(batch, UNPATCHED, "peak_bytes")].max_abs_diff == 0.0


def test_peaks_are_the_dense_activations_and_sparse_avoids_them(tiny_result):
    rows = by_key(tiny_result)
    for batch in BATCHES:
        dense = rows[(batch, UNPATCHED, "peak_bytes")].value
        # SAELens's JumpReLU encode holds four (B, F) float32 tensors at once; the fit check's model bounds it
        assert 4 * batch * WIDTH * 4 <= dense <= fwd.dense_forward_bytes(batch, WIDTH, D_MODEL, 4)
        assert rows[(batch, DECODE_ONLY, "peak_bytes")].value >= 4 * batch * WIDTH * 4
        sparse = rows[(batch, SPARSE, "peak_bytes")]
        assert sparse.value < dense and sparse.of_baseline == pytest.approx(sparse.value / dense)


def test_a_wrong_sparse_forward_is_flagged_and_not_timed(monkeypatch):
    real = fwd.mode_runner

    def off(mode, sae, x):
        run = real(mode, sae, x)
        return (lambda: run() * (1 + 1e-4)) if mode == SPARSE else run

    monkeypatch.setattr(fwd, "mode_runner", off)
    result = forward_rows()
    rows = by_key(result)
    for batch in BATCHES:
        for metric in ("ms", "peak_bytes"):
            wrong = rows[(batch, SPARSE, metric)]
            assert wrong.status == WRONG and wrong.value is None and "tolerance" in wrong.note
            assert rows[(batch, UNPATCHED, metric)].status == OK
        assert rows[(batch, SPARSE, "peak_bytes")].max_abs_diff > 0
    text = forward_section(result)
    assert "| sparse | WRONG | - | WRONG | - |" in text
    assert f"tiny jumprelu B={BATCHES[0]} sparse: WRONG: max abs error" in text


def test_a_dense_forward_that_does_not_fit_is_said_instead_of_a_number(monkeypatch):
    monkeypatch.setattr(fwd, "free_bytes", lambda device: 10_000)
    result = forward_rows(replace(TINY, forward_cases=(replace(TINY.forward_cases[0], batches=(32,)),)))
    rows = by_key(result)
    for mode in (UNPATCHED, DECODE_ONLY):
        r = rows[(32, mode, "peak_bytes")]
        assert r.status == UNAVAILABLE and r.value is None and r.note.startswith("does not fit")
    sparse = rows[(32, SPARSE, "peak_bytes")]
    assert sparse.status == OK and sparse.value > 0 and sparse.of_baseline is None
    assert rows[(32, SPARSE, "ms")].of_baseline is None
    text = forward_section(result)
    assert "| unpatched | does not fit | - | does not fit | - |" in text


def test_fit_reason_at_the_262k_shape():
    spec = get_spec("gemma-2b-l12-262k")
    cpu = torch.device("cpu")
    reason = fwd.fit_reason(spec, 4096, cpu, torch.float32, free=20 * 10**9)
    assert reason is not None and "17.3 GB" in reason and "20.0 GB free" in reason
    assert fwd.fit_reason(spec, 32, cpu, torch.float32, free=20 * 10**9) is None


def test_free_bytes_reads_mem_available(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   1000 kB\n")
    assert fwd.free_bytes(torch.device("cpu"), meminfo) == 1000 * 1024
    assert fwd.free_bytes(torch.device("cpu"), tmp_path / "missing") is None


def test_sparse_row_says_when_the_patched_forward_would_run_dense(monkeypatch):
    from sae_tune.integrations import saelens_sparse

    monkeypatch.setattr(
        saelens_sparse, "dense_reason", lambda sae, x: "a hook is attached to hook_sae_acts_post"
    )
    rows = by_key(forward_rows())
    r = rows[(BATCHES[0], SPARSE, "ms")]
    assert r.status == UNAVAILABLE and r.value is None and "hook_sae_acts_post" in r.note
    assert rows[(BATCHES[0], DECODE_ONLY, "ms")].status == OK


def test_without_sae_lens_the_rows_say_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # import sae_lens raises ImportError
    result = forward_rows()
    assert len(result.measurements) == len(BATCHES) * len(MODES) * 2
    assert all(r.status == UNAVAILABLE and "sae_lens" in r.note for r in result.measurements)


def test_untimed_case_measures_peaks_only():
    case = ForwardCase("peaks only", spec_from_shape(1024, D_MODEL, L0), (8,), timed=False)
    result = forward_rows(replace(TINY, forward_cases=(case,)))
    assert {r.metric for r in result.measurements} == {"peak_bytes"}
    assert all(r.ok for r in result.measurements)
    assert "not timed" in forward_section(result)


def test_table_renders_in_the_report(tiny_result):
    text = markdown(tiny_result)
    assert "## 8. SAE forward" in text and "## 1. Summary" not in text
    header = "| SAE | B | L0 mean / max | mode | time (ms) | x unpatched | extra peak (MB) | x unpatched |"
    assert header in text
    for batch in BATCHES:
        for mode in MODES:
            assert f"| tiny jumprelu | {batch} |" in text and f"| {mode} |" in text
    assert "torch CPU allocator" in text


def test_forward_cases_of_the_configs():
    assert [(c.spec.name, c.batches, c.timed) for c in QUICK.forward_cases] == [
        ("gemma-2b-l20", (32, 1024), True)
    ]
    full = {(c.spec.name, c.batches, c.timed) for c in FULL.forward_cases}
    assert full == {("gemma-2b-l20", (32, 1024, 4096), True), ("gemma-2b-l12-262k", (4096,), False)}
    with pytest.raises(ValueError, match="JumpReLU"):
        ForwardCase("topk", spec_from_shape(512, 16, 5, "topk"), (4,))
    with pytest.raises(ValueError, match="batches"):
        ForwardCase("none", spec_from_shape(512, 16, 5), ())


def test_command_measures_only_the_tables_asked_for(monkeypatch, tmp_path):
    monkeypatch.setattr("sae_tune.bench.QUICK", TINY)
    out = tmp_path / "o"
    args = ["--quick", "--device", "cpu", "--table", "sae_forward", "--out", str(out)]
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 0, result.output
    assert "## 8. SAE forward" in result.output and "| dense |" not in result.output
    assert "## 8. SAE forward" in (out / "bench.md").read_text()
    assert "sae_forward" in (out / "bench.csv").read_text()
    bad = CliRunner().invoke(bench_command, ["--table", "nope", "--out", str(out)])
    assert bad.exit_code == 2 and "nope" in bad.output and "sae_forward" in bad.output
    assert TABLE_NAMES == tuple(RUNNERS)


def test_the_benchmark_script_runs_the_same_measurement(capsys):
    path = Path(__file__).parents[1] / "benchmarks" / "sae_forward.py"
    spec = importlib.util.spec_from_file_location("sae_forward_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--width", "512", "--d-model", "16", "--l0", "6", "--batch-sizes", "4", "--rounds", "3"]
    assert module.main(argv) == 0
    text = capsys.readouterr().out
    assert "## " not in text.split("\n")[0] and "| F=512 D=16 L0=6 | 4 |" in text
    assert text.count(" | ok |") == len(MODES)
    assert module.main(["--batch-sizes", "0"]) == 2


def test_token_chunks_cover_the_batch_without_narrow_blocks(monkeypatch):
    monkeypatch.setattr(fwd, "REFERENCE_ELEMENTS", 64 * WIDTH)
    assert fwd.token_chunks(160, WIDTH) == [(0, 64), (64, 160)]  # a 32-token tail joins the block before
    assert fwd.token_chunks(200, WIDTH) == [(0, 64), (64, 128), (128, 200)]
    assert fwd.token_chunks(5, WIDTH) == [(0, 5)]
    assert fwd.token_chunks(300, 1 << 30) == [(0, 64), (64, 128), (128, 192), (192, 300)]


@pytest.mark.parametrize("whole", [True, False])
def test_reference_over_blocks_of_tokens_is_the_forward(monkeypatch, whole):
    from sae_tune.autotune.verify import check

    cpu = torch.device("cpu")
    spec = spec_from_shape(WIDTH, D_MODEL, L0)
    sae = fwd.build_sae(spec, cpu, torch.float32)
    x = fwd.make_input(spec, 160, cpu, torch.float32, seed=0)
    one, l0_one = fwd.forward_reference(sae, x, whole=True)
    monkeypatch.setattr(fwd, "REFERENCE_ELEMENTS", 64 * WIDTH)  # two blocks: 64 and 96 tokens
    blocks, l0 = fwd.forward_reference(sae, x, whole=whole)
    torch.testing.assert_close(blocks.value, one.value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(blocks.scale, one.scale, rtol=1e-6, atol=1e-6)
    assert torch.equal(l0, l0_one) and l0.float().mean() > 1
    with torch.no_grad():
        out = fwd.mode_runner(UNPATCHED, sae, x)()
    assert check(out, blocks, torch.float32).ok
    assert not check(out + 1e-3, blocks, torch.float32).ok
