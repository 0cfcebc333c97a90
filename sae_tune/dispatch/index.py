"""The tuned configs one process dispatches from, held in memory.

The local cache is read once, read-only: a missing file stays missing (nothing is created next to it), a
file that is not a readable sae-tune cache gives one warning and an empty index, and each row is validated
again (key fields, implementation name, config through ``Variant.from_dict``) so that a row written by
another version or edited by hand is skipped with a warning instead of steering a decode. The hot path
only looks up dictionaries built here; SQLite is never queried after ``load``.

For one key a time measured here outranks an imported one, which outranks a shipped one. Shipped records
apply only to their own batch bucket or the next one up or down (a factor of 2): further away the cost
model, which sees the actual batch, decides.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import stat
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

from sae_tune.cache.store import (
    KEY_FIELDS,
    SCHEMA_NAME,
    SCHEMA_VERSION,
    SOURCES,
    CacheError,
    CacheKey,
    FieldError,
    Provenance,
    WinnerRecord,
    check_spread,
    check_winner,
    clean_origin,
    connect_read_only,
    format_ms,
    validate_config,
)
from sae_tune.cpu_identity import current_device_name
from sae_tune.dispatch.decision import DispatchWarning, Option
from sae_tune.dispatch.identity import Identity

# A shipped record applies to its own batch bucket and the neighbouring ones (a factor of 2), no further.
SHIPPED_MAX_BUCKET_STEPS = 1
# For one key: measured here, then imported, then shipped.
SOURCE_RANK = {"measured": 0, "imported": 1, "shipped": 2}


class CacheUnreadable(Exception):
    """The cache file cannot be read as an sae-tune cache; the message says why."""


# --- reading the local cache ---------------------------------------------------------------------------


def _rows(path: Path) -> list[dict[str, Any]]:
    try:
        conn = connect_read_only(path, 5.0)  # regular files only; creates no -wal/-shm (never blocks)
    except CacheError as exc:
        raise CacheUnreadable(str(exc).removeprefix(f"sae-tune cache {path}: ")) from None
    try:
        conn.row_factory = sqlite3.Row
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return []  # an empty database: what a fresh Store starts from
        if "meta" not in tables or "winners" not in tables:
            raise CacheUnreadable(f"not an sae-tune cache (tables: {', '.join(sorted(tables)[:6])})")
        meta = {r[0]: r[1] for r in conn.execute("SELECT key, value FROM meta")}
        if meta.get("schema") != SCHEMA_NAME:
            raise CacheUnreadable("not an sae-tune cache (no sae-tune schema in meta)")
        version = meta.get("schema_version", "")
        if not str(version).isdigit() or int(version) > SCHEMA_VERSION:
            raise CacheUnreadable(f"schema version {version!r}; this sae-tune reads {SCHEMA_VERSION}")
        return [dict(r) for r in conn.execute("SELECT * FROM winners ORDER BY key_id")]
    finally:
        conn.close()


def _record(row: dict[str, Any]) -> WinnerRecord:
    try:
        fields = {name: row[name] for name in KEY_FIELDS}
        # a CPU key name written by an earlier release reads as its current name (a read-only cache that
        # was never migrated keeps serving its winners)
        fields["device_name"] = current_device_name(fields["device_name"])
        key = CacheKey(**fields)
        config = json.loads(row["config"])
        canonical = check_winner(key, row["impl"], config, row["ms"], row["dense_ms"])
        source = row.get("source") if row.get("source") in SOURCES else "measured"
        prov = Provenance(row["recorded_at"], row["sae_tune_version"], row["host_kind"], source)
        spread = check_spread("spread", row.get("spread"))  # absent in schema version 1
        origin = row.get("origin")
        origin = clean_origin(origin) if source == "imported" and isinstance(origin, str) else None
    except FieldError as exc:
        raise ValueError(str(exc)) from None
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"malformed row ({type(exc).__name__}: {exc})") from None
    return WinnerRecord(key, row["impl"], canonical, float(row["ms"]), row["dense_ms"], prov, spread, origin)


def read_local(path: Path) -> list[WinnerRecord]:
    """Valid winners of the cache at ``path``; [] if it does not exist. Warns (never raises) otherwise."""
    try:
        if not path.exists():
            return []
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "a FIFO, device or socket"
            raise CacheUnreadable(f"is {kind}, not a regular file")
        if info.st_size == 0:
            return []
        rows = _rows(path)
    except (CacheUnreadable, OSError, sqlite3.Error) as exc:
        warnings.warn(
            f"sae-tune cache {path} is not readable ({exc}); decoding without it (the file is left as is)",
            DispatchWarning,
            stacklevel=2,
        )
        return []
    records = []
    for row in rows:
        try:
            records.append(_record(row))
        except ValueError as exc:
            what = f"{row.get('impl')!r} for F={row.get('F')} D={row.get('D')} {row.get('dtype')}"
            warnings.warn(
                f"skipping sae-tune cache entry {what} in {path}: {exc}", DispatchWarning, stacklevel=2
            )
    return records


def check_injected(records: Iterable[WinnerRecord]) -> list[WinnerRecord]:
    """Records handed over in Python (not from a file): their configs must still name runnable code."""
    out = []
    for rec in records:
        if not isinstance(rec, WinnerRecord):
            raise TypeError(f"expected WinnerRecord, got {type(rec).__name__}")
        out.append(dataclasses.replace(rec, config=validate_config(rec.impl, dict(rec.config), rec.key.op)))
    return out


# --- lookups ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tier:
    """Entries that rank equally for a call (same batch bucket distance and staleness); several entries
    in one tier differ only by L0 bucket."""

    options: tuple[Option, ...]


def _shape_key(key: CacheKey) -> tuple[Any, ...]:
    return key.device_name, key.capability, key.dtype, key.F, key.D


class CacheIndex:
    """Local (measured and imported) and shipped winners grouped by (device, dtype, F, D)."""

    def __init__(self, local: Iterable[WinnerRecord] = (), shipped: Iterable[WinnerRecord] = ()) -> None:
        self._local: dict[tuple[Any, ...], list[WinnerRecord]] = defaultdict(list)
        self._shipped: dict[tuple[Any, ...], list[WinnerRecord]] = defaultdict(list)
        for rec in local:
            if rec.key.op == "decode":  # encode winners are the encode chooser's (encode_choice.py)
                self._local[_shape_key(rec.key)].append(rec)
        for rec in shipped:
            if rec.key.op == "decode":
                self._shipped[_shape_key(rec.key)].append(rec)

    def __len__(self) -> int:
        return sum(map(len, self._local.values())) + sum(map(len, self._shipped.values()))

    def tiers(self, ident: Identity, dtype: str, F: int, D: int, batch_bucket: int) -> list[Tier]:
        """Candidates for one call, best first: local (exact, then nearest batch bucket), then shipped
        (its own batch bucket, then one step away). For one key, measured outranks imported."""
        shape = (ident.device_name, ident.capability, dtype, F, D)
        shipped = [
            rec
            for rec in self._shipped.get(shape, ())
            if _steps(rec.key.batch_bucket, batch_bucket) <= SHIPPED_MAX_BUCKET_STEPS
        ]
        return [
            *_ranked(self._local.get(shape, ()), ident, batch_bucket, shipped=False),
            *_ranked(shipped, ident, batch_bucket, shipped=True),
        ]


def _steps(a: int, b: int) -> float:
    """How many factors of 2 lie between two batch buckets."""
    return abs(math.log2(a / b))


def _stale(rec: WinnerRecord, ident: Identity) -> list[str]:
    """Software differences between where ``rec`` was measured and here."""
    out = []
    if rec.key.torch_version != ident.torch_version:
        out.append(f"torch {rec.key.torch_version}")
    from sae_tune.targets import target_of

    try:
        out += target_of(rec.impl).stale(rec.key, ident)
    except ValueError:
        out.append(f"unknown implementation {rec.impl}")
    return out


def _source(rec: WinnerRecord, shipped: bool) -> str:
    return "shipped" if shipped else rec.provenance.source


def _ranked(records: Sequence[WinnerRecord], ident: Identity, bucket: int, *, shipped: bool) -> list[Tier]:
    """Tiers by batch bucket distance and staleness; inside a tier (entries differing by L0 bucket) the
    order is measured, imported, shipped, then time, so that for one key the measured entry is chosen."""

    def rank(rec: WinnerRecord) -> tuple[float, bool, int]:
        return _steps(rec.key.batch_bucket, bucket), bool(_stale(rec, ident)), rec.key.batch_bucket

    def order(rec: WinnerRecord) -> tuple[Any, ...]:
        return rank(rec), SOURCE_RANK.get(_source(rec, shipped), 0), rec.ms

    tiers = []
    for (distance, stale, _), group in groupby(sorted(records, key=order), key=rank):
        options = []
        for rec in group:
            source = "shipped" if shipped else ("cache" if distance == 0 and not stale else "nearest")
            options.append(
                Option.of(
                    rec.impl,
                    rec.config,
                    source,
                    _reason(rec, bucket, _stale(rec, ident), _source(rec, shipped)),
                    l0_bucket=rec.key.l0_bucket,
                )
            )
        tiers.append(Tier(tuple(options)))
    return tiers


def _reason(rec: WinnerRecord, bucket: int, stale: list[str], origin: str) -> str:
    """One line for ``explain()``: where the entry came from (measured here, imported from a file on a
    date, or shipped), what it was tuned for, and its time."""
    key = rec.key
    date = rec.provenance.date[:10]
    if origin == "shipped":
        where = f"shipped (measured {date}) for"
    elif origin == "imported":
        where = f"imported from {rec.origin or 'a shared file'} (measured {date}) for"
    else:
        where = f"measured here ({date}) on"
    text = (
        f"{where} {key.device_name}, {key.dtype} F={key.F} D={key.D} batch bucket {key.batch_bucket}"
        f" (L0 bucket {key.l0_bucket}): {format_ms(rec.ms, rec.spread, '.3g')}"
    )
    if rec.dense_ms is not None:
        text += f" vs dense {rec.dense_ms:.3g} ms"
    if key.batch_bucket != bucket:
        text += f"; nearest to this batch bucket {bucket}"
    if stale:
        text += f"; measured with {', '.join(stale)}"
    return text
