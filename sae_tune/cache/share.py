"""Sharing tuned configs: export winners to a versioned JSON file, import someone else's, ship per-GPU files.

An imported file comes from someone else and its configs steer which code runs here, so it is treated as
hostile: size-capped, strictly parsed (no NaN, no duplicate keys), and validated field by field (exact key
sets, exact types, ranges, known impl names, triton configs through ``Variant.from_dict``) before anything
is stored. A file is stored all or nothing, in one transaction. Only regular files are read (a FIFO or
device never blocks the process). Merging never replaces a time measured here: imported records fill keys
without a measured winner (the fastest per key among them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_tune.cache.store import (
    KEY_FIELDS,
    PROVENANCE_FIELDS,
    CacheKey,
    FieldError,
    FileTooLarge,
    NotRegularFile,
    Provenance,
    Store,
    WinnerRecord,
    check_key_field,
    check_provenance_field,
    check_spread,
    check_winner,
    clean_origin,
    read_capped,
)
from sae_tune.cpu_identity import model_of, readable_part

SCHEMA = "sae-tune/configs"
VERSION = 1
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_RECORDS = 100_000
ENV_SHIPPED = "SAE_TUNE_SHIPPED_DIR"
SHIPPED_DIR = Path(__file__).with_name("shipped")

TOP_FIELDS = ("schema", "version", "provenance", "records")
RECORD_FIELDS = (*KEY_FIELDS, "impl", "config", "ms", "dense_ms", "provenance")  # required
OPTIONAL_RECORD_FIELDS = ("spread",)  # relative IQR of the timing samples; absent or null: unknown


class ConfigFileError(ValueError):
    """A config file or payload was rejected; names the file, the record index and the field."""

    def __init__(
        self, origin: str, reason: str, *, record: int | None = None, field: str | None = None
    ) -> None:
        where = origin
        if record is not None:
            where += f": record {record}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {reason}")
        self.origin = origin
        self.record = record
        self.field = field
        self.reason = reason


class ConfigFileUnreadable(ConfigFileError):
    """The file itself cannot be used (missing, not a regular file, over the size cap), whatever it holds."""


class NoSuchDevice(ValueError):
    """An export for a device name that has no winners; the message lists the known device names."""


class ShippedConfigWarning(UserWarning):
    """A shipped per-GPU config file was skipped because it did not validate."""


@dataclass(frozen=True)
class ImportResult:
    """What an import did, counted per key (a file may hold several records of one key)."""

    path: Path
    records: int  # validated records in the file
    updated: int  # keys that had a winner and took the file's (faster than a stored imported winner)
    kept_local: int = 0  # keys whose winner was measured here, and so was kept
    added: int = 0  # keys that had no winner before
    unchanged: int = 0  # keys whose stored imported winner was faster (or quieter) and so was kept

    def summary(self) -> str:
        """``"2 added, 1 updated, 1 kept local (measured here, not replaced), 3 unchanged (...)"``; zero
        counts after the first two are left out."""
        parts = [f"{self.added} added", f"{self.updated} updated"]
        if self.kept_local:
            parts.append(f"{self.kept_local} kept local (measured here, not replaced)")
        if self.unchanged:
            parts.append(f"{self.unchanged} unchanged (the stored import is as fast or quieter)")
        return ", ".join(parts)


# --- export ------------------------------------------------------------------------------------------


def record_to_dict(rec: WinnerRecord) -> dict[str, Any]:
    """One exported record: key fields, impl, config, ms, dense_ms, provenance, and spread when known."""
    out = {
        **rec.key.to_dict(),
        "impl": rec.impl,
        "config": dict(rec.config),
        "ms": rec.ms,
        "dense_ms": rec.dense_ms,
        "provenance": rec.provenance.to_dict(),
    }
    if rec.spread is not None:
        out["spread"] = rec.spread
    return out


def matching_devices(store: Store, device_name: str) -> list[str]:
    """The stored device names equal to ``device_name`` ignoring case (a CPU's model name also matches the
    key names of every CPU of that model, whatever their digest); ``NoSuchDevice`` if there are none."""
    known = store.devices()
    # the name as typed, or as a key name holds it (whitespace-normalised, cut like a CPU's model part)
    wanted = {device_name.strip().casefold(), readable_part(device_name).casefold()}
    matched = [name for name in known if wanted & {name.casefold(), model_of(name).casefold()}]
    if not matched:
        listing = ", ".join(repr(name) for name in known) if known else "none: the cache has no winners"
        raise NoSuchDevice(f"no winners for device {device_name!r} in {store.path}; known devices: {listing}")
    return matched


def export_records(store: Store, device_name: str | None = None) -> dict[str, Any]:
    """The winners of ``store`` as a versioned, validated payload.

    ``device_name`` (matched ignoring case) keeps one device's winners; a name that matches none raises
    ``NoSuchDevice`` listing the known names, so a typo never writes an empty file.
    """
    if device_name is None:
        winners = store.winners(op=None)
    else:
        winners = [
            rec for name in matching_devices(store, device_name) for rec in store.winners(name, op=None)
        ]
    payload = {
        "schema": SCHEMA,
        "version": VERSION,
        "provenance": Provenance.current().to_dict(),
        "records": [record_to_dict(rec) for rec in winners],
    }
    validate_payload(payload, origin="export")  # what we write must be what we would accept
    return payload


def write_export(
    path: str | os.PathLike[str], store: Store, device_name: str | None = None
) -> dict[str, Any]:
    """Write ``export_records(...)`` to ``path`` atomically (a reader never sees half a file)."""
    payload = export_records(store, device_name)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return payload


# --- strict reading ----------------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key[:60]!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not allowed (JSON has no NaN or Infinity)")


def parse_json(text: str | bytes, origin: str = "payload") -> Any:
    """Strict JSON: size-capped, no NaN/Infinity, no duplicate keys; ConfigFileError otherwise."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigFileError(origin, f"larger than the {MAX_FILE_BYTES // (1024 * 1024)} MiB limit")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigFileError(origin, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except RecursionError:
        raise ConfigFileError(origin, "not valid JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, our hooks, and over-long integer literals
        raise ConfigFileError(origin, f"not valid JSON: {str(exc)[:200]}") from None


def read_payload(path: str | os.PathLike[str]) -> Any:
    """Read and strictly parse a config file.

    Only a regular file is read (opened non-blocking and checked with fstat, so a FIFO or device cannot
    hang the process), and only when its size is within the cap; ``ConfigFileUnreadable`` otherwise.
    """
    p = Path(path)
    try:
        data = read_capped(p, MAX_FILE_BYTES)
    except (NotRegularFile, FileTooLarge) as exc:
        raise ConfigFileUnreadable(str(p), str(exc)) from None
    except OSError as exc:
        raise ConfigFileUnreadable(str(p), f"cannot read it ({exc.strerror or exc})") from None
    return parse_json(data, str(p))


# --- validation --------------------------------------------------------------------------------------


def _exact_keys(
    obj: dict[str, Any],
    required: tuple[str, ...],
    origin: str,
    record: int | None,
    prefix: str,
    optional: tuple[str, ...] = (),
) -> None:
    allowed = (*required, *optional)
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise ConfigFileError(
            origin, f"unknown field (allowed: {', '.join(allowed)})", record=record, field=prefix + unknown[0]
        )
    missing = [k for k in required if k not in obj]
    if missing:
        raise ConfigFileError(origin, "missing field", record=record, field=prefix + missing[0])


def _provenance(obj: Any, origin: str, record: int | None, source: str) -> Provenance:
    if type(obj) is not dict:
        raise ConfigFileError(origin, "must be an object", record=record, field="provenance")
    _exact_keys(obj, PROVENANCE_FIELDS, origin, record, "provenance.")
    try:
        for name in PROVENANCE_FIELDS:
            check_provenance_field(name, obj[name])
    except FieldError as exc:
        raise ConfigFileError(origin, exc.reason, record=record, field=exc.field) from None
    return Provenance(**{name: obj[name] for name in PROVENANCE_FIELDS}, source=source)


def _record(obj: Any, i: int, origin: str, source: str) -> WinnerRecord:
    if type(obj) is not dict:
        raise ConfigFileError(origin, f"must be an object, got {type(obj).__name__}", record=i)
    _exact_keys(obj, RECORD_FIELDS, origin, i, "", OPTIONAL_RECORD_FIELDS)
    try:
        for name in KEY_FIELDS:
            check_key_field(name, obj[name])
        key = CacheKey(**{name: obj[name] for name in KEY_FIELDS})
        config = check_winner(key, obj["impl"], obj["config"], obj["ms"], obj["dense_ms"])
        spread = check_spread("spread", obj.get("spread"))
    except FieldError as exc:
        raise ConfigFileError(origin, exc.reason, record=i, field=exc.field) from None
    return WinnerRecord(
        key=key,
        impl=obj["impl"],
        config=config,
        ms=float(obj["ms"]),
        dense_ms=None if obj["dense_ms"] is None else float(obj["dense_ms"]),
        provenance=_provenance(obj["provenance"], origin, i, source),
        spread=spread,
    )


def validate_payload(obj: Any, *, origin: str = "payload", source: str = "imported") -> list[WinnerRecord]:
    """Validate a parsed payload completely; returns its records or raises ``ConfigFileError``."""
    if type(obj) is not dict:
        raise ConfigFileError(origin, f"must be a JSON object, got {type(obj).__name__}")
    _exact_keys(obj, TOP_FIELDS, origin, None, "")
    if obj["schema"] != SCHEMA or type(obj["schema"]) is not str:
        raise ConfigFileError(origin, f"must be {SCHEMA!r}", field="schema")
    version = obj["version"]
    if type(version) is not int:
        raise ConfigFileError(origin, f"must be an integer, got {type(version).__name__}", field="version")
    if version > VERSION:
        raise ConfigFileError(
            origin,
            f"written by a newer sae-tune (version {version}); this one reads {VERSION}",
            field="version",
        )
    if version != VERSION:
        raise ConfigFileError(origin, f"unsupported version {version}", field="version")
    _provenance(obj["provenance"], origin, None, source)
    records = obj["records"]
    if type(records) is not list:
        raise ConfigFileError(origin, f"must be a list, got {type(records).__name__}", field="records")
    if len(records) > MAX_RECORDS:
        raise ConfigFileError(
            origin, f"{len(records)} records, at most {MAX_RECORDS} allowed", field="records"
        )
    return [_record(rec, i, origin, source) for i, rec in enumerate(records)]


def load_file(path: str | os.PathLike[str], *, source: str = "imported") -> list[WinnerRecord]:
    """Read and validate one config file (nothing is stored)."""
    return validate_payload(read_payload(path), origin=str(path), source=source)


def import_file(store: Store, path: str | os.PathLike[str]) -> ImportResult:
    """Validate every record of ``path``, then merge them in one transaction.

    A key with a winner measured here keeps it (counted in ``kept_local``); other keys take the fastest
    record (``added`` where the key had no winner, ``updated`` where it replaced an imported one,
    ``unchanged`` where the stored one stays). Imported winners remember the file's name, which
    ``explain()`` shows.
    """
    origin = clean_origin(Path(path).name)
    records = [dataclasses.replace(rec, origin=origin) for rec in load_file(path)]
    merged = store.merge_winners(records)
    return ImportResult(
        path=Path(path),
        records=len(records),
        updated=merged.updated,
        kept_local=merged.kept_local,
        added=merged.added,
        unchanged=merged.unchanged,
    )


# --- shipped per-GPU files ---------------------------------------------------------------------------


def shipped_dir() -> Path:
    """``$SAE_TUNE_SHIPPED_DIR`` if set, else the package's ``cache/shipped`` folder."""
    env = os.environ.get(ENV_SHIPPED)
    return Path(env).expanduser() if env else SHIPPED_DIR


def _fastest(records: Iterable[WinnerRecord]) -> list[WinnerRecord]:
    best: dict[str, WinnerRecord] = {}
    for rec in records:
        cur = best.get(rec.key.id)
        if cur is None or rec.ms < cur.ms:
            best[rec.key.id] = rec
    return list(best.values())


def load_shipped(
    directory: str | os.PathLike[str] | None = None, device_name: str | None = None
) -> list[WinnerRecord]:
    """Validated records of every ``*.json`` in the shipped folder (fastest per key).

    A file that fails validation, or an entry that is not a regular file (a FIFO is never opened for a
    blocking read), is skipped with a ``ShippedConfigWarning`` naming it, so one bad file cannot take down
    dispatch; records come back with provenance source "shipped".
    """
    folder = Path(directory) if directory is not None else shipped_dir()
    if not folder.is_dir():
        if directory is not None or os.environ.get(ENV_SHIPPED):
            warnings.warn(
                f"shipped config folder {folder} does not exist", ShippedConfigWarning, stacklevel=2
            )
        return []
    records: list[WinnerRecord] = []
    for path in sorted(folder.glob("*.json")):
        try:
            records += load_file(path, source="shipped")
        except ConfigFileError as exc:
            warnings.warn(f"skipping shipped config file {path}: {exc}", ShippedConfigWarning, stacklevel=2)
    if device_name is not None:
        records = [rec for rec in records if rec.key.device_name == device_name]
    return _fastest(records)


__all__ = [
    "ConfigFileError",
    "ConfigFileUnreadable",
    "ImportResult",
    "NoSuchDevice",
    "ShippedConfigWarning",
    "export_records",
    "import_file",
    "load_file",
    "load_shipped",
    "matching_devices",
    "parse_json",
    "read_payload",
    "record_to_dict",
    "shipped_dir",
    "validate_payload",
    "write_export",
]
