"""Reading the output: `cache show` fits 120 columns (``--wide`` keeps everything), imports count what they
did, plot titles wrap instead of being cut, compile-unavailability gives its reason, one style of defaults
in `show-kernel --help`."""

import json

import torch
from click.testing import CliRunner
from conftest import make_key

from sae_tune.cache.store import KEY_FIELDS, CacheKey, Store
from sae_tune.cli.main import main
from sae_tune.targets.cpu import variant as cpu_variant
from sae_tune.targets.triton.variant import Variant

LONG_CPU = (
    "Intel(R) Xeon(R) Platinum 8480+ Sapphire Rapids 56-Core Processor @ 2.00GHz with AMX and more words "
    "[x86_64 0123456789ab]"
)
LONG_GPU = "NVIDIA " + "Very Long Accelerator Name " * 4 + "G" * 5  # within the cache's 128 characters


def run(*args):
    return CliRunner().invoke(main, list(args))


def longest(variants):
    return max(variants, key=lambda v: len(v.name))


def long_cache(path):
    """Winners whose device names, configs, origins and noisy times are as long as the cache allows."""
    triton = longest(Variant.search_space(65536, 2304, torch.float32, allow_unchecked=True))
    cpu = longest(cpu_variant.search_space(65536, 2304, torch.float32))
    with Store(path) as store:
        store.set_winner_if_faster(
            make_key(device_name=LONG_CPU, F=65536, batch_bucket=1, l0_bucket=64), "cpu", cpu.to_dict(),
            0.055, dense_ms=26.1, spread=0.02,
        )  # fmt: skip
        store.set_winner_if_faster(
            make_key(device_name=LONG_CPU, F=262144, D=4608, batch_bucket=32), "embedding_bag_csr",
            {"chunk": 16}, 1234.5678, dense_ms=30000.0, spread=70.09,
        )  # fmt: skip
        store.set_winner_if_faster(
            make_key(device_name=LONG_CPU, op="encode_topk", dtype="bfloat16", F=262144, D=4608,
                     batch_bucket=4096, l0_bucket=128),
            "cpu-encode", {"chunk": 4096}, 12.5, dense_ms=None,
        )  # fmt: skip
        store.set_winner_if_faster(
            make_key(device_name=LONG_GPU, capability="9.0", F=65536, batch_bucket=256), "triton",
            triton.to_dict(), 0.0123, dense_ms=1.2, spread=99.0,
        )  # fmt: skip
    return path, triton, cpu


def test_cache_show_fits_120_columns_and_wide_keeps_everything(tmp_path):
    path, triton, cpu = long_cache(tmp_path / "c.sqlite")
    shown = run("cache", "show", "--cache", str(path))
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert max(len(line) for line in lines) <= 120, max(lines, key=len)
    # configs by their labels, not JSON; the variant labels are not cut
    assert f"cpu[{cpu.name}]" in shown.output and f"triton[{triton.name}]" in shown.output
    assert '"block_d"' not in shown.output and "embedding_bag_csr[chunk=16]" in shown.output
    # a CPU key name keeps its digest when its model part is cut; times keep their noisy flag
    assert "[x86_64 0123456789ab]" in shown.output and "(noisy)" in shown.output
    assert "encode_topk, bf16, F=262144, D=4608" in shown.output and "--wide" in shown.output

    wide = run("cache", "show", "--cache", str(path), "--wide")
    assert wide.exit_code == 0
    assert LONG_CPU in wide.output and LONG_GPU in wide.output
    assert json.dumps(triton.to_dict(), sort_keys=True) in wide.output
    assert max(len(line) for line in wide.output.splitlines()) > 120


def test_cache_show_fits_with_an_imported_winner_from_a_long_file_name(tmp_path):
    src, _, _ = long_cache(tmp_path / "src.sqlite")
    name = tmp_path / ("shared-configs-" + "x" * 150 + ".json")
    assert run("cache", "export", "--cache", str(src), "-o", str(name)).exit_code == 0
    dst = tmp_path / "dst.sqlite"
    assert run("cache", "import", "--cache", str(dst), str(name)).exit_code == 0
    shown = run("cache", "show", "--cache", str(dst))
    lines = shown.output.splitlines()
    assert max(len(line) for line in lines[1:]) <= 120  # line 0 is the cache's own path
    assert "imported" in shown.output
    assert f"imported from {name.name}" in run("cache", "show", "--cache", str(dst), "--wide").output


def test_import_counts_added_updated_and_kept_local(tmp_path):
    src, _, _ = long_cache(tmp_path / "src.sqlite")
    out = tmp_path / "all.json"
    assert run("cache", "export", "--cache", str(src), "-o", str(out)).exit_code == 0
    records = json.loads(out.read_text())["records"]
    assert len(records) == 4
    # into an empty cache every record is added
    empty = run("cache", "import", "--cache", str(tmp_path / "empty.sqlite"), str(out))
    assert empty.exit_code == 0 and "imported 4 records" in empty.output
    assert "4 added, 0 updated" in empty.output and "kept local" not in empty.output

    # a cache that measured one key, holds a slower import of another and the same import of a third
    by_impl = {r["impl"]: r for r in records}
    dst = tmp_path / "dst.sqlite"
    slower = json.loads(out.read_text())
    slower["records"] = [dict(by_impl["embedding_bag_csr"], ms=2e4), by_impl["cpu-encode"]]
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(slower))
    assert "2 added, 0 updated" in run("cache", "import", "--cache", str(dst), str(partial)).output
    with Store(dst) as store:
        measured = CacheKey(**{name: by_impl["triton"][name] for name in KEY_FIELDS})
        store.set_winner_if_faster(measured, "dense", {}, 1.0)
    merged = run("cache", "import", "--cache", str(dst), str(out))
    assert merged.exit_code == 0, merged.output
    assert "1 added, 1 updated, 1 kept local" in merged.output and "1 unchanged" in merged.output
    assert "imported 4 records" in merged.output


# --- plot titles ------------------------------------------------------------------------------------------


def _sweep_rows():
    from sae_tune.bench.measure import Measurement

    return [
        Measurement(table="l0_sweep", path=path, metric="ms", value=ms, unit="ms", l0=l0, vs_dense=10 / ms)
        for path in ("dense", "embedding_bag")
        for l0, ms in ((16, 1.0), (64, 2.0))
    ]


def test_a_long_plot_title_wraps_inside_the_figure_and_keeps_every_word(tmp_path):
    import matplotlib.pyplot as plt

    from sae_tune.bench.plots import plot_sweep, sweep_figure

    title = (
        f"L0 sweep (B=32, F=65536, D=768, float32) on {LONG_CPU}, torch 2.13.0+cpu, 2026-11-25 "
        + "G" * 200  # one word wider than the figure
    )
    fig = sweep_figure(_sweep_rows(), lambda r: r.l0, "L0", title)
    try:
        fig.canvas.draw()
        shown = fig._suptitle
        box = shown.get_window_extent()
        assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height
        assert shown.get_text().count("\n") >= 2
        assert shown.get_text().replace("\n", "").replace(" ", "") == title.replace(" ", "")
    finally:
        plt.close(fig)
    png = tmp_path / "l0.png"
    plot_sweep(_sweep_rows(), lambda r: r.l0, "L0", title, png)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_wrap_text_breaks_between_words_and_inside_only_an_over_long_word():
    from sae_tune.bench.plots import wrap_text

    def fits(line):
        return len(line) <= 10

    assert wrap_text("on AMD EPYC [x86_64 ccb2ceca36bb]", fits) == "on AMD\nEPYC\n[x86_64\nccb2ceca36\nbb]"
    assert wrap_text("short", fits) == "short"


# --- show-kernel's defaults -------------------------------------------------------------------------------


def test_show_kernel_help_shows_every_default_in_one_style():
    import re

    result = run("show-kernel", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    # choices read [a|b]; a default reads [default: x]; nothing else in brackets, no "(default ...)"
    brackets = re.findall(r"\[[^\]]*\]", text.split("Options:", 1)[1])
    odd = [b for b in brackets if "|" not in b and not b.startswith("[default: ")]
    assert not odd and "(default" not in text, odd
    for flag, value in (("--overflow", "fallback"), ("--max-l0", "128"), ("--chunk-slots", "8")):
        assert re.search(rf"{flag} \S+ --alloc \w+ only[^\[]*\[default: {value}\]", text), flag
    assert re.search(r"--config TEXT [^\[]*\[default: \(the C target's default variant\)\]", text)
    # the defaults shown are the ones every alloc accepts: a plain exact or chunked variant still renders
    for alloc in ("exact", "chunked", "fixed"):
        shown = run("show-kernel", "--alloc", alloc)
        assert shown.exit_code == 0 and f"alloc={alloc} " in shown.output, shown.output


# --- the selftest's bench summary ------------------------------------------------------------------------


def test_selftest_bench_rows_that_did_not_run_say_why(monkeypatch):
    from sae_tune.bench.measure import ERROR, OK, UNAVAILABLE, Measurement
    from sae_tune.bench.paths import COMPILED, DENSE
    from sae_tune.bench.runner import BenchResult
    from sae_tune.cli import selftest

    def row(path, status=OK, note="", value=1.0):
        return Measurement(
            table="summary", path=path, metric="ms", value=value, unit="ms", status=status, note=note
        )

    def fake_run_bench(config, device, tables=None, **kwargs):
        assert not config.compile_dense  # on CPU the selftest leaves torch.compile out
        rows = [
            row(DENSE),
            row(COMPILED, UNAVAILABLE, "left out by the configuration", None),
            row("embedding_bag", ERROR, "RuntimeError: out of memory\n" + "traceback line " * 20, None),
            row("cpu (generated default)", ERROR, "", None),
        ]
        return BenchResult(
            measurements=tuple(rows), stamp=None, config=config, triton=False, triton_note="", seconds=0.0
        )

    monkeypatch.setattr("sae_tune.bench.runner.run_bench", fake_run_bench)
    lines, wrong = selftest.bench_summary(torch.device("cpu"))
    text = "\n".join(lines)
    assert all(len(line) <= 120 for line in lines), text
    compiled = lines[lines.index(next(line for line in lines if COMPILED in line)) + 1]
    assert "not available: left out of the CPU selftest" in compiled and "sae-tune bench" in compiled
    assert "error: RuntimeError: out of memory" in text and "traceback line" not in text
    assert "error: no reason recorded" in text
    assert wrong == [
        "bench embedding_bag: error: RuntimeError: out of memory",
        "bench cpu (generated default): error: no reason recorded",
    ]
    long = selftest.bench_lines("dense", "1.0", "1.00x", "error", "x" * 300)
    assert len(long) == 2 and len(long[1]) == 120 and long[1].endswith("...")


def test_the_tuners_tables_fit_120_columns_with_the_longest_labels_and_noisy_rows():
    """The decode and encode tables the main job prints, with a label longer than any of the C or Triton
    spaces' (50 and 53 characters at gemma-2b-l20), large times, failures and every time noisy."""
    from types import SimpleNamespace as NS

    from sae_tune.cli.tune import format_encode_table, format_table

    label = "triton[fixed-unchecked-m128-f1024-d128-l16-w2-wb4-s2]xx"
    assert len(label) == 55

    def decode(noisy: bool):
        spread = 70.09 if noisy else 0.01
        return NS(
            batch_size=4096,
            best=NS(label=label),
            best_ms=12345.678,
            best_spread=spread,
            dense_ms=98765.432,
            dense_spread=spread,
            noisy=noisy,
            speedup=1234.56,
            versus=lambda name: 123.45,
            trials=200,
            failed=13,
        )

    def encode(noisy: bool):
        spread = 70.09 if noisy else 0.01
        return NS(
            batch_size=4096,
            key=NS(op="encode_topk"),
            best=NS(label="cpu:" + label),
            best_ms=12345.678,
            best_spread=spread,
            default_ms=98765.432,
            default_spread=spread,
            noisy=noisy,
            times=list(range(12)),
            failed=[1, 2],
        )

    for table in (
        format_table([decode(False), decode(True)]),
        format_encode_table([encode(False), encode(True)]),
    ):
        lines = table.splitlines()
        assert max(len(line) for line in lines) <= 120, max(lines, key=len)
        assert "".join(label.split()) in "".join(table.replace("\n", "").split()) or label[:20] in table
        noisy_row = table[table.rindex("4096") :]
        assert "~" in noisy_row and "±7009%" in noisy_row


def test_bench_prints_its_tables_within_120_columns_with_every_note_kept(tmp_path, monkeypatch):
    from test_bench import TINY

    from sae_tune.bench.report import for_terminal, markdown_table

    note = "cache: " + "cpu[c-twophase-t4-d256-u4-p8-s64-thall-dynamic] measured here 0.428 ms ±3% " * 3
    md = "B=32.\n\n" + markdown_table(("path", "ms", "note"), [("dense", "83.6", "-"), ("x", "0.4", note)])
    shown = for_terminal(md)
    assert max(len(line) for line in shown.splitlines()) <= 120 and "| x | 0.4 | [1] |" in shown
    assert " ".join(shown[shown.rindex("[1] ") + 4 :].split()) == " ".join(note.split())  # nothing cut
    monkeypatch.setattr("sae_tune.bench.QUICK", TINY)
    result = run("bench", "--quick", "--device", "cpu", "--table", "summary", "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    printed = [line for line in result.stdout.splitlines() if not line.startswith("wrote ")]
    assert "| path |" in result.stdout and max(len(line) for line in printed) <= 120, max(printed, key=len)
