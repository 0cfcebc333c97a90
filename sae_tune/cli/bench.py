"""``sae-tune bench``: measure the eight tables on this device and write Markdown, CSV and plots."""

from __future__ import annotations

import os
import time
from pathlib import Path

import click

from sae_tune.cli.options import DeviceType

# bench.tables.RUNNERS' names, spelled out so that loading the CLI does not load the benchmark
TABLE_NAMES = (
    "summary",
    "kernel_vs_pipeline",
    "l0_sweep",
    "width_sweep",
    "real_shapes",
    "peak_memory",
    "bandwidth",
    "sae_forward",
)


@click.command("bench")
@click.option(
    "--device",
    type=DeviceType(indexed=False),
    default=None,
    help="Where to measure [default: cuda if available, else cpu].",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Fewer sweep points and rounds; the SAE forward table at gemma-2b-l20, B=32 and 1024 only.",
)
@click.option(
    "--table",
    "tables",
    multiple=True,
    type=click.Choice(TABLE_NAMES),
    help="Measure only this table (repeatable) [default: all]. bandwidth also writes the batch sweep.",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="sae-tune-bench",
    show_default=True,
    help="Folder for bench.md, bench.csv and the PNG plots (each table written as soon as it is done).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Keep the tables a stopped run of the same configuration already wrote into --out; measure only "
    "the rest.",
)
def bench_command(
    device: str | None, quick: bool, tables: tuple[str, ...], out_dir: str, resume: bool
) -> None:
    """Reproduce the sparse-decode tables on this device: dense vs library sparse paths vs (on CUDA)
    every Triton kernel mode and the dispatcher, with L0, width and batch sweeps, real SAE shapes, peak
    memory and achieved bandwidth; and the whole SAELens SAE forward (unpatched, decoder routed, sparse
    end to end)."""
    import torch

    from sae_tune.bench import FULL, QUICK, run_bench
    from sae_tune.bench.output import BenchOutput, OutputError
    from sae_tune.bench.report import HEADINGS, SECTIONS, for_terminal

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_out_dir(out_dir)  # before minutes of measuring, not after
    config = QUICK if quick else FULL
    started = time.perf_counter()

    def log(message: str) -> None:
        click.echo(f"[{time.perf_counter() - started:6.1f} s] {message}", err=True)

    output = BenchOutput(out_dir, resume=resume)
    log(output.describe())
    chosen = tuple(dict.fromkeys(tables)) or None
    try:
        result = run_bench(config, device, tables=chosen, log=log, output=output, progress=True)
        files = output.write(result)
    except OutputError as exc:
        raise click.ClickException(f"--out {out_dir}: {exc}") from exc
    except KeyboardInterrupt:
        click.echo(
            f"stopped: the tables done are in {out_dir} (bench.md, bench.csv, tables/); "
            "run the same command with --resume to measure only the rest",
            err=True,
        )
        raise
    present = {r.table for r in result.measurements}
    for table in ECHOED:
        if table in present:
            click.echo(f"{HEADINGS[table]}\n\n{for_terminal(SECTIONS[table](result))}\n")
    for path in files:
        click.echo(f"wrote {path}")
    click.echo(f"{config.name} run on {result.stamp.device}: {time.perf_counter() - started:.0f} s")


# the tables printed at the end (all are in bench.md)
ECHOED = ("summary", "sae_forward")


def _check_out_dir(out_dir: str) -> None:
    """--out must be a folder this process can create and write into."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.BadParameter(
            f"cannot create {out_dir}: {exc.strerror or exc}", param_hint="'--out'"
        ) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise click.BadParameter(f"{out_dir} is not writable", param_hint="'--out'")
