"""The main job: ``sae-tune --sae NAME`` tunes one SAE shape on the local device and prints a table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

from sae_tune.cli.options import DTYPES

TABLE_HEADERS = (
    "batch",
    "winner",
    "ms",
    "dense ms",
    "vs dense",
    "vs sparse_csr",
    "vs embedding_bag",
    "measured",
)


def resolve_spec(
    sae: str | None, width: int | None, d_model: int | None, l0: int | None, arch: str, k: int | None
):
    """A preset name, a local SAELens directory, or an explicit shape."""
    from sae_tune.specs import SpecError, get_spec, spec_from_saelens_dir, spec_from_shape

    try:
        if sae is not None:
            if width is not None or d_model is not None:
                raise click.UsageError("give either --sae or --width/--d-model, not both")
            if Path(sae).is_dir():
                return spec_from_saelens_dir(sae, l0=l0)
            spec = get_spec(sae)
            return (
                spec
                if l0 is None
                else spec_from_shape(
                    spec.width, spec.d_model, l0, spec.arch, spec.k, name=f"{spec.name}-l0-{l0}"
                )
            )
        if width is None or d_model is None or l0 is None:
            raise click.UsageError("give --sae NAME|DIR, or all of --width, --d-model and --l0")
        return spec_from_shape(width, d_model, l0, arch, k)
    except (SpecError, KeyError, ValueError) as exc:
        raise click.UsageError(str(exc).strip("'\"")) from exc


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def format_table(results) -> str:
    from tabulate import tabulate

    rows = [
        (
            r.batch_size,
            r.best.label,
            f"{r.best_ms:.3f}",
            f"{r.dense_ms:.3f}",
            _ratio(r.speedup),
            _ratio(r.versus("sparse_csr")),
            _ratio(r.versus("embedding_bag_csr")),
            f"{r.trials} ({r.failed} failed)",
        )
        for r in results
    ]
    return tabulate(rows, headers=TABLE_HEADERS, tablefmt="github")


def run_tune(
    *,
    sae: str | None,
    width: int | None,
    d_model: int | None,
    l0: int | None,
    arch: str,
    k: int | None,
    device: str | None,
    dtype: str,
    batch_sizes: tuple[int, ...],
    trials: int,
    time_budget: float | None,
    acts_path: str | None,
    cache: str | None,
    storage: str | None,
    seed: int,
    as_json: bool,
) -> None:
    from tqdm import tqdm

    from sae_tune.autotune.search import Tuner, default_batch_sizes, quiet_optuna
    from sae_tune.autotune.workload import WorkloadError, load_acts
    from sae_tune.cache.store import CacheError, Store

    spec = resolve_spec(sae, width, d_model, l0, arch, k)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise click.UsageError("--device cuda: no CUDA device is available here")
    if dev.type not in ("cpu", "cuda"):
        raise click.UsageError(f"--device {dev}: only cpu and cuda are supported")
    sizes = batch_sizes or default_batch_sizes(dev)
    acts = None
    if acts_path is not None:
        try:
            acts = load_acts(acts_path, width=spec.width)
        except WorkloadError as exc:
            raise click.UsageError(str(exc)) from exc
    quiet_optuna()
    try:
        store = Store(cache)
    except CacheError as exc:
        raise click.ClickException(str(exc)) from exc
    show_bar = sys.stderr.isatty() and not as_json
    results = []
    with store:
        try:
            tuner = Tuner(
                spec, device=dev, dtype=DTYPES[dtype], store=store, acts=acts, seed=seed, storage=storage
            )
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        if not as_json:
            click.echo(
                f"{spec.name}: F={spec.width} D={spec.d_model} L0~{spec.l0} ({spec.arch}) on "
                f"{tuner.info.name} [{dev.type}], {dtype}; workload L0 mean {tuner.l0.mean:.1f}, "
                f"p99 {tuner.l0.p99}, max {tuner.l0.max}; cache {store.path}"
            )
        for b in sizes:
            with tqdm(total=trials, desc=f"B={b}", unit="trial", disable=not show_bar, leave=False) as bar:
                tuner.progress = lambda n, best: (bar.update(n), bar.set_postfix_str(best))
                results.append(tuner.tune_batch(b, trials=trials, time_budget=time_budget))
    if as_json:
        payload = {
            "sae": spec.name,
            "F": spec.width,
            "D": spec.d_model,
            "device": tuner.info.name,
            "device_kind": dev.type,
            "dtype": dtype,
            "torch": tuner.info.torch_version,
            "triton": tuner.info.triton_version,
            "cache": str(store.path),
            "results": [r.to_json() for r in results],
        }
        click.echo(json.dumps(payload, indent=1))
    else:
        click.echo(format_table(results))
        click.echo("ms: median wall-clock time per decode, re-timed interleaved with dense in one run.")


def tune_options(command):
    """Options of the main job (on the ``sae-tune`` group itself)."""
    options = [
        click.option("--sae", help="Preset name (see `sae-tune list`) or a local SAELens directory."),
        click.option("--width", type=click.IntRange(1), help="SAE width F (with --d-model and --l0)."),
        click.option("--d-model", type=click.IntRange(1), help="Model dimension D."),
        click.option("--l0", type=click.IntRange(1), help="Mean non-zero features per token."),
        click.option(
            "--arch", type=click.Choice(["jumprelu", "topk", "relu"]), default="jumprelu", show_default=True
        ),
        click.option("--k", type=click.IntRange(1), help="TopK only: features kept per token."),
        click.option("--device", help="cpu or cuda [default: cuda if available, else cpu]."),
        click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True),
        click.option(
            "--batch-size",
            "batch_sizes",
            type=click.IntRange(1),
            multiple=True,
            help="Tokens per decode; repeat for several [cpu: 1 32 128; cuda: 1 .. 4096].",
        ),
        click.option(
            "--trials",
            type=click.IntRange(1),
            default=20,
            show_default=True,
            help="Optuna trials per batch size.",
        ),
        click.option(
            "--time-budget",
            type=click.FloatRange(min=0, min_open=True),
            help="Seconds per batch size for the search.",
        ),
        click.option(
            "--acts",
            "acts_path",
            type=click.Path(exists=True, dir_okay=False),
            help="Real activations (.pt, .npy, .safetensors) instead of the synthetic workload.",
        ),
        click.option("--cache", type=click.Path(), help="SQLite cache file [env SAE_TUNE_CACHE]."),
        click.option("--storage", help="Optuna storage shared by processes: journal:PATH or a database URL."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object with a results list."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
