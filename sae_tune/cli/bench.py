"""``sae-tune bench``: measure the seven tables on this device and write Markdown, CSV and plots."""

from __future__ import annotations

import time

import click


@click.command("bench")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="Where to measure [default: cuda if available, else cpu].",
)
@click.option("--quick", is_flag=True, help="Fewer sweep points and rounds (under 3 minutes on 2 CPU cores).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False),
    default="sae-tune-bench",
    show_default=True,
    help="Folder for bench.md, bench.csv and the PNG plots.",
)
def bench_command(device: str | None, quick: bool, out_dir: str) -> None:
    """Reproduce the sparse-decode tables on this device: dense vs library sparse paths vs (on CUDA)
    every Triton kernel mode and the dispatcher, with L0, width and batch sweeps, real SAE shapes, peak
    memory and achieved bandwidth."""
    import torch

    from sae_tune.bench import FULL, QUICK, run_bench, write_outputs
    from sae_tune.bench.report import summary_section

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device is available here")
    config = QUICK if quick else FULL
    started = time.perf_counter()

    def log(message: str) -> None:
        click.echo(f"[{time.perf_counter() - started:6.1f} s] {message}", err=True)

    result = run_bench(config, device, log=log)
    files = write_outputs(result, out_dir)
    click.echo(summary_section(result))
    click.echo("")
    for path in files:
        click.echo(f"wrote {path}")
    click.echo(f"{config.name} run on {result.stamp.device}: {time.perf_counter() - started:.0f} s")
