"""``sae-tune cache ...``: look at, clear, export and import the tuning cache."""

from __future__ import annotations

import json

import click

from sae_tune.cache.share import ConfigFileError, import_file, write_export
from sae_tune.cache.store import CacheError, Store

cache_option = click.option("--cache", type=click.Path(), help="SQLite cache file [env SAE_TUNE_CACHE].")


def open_store(cache: str | None) -> Store:
    try:
        return Store(cache)
    except CacheError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group("cache")
def cache_group() -> None:
    """The local cache of measurements and winners (SQLite)."""


@cache_group.command("show")
@cache_option
@click.option("--json", "as_json", is_flag=True)
def show(cache: str | None, as_json: bool) -> None:
    """Counts, and the winner of every key."""
    from tabulate import tabulate

    with open_store(cache) as store:
        summary = store.summary()
        winners = store.winners()
    if as_json:
        summary["winners_list"] = [
            {
                **w.key.to_dict(),
                "impl": w.impl,
                "config": w.config,
                "ms": w.ms,
                "dense_ms": w.dense_ms,
                "source": w.provenance.source,
            }
            for w in winners
        ]
        click.echo(json.dumps(summary, indent=1))
        return
    click.echo(
        f"{summary['path']}: {summary['trials']} trials ({summary['failed_trials']} failed), "
        f"{summary['winners']} winners, {summary['baselines']} baselines"
    )
    rows = [
        (
            w.key.device_name,
            w.key.dtype,
            w.key.F,
            w.key.D,
            w.key.batch_bucket,
            w.key.l0_bucket,
            w.impl,
            json.dumps(w.config, sort_keys=True),
            f"{w.ms:.3f}",
            "-" if w.speedup is None else f"{w.speedup:.2f}x",
            w.provenance.source,
        )
        for w in winners
    ]
    if rows:
        headers = ("device", "dtype", "F", "D", "batch", "L0", "impl", "config", "ms", "vs dense", "source")
        click.echo(tabulate(rows, headers=headers, tablefmt="github"))


@cache_group.command("clear")
@cache_option
@click.option("--yes", is_flag=True, help="Do not ask.")
def clear(cache: str | None, yes: bool) -> None:
    """Forget every trial, winner and baseline."""
    with open_store(cache) as store:
        if not yes:
            click.confirm(
                f"Delete all {store.summary()['trials']} trials and winners in {store.path}?", abort=True
            )
        store.clear()
        click.echo(f"cleared {store.path}")


@cache_group.command("export")
@cache_option
@click.option("--device", "device_name", help="Only this device (GPU name or CPU model).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
def export(cache: str | None, device_name: str | None, output: str) -> None:
    """Write the winners to a versioned JSON file, with provenance, to share per GPU model."""
    with open_store(cache) as store:
        payload = write_export(output, store, device_name)
    click.echo(f"wrote {len(payload['records'])} records to {output}")


@cache_group.command("import")
@cache_option
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def import_(cache: str | None, path: str) -> None:
    """Merge a shared config file, keeping the fastest per key; a bad file stores nothing."""
    with open_store(cache) as store:
        try:
            result = import_file(store, path)
        except ConfigFileError as exc:
            raise click.ClickException(str(exc)) from exc
    click.echo(f"imported {result.records} records from {path}: {result.updated} winners updated")
