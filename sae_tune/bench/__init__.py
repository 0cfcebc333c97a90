"""``sae-tune bench``: the published sparse-decode tables, measured on the local device.

``run_bench(config, device)`` measures; ``write_outputs(result, out_dir)`` writes ``bench.md``,
``bench.csv`` and the sweep plots. ``run_bench(..., output=bench.output.BenchOutput(out_dir))`` writes
each table as soon as it is done instead (and with ``resume=True`` keeps the tables already there).
``FULL`` and ``QUICK`` are the two configurations of the command; tests pass a tiny ``BenchConfig``.
"""

from __future__ import annotations

from pathlib import Path

from sae_tune.bench.config import FULL, QUICK, BenchConfig, ShapeCase
from sae_tune.bench.runner import BenchResult, run_bench


def write_outputs(result: BenchResult, out_dir: str | Path) -> list[Path]:
    """Write the Markdown, the CSV and the PNG plots into ``out_dir`` (created); returns the files."""
    from sae_tune.bench.plots import write_plots
    from sae_tune.bench.report import write_csv, write_markdown

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, csv = out / "bench.md", out / "bench.csv"
    write_markdown(result, md)
    write_csv(result, csv)
    return [md, csv, *write_plots(result, out)]


__all__ = ["FULL", "QUICK", "BenchConfig", "BenchResult", "ShapeCase", "run_bench", "write_outputs"]
