"""``sae-tune cache ...``: look at, clear, export and import the tuning cache.

Exit status: 0 done; 1 a config file whose content is invalid or a cache that is not usable; 2 a command
that cannot run as given (a device name with no winners, an import path that is not a readable regular
file, a cache this user may not write).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:  # the cache modules import sqlite-utils (and through it pandas) and the targets (torch):
    # imported when a command runs, so that `sae-tune --help` and `sae-tune cache --help` start fast
    from sae_tune.cache.store import CacheError, Store

cache_option = click.option("--cache", type=click.Path(), help="SQLite cache file [env SAE_TUNE_CACHE].")


class CannotRun(click.ClickException):
    """The command cannot run as given (exit status 2, like a usage error, but without the usage text)."""

    exit_code = 2


def _cache_error(exc: CacheError) -> click.ClickException:
    from sae_tune.cache.store import CacheReadOnlyError

    return CannotRun(str(exc)) if isinstance(exc, CacheReadOnlyError) else click.ClickException(str(exc))


def open_store(cache: str | None, *, write: bool = True) -> Store:
    """The cache for a command; ``write=False`` opens someone else's cache read-only instead of failing."""
    from sae_tune.cache.store import CacheError, Store

    try:
        return Store(cache) if write else Store.for_reading(cache)
    except CacheError as exc:
        raise _cache_error(exc) from exc


@click.group("cache")
def cache_group() -> None:
    """The local cache of measurements and winners (SQLite)."""


@cache_group.command("show")
@cache_option
@click.option("--json", "as_json", is_flag=True)
def show(cache: str | None, as_json: bool) -> None:
    """Counts, and the winner of every key, decode and encode (time ± relative spread of its samples)."""
    from tabulate import tabulate

    from sae_tune.cache.store import CacheError, format_ms

    with open_store(cache, write=False) as store:
        try:
            summary = store.summary()
            winners = store.winners(op=None)
        except CacheError as exc:  # a row that is not valid (an edited or damaged file)
            raise _cache_error(exc) from exc
    if as_json:
        summary["winners_list"] = [
            {
                **w.key.to_dict(),
                "impl": w.impl,
                "config": w.config,
                "ms": w.ms,
                "spread": w.spread,
                "noisy": w.noisy,
                "dense_ms": w.dense_ms,
                "source": w.provenance.source,
                "origin": w.origin,
            }
            for w in winners
        ]
        click.echo(json.dumps(summary, indent=1))
        return
    click.echo(
        f"{summary['path']}{' (read-only)' if summary['read_only'] else ''}: {summary['trials']} trials "
        f"({summary['failed_trials']} failed), {summary['winners']} winners, {summary['baselines']} baselines"
    )
    rows = [
        (
            w.key.device_name,
            w.key.op,
            w.key.dtype,
            w.key.F,
            w.key.D,
            w.key.batch_bucket,
            w.key.l0_bucket,
            w.impl,
            json.dumps(w.config, sort_keys=True),
            format_ms(w.ms, w.spread),
            "-" if w.speedup is None else f"{w.speedup:.2f}x" + (" (noisy)" if w.noisy else ""),
            w.provenance.source if w.origin is None else f"imported from {w.origin}",
        )
        for w in winners
    ]
    if rows:
        headers = (
            "device",
            "op",
            "dtype",
            "F",
            "D",
            "batch bucket",
            "L0 bucket",
            "impl",
            "config",
            "time",
            "vs dense",
            "source",
        )
        click.echo(tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True))


@cache_group.command("clear")
@cache_option
@click.option("--yes", is_flag=True, help="Do not ask.")
def clear(cache: str | None, yes: bool) -> None:
    """Forget every trial, winner and baseline."""
    from sae_tune.cache.store import CacheError

    with open_store(cache) as store:
        if not yes:
            s = store.summary()
            click.confirm(
                f"Delete {s['trials']} trials, {s['baselines']} baselines and {s['winners']} winners "
                f"from {store.path}?",
                abort=True,
            )
        try:
            store.clear()
        except CacheError as exc:
            raise _cache_error(exc) from exc
        click.echo(f"cleared {store.path}")


@cache_group.command("export")
@cache_option
@click.option(
    "--device", "device_name", help="Only this device (GPU name or CPU model; case does not matter)."
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True)
def export(cache: str | None, device_name: str | None, output: str) -> None:
    """Write the winners to a versioned JSON file, with provenance, to share per GPU model."""
    from sae_tune.cache.share import ConfigFileError, NoSuchDevice, write_export
    from sae_tune.cache.store import CacheError

    with open_store(cache, write=False) as store:
        try:
            payload = write_export(output, store, device_name)
        except NoSuchDevice as exc:
            raise CannotRun(str(exc)) from exc
        except CacheError as exc:  # a row that is not valid (an edited or damaged file)
            raise _cache_error(exc) from exc
        except ConfigFileError as exc:  # a stored winner that a config file may not hold: nothing written
            raise click.ClickException(f"{store.path}: cannot export: {exc}") from exc
        except OSError as exc:
            raise CannotRun(f"cannot write {output}: {exc.strerror or exc}") from exc
    click.echo(f"wrote {len(payload['records'])} records to {output}")


@cache_group.command("import")
@cache_option
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def import_(cache: str | None, path: str) -> None:
    """Merge a shared config file; a key measured here keeps its own winner; a bad file stores nothing."""
    from sae_tune.cache.share import ConfigFileError, ConfigFileUnreadable, import_file
    from sae_tune.cache.store import CacheError

    with open_store(cache) as store:
        try:
            result = import_file(store, path)
        except ConfigFileUnreadable as exc:
            raise CannotRun(str(exc)) from exc
        except ConfigFileError as exc:
            raise click.ClickException(str(exc)) from exc
        except CacheError as exc:
            raise _cache_error(exc) from exc
    message = f"imported {result.records} records from {path}: {result.updated} winners updated"
    if result.kept_local:
        message += f", {result.kept_local} kept local (measured here, not replaced)"
    click.echo(message)
