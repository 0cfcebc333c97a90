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
    from sae_tune.cache.store import CacheError, Store, WinnerRecord

WIDTH = 120  # the columns `cache show` fits by default (without --wide)

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
@click.option("--json", "as_json", is_flag=True, help="Every field of every winner, as JSON.")
@click.option(
    "--wide",
    is_flag=True,
    help="One table with the full device names and configs (JSON), however wide; the default fits "
    f"{WIDTH} columns.",
)
def show(cache: str | None, as_json: bool, wide: bool) -> None:
    """Counts, and the winner of every key, decode and encode (time ± relative spread of its samples)."""
    from sae_tune.cache.store import CacheError

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
    click.echo(f"{summary['path']}{' (read-only)' if summary['read_only'] else ''}")
    click.echo(
        f"{summary['trials']} trials ({summary['failed_trials']} failed), {summary['winners']} winners, "
        f"{summary['baselines']} baselines"
    )
    if winners:
        click.echo("\n".join(wide_table(winners) if wide else narrow_tables(winners)))


def _speedup(w: WinnerRecord) -> str:
    """The winner's speedup over dense, flagged when its time is noisy (then it is not a speedup)."""
    if w.speedup is None:
        return "-"
    return f"{w.speedup:.2f}x" + (" (noisy)" if w.noisy else "")


def _source(w: WinnerRecord) -> str:
    """Where the winner's time comes from: "measured", "shipped", or the file it was imported from."""
    return w.provenance.source if w.origin is None else f"imported from {w.origin}"


def wide_table(winners: list[WinnerRecord]) -> list[str]:
    """Every winner in one table, device names and configs (JSON) in full: as wide as they are."""
    from tabulate import tabulate

    from sae_tune.cache.store import format_ms

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
            _speedup(w),
            _source(w),
        )
        for w in winners
    ]
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
    return ["", tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)]


def config_label(w: WinnerRecord) -> str:
    """The short name its target gives the winner's config (``cpu[c-fused-t1-d4096-...]``), as ``explain``
    and the tuner print it; the impl and its JSON config if no target can name it."""
    from sae_tune.cache.store import ENCODE_OPS, encode_owner
    from sae_tune.targets import target_of

    try:
        if w.key.op in ENCODE_OPS:
            target = encode_owner(w.impl)
            if target is not None:
                return target.encode_label(w.impl, w.config)
        else:
            return target_of(w.impl).label(w.impl, w.config)
    except (TypeError, ValueError):
        pass
    return f"{w.impl} {json.dumps(w.config, sort_keys=True)}"


DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
OP_ORDER = {"decode": 0, "encode": 1, "encode_topk": 2}  # under each device, decode first


def elide(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, its end replaced by "..." when cut."""
    return text if len(text) <= width else text[: max(width - 3, 0)] + "..."


def elide_device(name: str, width: int) -> str:
    """A device name cut to ``width`` characters; a CPU key name ("model [arch digest]") keeps its
    bracket, which tells two CPUs of one model apart, and loses the end of its model name."""
    if len(name) <= width:
        return name
    cut = name.rfind(" [")
    if name.endswith("]") and cut > 0 and len(name) - cut <= width // 2:
        return elide(name[:cut], width - (len(name) - cut)) + name[cut:]
    return elide(name, width)


def narrow_tables(winners: list[WinnerRecord], width: int = WIDTH) -> list[str]:
    """The winners under a line per device and a line per op, dtype and shape, each line at most ``width``
    characters: configs by their labels, and a device name, label or imported file's name that is still too
    long elided (``--wide`` shows them in full)."""
    from sae_tune.cache.store import format_ms

    groups: dict[str, dict[tuple[str, str, int, int], list[WinnerRecord]]] = {}
    for w in winners:
        k = w.key
        groups.setdefault(k.device_name, {}).setdefault((k.op, k.dtype, k.F, k.D), []).append(w)
    lines: list[str] = []
    for device, by_shape in groups.items():
        capability = next(iter(by_shape.values()))[0].key.capability
        sm = "" if capability is None else f" (sm {capability})"
        lines += ["", elide_device(device, width - len(sm)) + sm]
        for (op, dtype, F, D), group in sorted(
            by_shape.items(), key=lambda item: OP_ORDER.get(item[0][0], 9)
        ):
            rows = [
                [
                    str(w.key.batch_bucket),
                    str(w.key.l0_bucket),
                    config_label(w),
                    format_ms(w.ms, w.spread),
                    _speedup(w),
                    _source(w),
                ]
                for w in group
            ]
            lines.append(elide(f"  {op}, {DTYPES.get(dtype, dtype)}, F={F}, D={D}", width))
            lines += ["    " + line for line in text_table(NARROW_HEADERS, rows, width - 4)]
    lines += [
        "",
        "`sae-tune cache show --wide` shows device names and configs in full, `--json` every field.",
    ]
    return lines


# (header lines, right-aligned, narrowest it may be elided to: 0 never) per column of the narrow table
NARROW_HEADERS = (
    (("", "batch"), True, 0),
    (("", "L0"), True, 0),
    (("", "winner"), False, 24),
    (("", "time"), False, 0),
    (("vs", "dense"), True, 0),
    (("", "source"), False, 11),
)


def text_table(
    columns: tuple[tuple[tuple[str, ...], bool, int], ...], rows: list[list[str]], width: int
) -> list[str]:
    """A plain table, columns two spaces apart, trailing blanks removed; the widest column that may be
    elided loses a character at a time (its cells end in "...") until every line fits ``width``."""
    widths = [max(len(h) for h in head) for head, _, _ in columns]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    excess = sum(widths) + 2 * (len(widths) - 1) - width
    while excess > 0:
        shrinkable = [i for i, (_, _, least) in enumerate(columns) if least and widths[i] > least]
        if not shrinkable:
            break
        widths[max(shrinkable, key=lambda j: widths[j])] -= 1
        excess -= 1

    def line(cells: list[str]) -> str:
        parts = [
            elide(cell, w).rjust(w) if right else elide(cell, w).ljust(w)
            for cell, w, (_, right, _) in zip(cells, widths, columns, strict=True)
        ]
        return "  ".join(parts).rstrip()

    depth = max(len(head) for head, _, _ in columns)
    heads = [line([head[k] if k < len(head) else "" for head, _, _ in columns]) for k in range(depth)]
    return [h for h in heads if h] + [line(["-" * w for w in widths])] + [line(row) for row in rows]


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
    click.echo(f"imported {result.records} records from {path}: {result.summary()}")
