"""Sharing tuned configs: export winners to a versioned JSON file, import someone else's, ship per-GPU files.

An imported file comes from someone else and its configs steer which code runs here, so it is treated as
hostile: size-capped, strictly parsed (no NaN, no duplicate keys), and validated field by field (exact key
sets, exact types, ranges, known impl names, triton configs through ``Variant.from_dict``) before anything
is stored. A file is stored all or nothing, in one transaction; merging keeps the fastest per key.
"""

from __future__ import annotations

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
    Provenance,
    Store,
    WinnerRecord,
    check_key_field,
    check_provenance_field,
    check_winner,
)

SCHEMA = "sae-tune/configs"
VERSION = 1
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_RECORDS = 100_000
ENV_SHIPPED = "SAE_TUNE_SHIPPED_DIR"
SHIPPED_DIR = Path(__file__).with_name("shipped")

TOP_FIELDS = ("schema", "version", "provenance", "records")
RECORD_FIELDS = (*KEY_FIELDS, "impl", "config", "ms", "dense_ms", "provenance")


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


class ShippedConfigWarning(UserWarning):
    """A shipped per-GPU config file was skipped because it did not validate."""


@dataclass(frozen=True)
class ImportResult:
    path: Path
    records: int  # validated records in the file
    updated: int  # winners that changed (new key, or faster than the stored winner)


# --- export ------------------------------------------------------------------------------------------


def record_to_dict(rec: WinnerRecord) -> dict[str, Any]:
    """One exported record: key fields, impl, config, ms, dense_ms, provenance."""
    return {
        **rec.key.to_dict(),
        "impl": rec.impl,
        "config": dict(rec.config),
        "ms": rec.ms,
        "dense_ms": rec.dense_ms,
        "provenance": rec.provenance.to_dict(),
    }


def export_records(store: Store, device_name: str | None = None) -> dict[str, Any]:
    """The winners of ``store`` (optionally of one device) as a versioned, validated payload."""
    payload = {
        "schema": SCHEMA,
        "version": VERSION,
        "provenance": Provenance.current().to_dict(),
        "records": [record_to_dict(rec) for rec in store.winners(device_name)],
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
    """Read and strictly parse a config file, reading at most the size cap (+1 byte to detect more)."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigFileError(str(p), f"cannot read it ({exc.strerror or exc})") from None
    return parse_json(data, str(p))


# --- validation --------------------------------------------------------------------------------------


def _exact_keys(
    obj: dict[str, Any], allowed: tuple[str, ...], origin: str, record: int | None, prefix: str
) -> None:
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise ConfigFileError(
            origin, f"unknown field (allowed: {', '.join(allowed)})", record=record, field=prefix + unknown[0]
        )
    missing = [k for k in allowed if k not in obj]
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
    _exact_keys(obj, RECORD_FIELDS, origin, i, "")
    try:
        for name in KEY_FIELDS:
            check_key_field(name, obj[name])
        key = CacheKey(**{name: obj[name] for name in KEY_FIELDS})
        config = check_winner(key, obj["impl"], obj["config"], obj["ms"], obj["dense_ms"])
    except FieldError as exc:
        raise ConfigFileError(origin, exc.reason, record=i, field=exc.field) from None
    return WinnerRecord(
        key=key,
        impl=obj["impl"],
        config=config,
        ms=float(obj["ms"]),
        dense_ms=None if obj["dense_ms"] is None else float(obj["dense_ms"]),
        provenance=_provenance(obj["provenance"], origin, i, source),
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
    """Validate every record of ``path``, then merge them in one transaction (fastest per key wins)."""
    records = load_file(path)
    updated = store.import_winners(records)
    return ImportResult(path=Path(path), records=len(records), updated=updated)


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

    A file that fails validation is skipped with a ``ShippedConfigWarning`` naming it, so one bad file
    cannot take down dispatch; records come back with provenance source "shipped".
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
    "ImportResult",
    "ShippedConfigWarning",
    "export_records",
    "import_file",
    "load_file",
    "load_shipped",
    "parse_json",
    "read_payload",
    "record_to_dict",
    "shipped_dir",
    "validate_payload",
    "write_export",
]
