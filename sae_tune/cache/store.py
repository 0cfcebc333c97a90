"""The local SQLite cache: every trial, the winner per key, baselines, and where each number came from.

The store is the source of truth for tuned configs on this machine. It is written by several processes at
once (parallel tuning runs, a notebook and a CLI), so it runs in WAL mode with a busy timeout and takes the
write lock up front (``BEGIN IMMEDIATE``) for every write. It sits at a path the user chose or a default
cache path, where another program's file may already be; so an existing file is inspected through a
read-only connection first, and a corrupt file, a foreign database or a newer schema raises ``CacheError``
naming the path and the problem, without a byte of that file being changed.

A time measured here is the truth for its key: imported and shipped records only fill keys that have no
measured winner. A cache someone else owns (no write permission on the file or its folder) is opened
read-only for reading, creating no ``-wal``/``-shm`` files that would lock its owner out; writing to it is
refused with a ``CacheError`` saying it is read-only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import sqlite3
import stat
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from sqlite_utils import Database
from sqlite_utils.db import Table

from sae_tune.cpu_identity import cpu_key_name, legacy_names
from sae_tune.paths import user_cache_dir
from sae_tune.targets import IMPLS, TARGETS, ConfigFieldError, Target, target_of

SCHEMA_NAME = "sae-tune-cache"
SCHEMA_VERSION = 2  # 2: "spread" on trials, baselines and winners; "origin" on winners
ENV_CACHE = "SAE_TUNE_CACHE"
DEFAULT_FILE_NAME = "cache.sqlite"

# "decode": sparse_decode. "encode": sparse_encode of a ReLU or JumpReLU SAE (one code path, whose cost no
# L0 known before encoding changes: l0_bucket is 0, "any"). "encode_topk": sparse_encode of a TopK SAE (a
# running top-k, whose cost grows with k: l0_bucket is the bucket of k, the L0 its activations have).
OPS = ("decode", "encode", "encode_topk")
ENCODE_OPS = ("encode", "encode_topk")
DTYPES = ("float32", "float16", "bfloat16")
SOURCES = ("measured", "imported", "shipped")
TABLES = ("meta", "trials", "winners", "baselines")

KEY_FIELDS = (
    "device_name",
    "capability",
    "torch_version",
    "triton_version",
    "template_hash",
    "op",
    "dtype",
    "F",
    "D",
    "batch_bucket",
    "l0_bucket",
)
PROVENANCE_FIELDS = ("date", "sae_tune_version", "host_kind")

MAX_F = 1 << 26
MAX_D = 1 << 18
MAX_BATCH_BUCKET = 1 << 24
MAX_MS = 1e7
MAX_ERROR_CHARS = 4000
MAX_TEXT = 200
MAX_DEVICE_NAME = 128  # CPU key names are at most KEY_NAME_MAX, GPU names GPU_NAME_MAX
MAX_SPREAD = 1e6
MAX_ORIGIN = 200
# A timing whose samples' interquartile range exceeds this fraction of their median is noisy: a quiet
# machine shows a few percent; past half the median the median itself says little (another process took
# the cores). A noisy winner is shown flagged and is replaced by the next quiet measurement of its key.
NOISY_SPREAD = 0.5


def is_noisy(spread: float | None) -> bool:
    """Whether a stored relative spread marks its time as noise rather than speed (None: unknown, quiet)."""
    return spread is not None and spread > NOISY_SPREAD


class CacheError(RuntimeError):
    """The cache file cannot be used; the message names the path and the problem."""


class CacheReadOnlyError(CacheError):
    """A write to a cache this process may not write (someone else's file or folder)."""


class FieldError(ValueError):
    """A value that may not be stored; ``field`` names it (e.g. "F", "config", "provenance.date")."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# --- small helpers ----------------------------------------------------------------------------------


def _show(value: Any) -> str:
    """A short, escaped rendering of an untrusted value for error messages."""
    if type(value) is int and value.bit_length() > 128:
        return f"<int of {value.bit_length()} bits>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def batch_bucket(b: int) -> int:
    """The batch bucket of batch size ``b``: the smallest power of two >= b (so 33..64 share a winner)."""
    if type(b) is not int or b < 1:
        raise ValueError(f"batch size must be a positive int, got {_show(b)}")
    return next_pow2(b)


def encode_l0_bucket(k: int | None, F: int) -> int:
    """The L0 bucket of an encode key: 0 ("any") for ReLU/JumpReLU, the bucket of k (at most F's) for TopK."""
    return 0 if k is None else min(next_pow2(k), next_pow2(F))


def l0_bucket(l0: float) -> int:
    """The L0 bucket of a mean L0: the smallest power of two >= it (L0 <= 1, e.g. a dead batch, is 1)."""
    if isinstance(l0, bool) or not isinstance(l0, (int, float)) or not math.isfinite(l0) or l0 < 0:
        raise ValueError(f"mean L0 must be a finite number >= 0, got {_show(l0)}")
    return next_pow2(math.ceil(l0))


def sae_tune_version() -> str:
    """The installed sae-tune version (provenance); the package's own ``__version__`` when the installed
    metadata is absent or unreadable (an uninstalled tree, or a user who cannot read the install folder,
    where ``metadata.version`` returns None), else "0+unknown"."""
    try:
        installed = metadata.version("sae-tune")
    except metadata.PackageNotFoundError:
        installed = None
    if installed:
        return installed
    version = getattr(sys.modules.get("sae_tune"), "__version__", None)
    return str(version) if version else "0+unknown"


def host_kind() -> str:
    """What kind of host measured a number, e.g. "linux-x86_64" (no host names: exports are shared)."""
    kind = f"{platform.system() or 'unknown'}-{platform.machine() or 'unknown'}".lower()
    return re.sub(r"[^a-z0-9_.-]", "_", kind)[:64]


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- field validation (shared with share.py, so files and Python callers obey the same rules) --------

_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+!-]{0,63}")
_HASH_RE = re.compile(r"[A-Za-z0-9_.:-]{1,80}")
_CAPABILITY_RE = re.compile(r"[0-9]{1,2}\.[0-9]{1,2}")
_HOST_KIND_RE = re.compile(r"[a-z0-9_.-]{1,64}")


def _text(field: str, value: Any, limit: int = MAX_TEXT) -> str:
    if type(value) is not str:
        raise FieldError(field, f"must be a string, got {type(value).__name__} {_show(value)}")
    if not 1 <= len(value) <= limit:
        raise FieldError(field, f"must be 1..{limit} characters, got {len(value)}")
    if not value.isprintable() or value != value.strip():
        raise FieldError(field, f"must be printable text without surrounding spaces, got {_show(value)}")
    return value


def _pattern(field: str, value: Any, regex: re.Pattern[str], what: str) -> str:
    if type(value) is not str:
        raise FieldError(field, f"must be a string, got {type(value).__name__} {_show(value)}")
    if not regex.fullmatch(value):
        raise FieldError(field, f"must be {what}, got {_show(value)}")
    return value


def _int(field: str, value: Any, lo: int, hi: int, pow2: bool = False) -> int:
    if type(value) is not int:
        raise FieldError(field, f"must be an integer, got {type(value).__name__} {_show(value)}")
    if not lo <= value <= hi:
        raise FieldError(field, f"must be in [{lo}, {hi}], got {_show(value)}")
    if pow2 and not _is_pow2(value):
        raise FieldError(field, f"must be a power of two, got {value}")
    return value


def check_ms(field: str, value: Any, *, optional: bool = False) -> float | None:
    """A time in milliseconds: a finite number in (0, 1e7]; None only where ``optional``."""
    if value is None and optional:
        return None
    if type(value) not in (int, float):
        raise FieldError(field, f"must be a number, got {type(value).__name__} {_show(value)}")
    if not math.isfinite(value) or not 0 < value <= MAX_MS:
        raise FieldError(field, f"must be a finite number of milliseconds in (0, {MAX_MS:g}], got {value!r}")
    return float(value)


def check_spread(field: str, value: Any) -> float | None:
    """The relative interquartile range of a timing's samples: a finite number >= 0, or None (unknown)."""
    if value is None:
        return None
    if type(value) not in (int, float):
        raise FieldError(field, f"must be a number or null, got {type(value).__name__} {_show(value)}")
    if not math.isfinite(value) or not 0 <= value <= MAX_SPREAD:
        raise FieldError(field, f"must be a finite number in [0, {MAX_SPREAD:g}] or null, got {value!r}")
    return float(value)


def format_ms(ms: float, spread: float | None, spec: str = ".3f") -> str:
    """A time with its spread, e.g. "4.010 ms ±3%" (no spread shown when it is unknown); a noisy one says
    so ("0.558 ms ±7009% (noisy)"), so that nobody reads it as a speed."""
    text = f"{ms:{spec}} ms"
    if spread is not None:
        pct = spread * 100
        text += f" ±{pct:.0f}%" if pct >= 1 else f" ±{pct:.1f}%"
    if is_noisy(spread):
        text += " (noisy)"
    return text


def clean_origin(name: str) -> str:
    """A printable, bounded label for the file a record was imported from (its name, not its path)."""
    text = "".join(c if c.isprintable() else "?" for c in str(name)).strip()
    return (text or "?")[:MAX_ORIGIN]


def check_key_field(name: str, value: Any) -> Any:
    """Validate one ``CacheKey`` field; raises ``FieldError`` naming it."""
    if name == "device_name":
        return _text(name, value, MAX_DEVICE_NAME)
    if name == "capability":
        return None if value is None else _pattern(name, value, _CAPABILITY_RE, 'like "9.0" or null (CPU)')
    if name == "torch_version":
        return _pattern(name, value, _VERSION_RE, "a version string")
    if name == "triton_version":
        return None if value is None else _pattern(name, value, _VERSION_RE, "a version string or null")
    if name == "template_hash":
        return _pattern(name, value, _HASH_RE, "a hash of [A-Za-z0-9_.:-], at most 80 characters")
    if name == "op":
        if type(value) is not str or value not in OPS:
            raise FieldError(name, f"must be one of {list(OPS)}, got {_show(value)}")
        return value
    if name == "dtype":
        if type(value) is not str or value not in DTYPES:
            raise FieldError(name, f"must be one of {list(DTYPES)}, got {_show(value)}")
        return value
    if name == "F":
        return _int(name, value, 1, MAX_F)
    if name == "D":
        return _int(name, value, 1, MAX_D)
    if name == "batch_bucket":
        return _int(name, value, 1, MAX_BATCH_BUCKET, pow2=True)
    if name == "l0_bucket":
        if type(value) is int and value == 0:
            return value  # an encode key's "any L0" (checked against the op by CacheKey)
        return _int(name, value, 1, MAX_F, pow2=True)
    raise FieldError(name, "is not a cache key field")


def encode_impls() -> tuple[str, ...]:
    """Implementation names of the encode ops, over every target."""
    return tuple(impl for t in TARGETS for impl in t.encode_impls)


def encode_owner(impl: str) -> Target | None:
    """The target that owns encode implementation ``impl``, or None."""
    return next((t for t in TARGETS if impl in t.encode_impls), None)


def check_impl(value: Any, op: str = "decode") -> str:
    """An implementation name known for ``op`` (decode and encode implementations are separate names)."""
    known = encode_impls() if op in ENCODE_OPS else IMPLS
    if type(value) is not str or value not in known:
        raise FieldError("impl", f"must be one of {list(known)} for op {op!r}, got {_show(value)}")
    return value


def validate_config(impl: str, config: Any, op: str = "decode") -> dict[str, Any]:
    """Check a candidate's config for ``op`` and return its canonical form.

    The config is parsed by the target that owns ``impl`` through its typed variant (``Target.parse``, or
    ``Target.encode_parse`` for the encode ops), so a config can only ever name a known kernel variant or
    a library path's int parameters: nothing a template or ``eval`` could misuse.
    """
    check_impl(impl, op)
    if type(config) is not dict:
        raise FieldError("config", f"must be an object, got {type(config).__name__} {_show(config)}")
    if op in ENCODE_OPS:
        target = encode_owner(impl)
        assert target is not None  # check_impl knows it
        parse = target.encode_parse
    else:
        target = target_of(impl)
        parse = target.parse
    try:
        return parse(impl, config)
    except ConfigFieldError as exc:
        raise FieldError(f"config.{exc.field}", str(exc)) from None
    except (TypeError, ValueError) as exc:
        raise FieldError("config", f"not a valid {target.name} config for {impl}: {exc}") from None


def check_provenance_field(name: str, value: Any) -> str:
    field = f"provenance.{name}"
    if name == "date":
        _text(field, value, 40)
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise FieldError(field, f"must be an ISO 8601 date, got {_show(value)}") from None
        return value
    if name == "sae_tune_version":
        return _pattern(field, value, _VERSION_RE, "a version string")
    if name == "host_kind":
        return _pattern(field, value, _HOST_KIND_RE, "at most 64 characters of [a-z0-9_.-]")
    if name == "source":
        if type(value) is not str or value not in SOURCES:
            raise FieldError(field, f"must be one of {list(SOURCES)}, got {_show(value)}")
        return value
    raise FieldError(field, "is not a provenance field")


# --- records -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheKey:
    """Everything a timing depends on. Frozen and validated, so it can index dicts and rows safely.

    capability is None on CPU, where ``device_name`` is the CPU model with its generation and vector
    extensions (``device.cpu_key_name``). ``batch_bucket`` and ``l0_bucket``
    are powers of two (see ``batch_bucket()`` / ``l0_bucket()``), except an "encode" key's ``l0_bucket``,
    which is 0 ("any": no L0 is known before encoding; ``encode_l0_bucket()``).
    """

    device_name: str
    capability: str | None
    torch_version: str
    triton_version: str | None
    template_hash: str
    op: str
    dtype: str
    F: int
    D: int
    batch_bucket: int
    l0_bucket: int

    def __post_init__(self) -> None:
        for name in KEY_FIELDS:
            check_key_field(name, getattr(self, name))
        if self.l0_bucket > next_pow2(self.F):
            raise FieldError("l0_bucket", f"{self.l0_bucket} exceeds the width F={self.F}")
        if self.op == "encode" and self.l0_bucket != 0:
            raise FieldError("l0_bucket", f"must be 0 (any L0) for op 'encode', got {self.l0_bucket}")
        if self.op != "encode" and self.l0_bucket == 0:
            raise FieldError("l0_bucket", f"0 (any L0) is for op 'encode' only, not {self.op!r}")

    @property
    def id(self) -> str:
        """Stable primary key of this key (NULL-safe, unlike a composite key with nullable columns)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    @property
    def is_cpu(self) -> bool:
        return self.capability is None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CacheKey:
        unknown = sorted(str(k) for k in data if k not in KEY_FIELDS)
        if unknown:
            raise FieldError(unknown[0], "unknown cache key field")
        missing = [k for k in KEY_FIELDS if k not in data]
        if missing:
            raise FieldError(missing[0], "missing cache key field")
        return cls(**{k: data[k] for k in KEY_FIELDS})

    @classmethod
    def _of(
        cls, info: Any, template_hash: str, op: str, dtype: Any, F: int, D: int, batch_size: int, l0b: int
    ) -> CacheKey:
        """A key of ``info``'s device and software with the buckets of ``batch_size`` and ``l0b``."""
        return cls(
            device_name=info.name,
            capability=info.capability,
            torch_version=info.torch_version,
            triton_version=info.triton_version,
            template_hash=template_hash,
            op=op,
            dtype=str(dtype).removeprefix("torch."),
            F=F,
            D=D,
            batch_bucket=batch_bucket(batch_size),
            l0_bucket=l0b,
        )

    @classmethod
    def for_device(
        cls,
        info: Any,
        *,
        template_hash: str,
        dtype: Any,
        F: int,
        D: int,
        batch_size: int,
        mean_l0: float,
        op: str = "decode",
    ) -> CacheKey:
        """Key for a ``DeviceInfo`` and a workload (buckets computed here; dtype may be a torch.dtype)."""
        l0b = min(l0_bucket(mean_l0), next_pow2(F))
        return cls._of(info, template_hash, op, dtype, F, D, batch_size, l0b)

    @classmethod
    def for_encode(
        cls, info: Any, *, template_hash: str, dtype: Any, F: int, D: int, batch_size: int, k: int | None
    ) -> CacheKey:
        """Key of an encode (op "encode", or "encode_topk" when ``k`` is given) of ``batch_size`` tokens."""
        op = "encode" if k is None else "encode_topk"
        return cls._of(info, template_hash, op, dtype, F, D, batch_size, encode_l0_bucket(k, F))


@dataclass(frozen=True)
class Provenance:
    """Where a number came from. ``source``: "measured" here, "imported" from a file, or "shipped"."""

    date: str
    sae_tune_version: str
    host_kind: str
    source: str = "measured"

    def __post_init__(self) -> None:
        for name in (*PROVENANCE_FIELDS, "source"):
            check_provenance_field(name, getattr(self, name))

    @classmethod
    def current(cls, source: str = "measured") -> Provenance:
        return cls(date=now_iso(), sae_tune_version=sae_tune_version(), host_kind=host_kind(), source=source)

    def to_dict(self) -> dict[str, str]:
        """The exported form (``source`` is local bookkeeping and is not exported)."""
        return {name: getattr(self, name) for name in PROVENANCE_FIELDS}


@dataclass(frozen=True)
class WinnerRecord:
    """The fastest correct candidate known for one key.

    ``spread`` is the relative interquartile range of its timing samples (None: unknown); ``origin`` names
    the file an imported record came from (None for measured and shipped records).
    """

    key: CacheKey
    impl: str
    config: dict[str, Any]
    ms: float
    dense_ms: float | None
    provenance: Provenance
    spread: float | None = None
    origin: str | None = None

    @property
    def speedup(self) -> float | None:
        return None if self.dense_ms is None else self.dense_ms / self.ms

    @property
    def noisy(self) -> bool:
        """Its timing's spread is past NOISY_SPREAD: stored flagged, replaced by a later quiet one."""
        return is_noisy(self.spread)


@dataclass(frozen=True)
class TrialRecord:
    """One measurement (or failed attempt) of one candidate."""

    id: int
    key: CacheKey
    impl: str
    config: dict[str, Any]
    ms: float | None
    ok: bool
    error: str | None
    study: str | None
    trial_number: int | None
    provenance: Provenance
    spread: float | None = None


@dataclass(frozen=True)
class BaselineRecord:
    """Latest time of a reference path (dense, library sparse) for one key."""

    key: CacheKey
    impl: str
    config: dict[str, Any]
    ms: float
    provenance: Provenance
    spread: float | None = None


@dataclass(frozen=True)
class MergeResult:
    """What merging winners did, per key: ``added`` had no winner before, ``updated`` had one and took the
    new record, ``kept_local`` kept the time measured here, ``unchanged`` kept a faster (or quieter) one."""

    updated: int
    kept_local: int
    added: int = 0
    unchanged: int = 0


def check_winner(key: CacheKey, impl: str, config: Any, ms: Any, dense_ms: Any) -> dict[str, Any]:
    """Validate a would-be winner; returns the canonical config."""
    check_impl(impl, key.op)
    kind = "cpu" if key.is_cpu else "cuda"
    owner = encode_owner(impl) if key.op in ENCODE_OPS else target_of(impl)
    assert owner is not None  # check_impl knows it
    if kind not in owner.timed_kinds:
        raise FieldError(
            "impl", f"a {impl} time on a {kind} key is an interpreter time or none at all, never a speed"
        )
    canonical = validate_config(impl, config, key.op)
    check_ms("ms", ms)
    check_ms("dense_ms", dense_ms, optional=True)
    return canonical


# --- the store ---------------------------------------------------------------------------------------


def default_cache_path() -> Path:
    """``<platformdirs user cache dir>/sae-tune/cache.sqlite``, next to the generated kernels."""
    return user_cache_dir() / DEFAULT_FILE_NAME


def resolve_cache_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Argument, else ``$SAE_TUNE_CACHE``, else the user cache dir.

    An existing directory means ``<dir>/cache.sqlite`` inside it.
    """
    if path is None:
        path = os.environ.get(ENV_CACHE) or None
    if path is None:
        return default_cache_path()
    resolved = Path(path).expanduser()
    return resolved / DEFAULT_FILE_NAME if resolved.is_dir() else resolved


_KEY_COLUMNS: dict[str, type] = {
    "key_id": str,
    "device_name": str,
    "capability": str,
    "torch_version": str,
    "triton_version": str,
    "template_hash": str,
    "op": str,
    "dtype": str,
    "F": int,
    "D": int,
    "batch_bucket": int,
    "l0_bucket": int,
}
_KEY_NOT_NULL = [c for c in _KEY_COLUMNS if c not in ("capability", "triton_version")]
_PROV_COLUMNS: dict[str, type] = {"recorded_at": str, "sae_tune_version": str, "host_kind": str}
# Columns added after schema version 1, per table (what _migrate adds to an older file).
_ADDED_COLUMNS: dict[str, dict[str, str]] = {
    "trials": {"spread": "FLOAT"},
    "baselines": {"spread": "FLOAT"},
    "winners": {"spread": "FLOAT", "origin": "TEXT"},
}


def _classify(conn: sqlite3.Connection, path: Path) -> int | None:
    """Schema version of an sae-tune cache; None for an empty database; CacheError for anything else."""
    names = sorted(
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%'"
        )
    )
    if not names:
        return None
    foreign = (
        f"sae-tune cache {path}: this SQLite database belongs to something else (tables: "
        f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''}); sae-tune will not modify it. "
        f"Move it away or point {ENV_CACHE} at another file."
    )
    if "meta" not in names:
        raise CacheError(foreign)
    try:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error:
        raise CacheError(foreign) from None
    if meta.get("schema") != SCHEMA_NAME:
        raise CacheError(foreign)
    try:
        version = int(meta.get("schema_version", ""))
    except (TypeError, ValueError):
        raise CacheError(
            f"sae-tune cache {path}: unreadable schema version {_show(meta.get('schema_version'))}"
        ) from None
    if version > SCHEMA_VERSION:
        raise CacheError(
            f"sae-tune cache {path}: schema version {version} was written by a newer sae-tune; this one "
            f"reads version {SCHEMA_VERSION}. Upgrade sae-tune or point {ENV_CACHE} at another file."
        )
    missing = [t for t in TABLES if t not in names]
    if version < 1 or missing:
        raise CacheError(
            f"sae-tune cache {path}: damaged (schema version {version}, missing tables: "
            f"{', '.join(missing) or 'none'}); sae-tune will not modify it. Move it away to start afresh."
        )
    return version


_SQLITE_MAGIC = b"SQLite format 3\x00"

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class NotRegularFile(OSError):
    """A path that is not a regular file (FIFO, device, directory, socket): reading it could block."""


class FileTooLarge(OSError):
    """A file larger than the size cap of what reads it."""


def read_regular(path: str | os.PathLike[str], limit: int) -> bytes:
    """The first ``limit`` bytes of the regular file at ``path``.

    Opened non-blocking and checked with ``fstat`` before a byte is read, so a FIFO or device never blocks
    the process; raises ``NotRegularFile`` for those (and ``OSError`` for the usual failures).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((what for test, what in _KINDS if test(mode)), "not a regular file")
            raise NotRegularFile(f"is {kind}, not a regular file")
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_capped(path: str | os.PathLike[str], cap: int) -> bytes:
    """All of the regular file at ``path``; ``FileTooLarge`` (checked before reading) above ``cap`` bytes."""
    try:
        size = os.stat(path).st_size
    except OSError:
        size = 0  # let read_regular report the real problem
    if size > cap:
        raise FileTooLarge(f"{size} bytes, larger than the {cap // (1024 * 1024)} MiB limit")
    data = read_regular(path, cap + 1)
    if len(data) > cap:  # it grew while we looked
        raise FileTooLarge(f"larger than the {cap // (1024 * 1024)} MiB limit")
    return data


def write_problem(path: Path) -> str | None:
    """Why this process could not write the cache at ``path`` (None: it can).

    SQLite writes the file and creates ``-wal``/``-shm`` files next to it, so both the file and its folder
    (or, for a new file, the nearest existing folder above it) must be writable.
    """
    if path.exists():
        if not os.access(path, os.W_OK):
            return "you have no write permission on the file"
        folder = path.parent
    else:
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"you cannot create files in its folder {folder} (SQLite keeps -wal and -shm files there)"
    return None


def _read_only_params(path: Path) -> str:
    """URI parameters for reading ``path`` without creating or changing any file.

    While a writer has the file open (its ``-wal`` and ``-shm`` files exist) it is read through them,
    read-only. Otherwise nothing is writing it and ``immutable=1`` reads the file alone: a WAL read in
    ``mode=ro`` would create a ``-shm`` file, owned by this user, that can lock the cache's owner out.
    """
    live = Path(f"{path}-wal").exists() and Path(f"{path}-shm").exists()
    return "mode=ro" if live else "mode=ro&immutable=1"


def connect_read_only(path: Path, timeout: float) -> sqlite3.Connection:
    """A connection that reads the cache at ``path`` and writes nothing, not even ``-wal``/``-shm`` files.

    Raises ``CacheError`` for a file that is missing, not a regular file, or has no SQLite header.
    """
    try:
        header = read_regular(path, 100)
    except OSError as exc:
        raise CacheError(f"sae-tune cache {path}: cannot read it ({exc.strerror or exc})") from None
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise _unusable(path, "no SQLite header")
    try:
        return sqlite3.connect(
            f"{path.resolve().as_uri()}?{_read_only_params(path)}", uri=True, timeout=timeout
        )
    except (OSError, sqlite3.Error) as exc:
        raise CacheError(f"sae-tune cache {path}: cannot open it read-only ({exc})") from None


def _unusable(path: Path, detail: str) -> CacheError:
    return CacheError(
        f"sae-tune cache {path}: not a usable SQLite database ({detail}); it may be corrupt or another "
        f"program's file. sae-tune will not modify it; move it away or point {ENV_CACHE} elsewhere."
    )


def _inspect_existing(path: Path, timeout: float, check: bool) -> None:
    """Refuse a file that is not an sae-tune cache, without changing it or leaving files next to it.

    The header is read by hand first, so a non-SQLite file never reaches SQLite. A quiescent WAL database
    (no ``-wal`` file: no connection is open) is read with ``immutable=1``, which creates no ``-shm`` /
    ``-wal``; a failed read is retried twice, in case a writer came and checkpointed in between.
    """
    if not path.exists():
        return
    if path.is_dir():
        raise CacheError(f"sae-tune cache {path}: is a directory, not a cache file")
    try:
        header = read_regular(path, 100)
    except OSError as exc:
        raise CacheError(f"sae-tune cache {path}: cannot read it ({exc.strerror or exc})") from None
    if not header:
        return
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise _unusable(path, "no SQLite header")
    for attempt in range(3):
        # Re-decided per attempt: a writer may have opened (or checkpointed and closed) meanwhile.
        params = _read_only_params(path) if header[18] == 2 else "mode=ro"
        try:
            _inspect_sqlite(path, params, timeout, check)
            return
        except sqlite3.DatabaseError as exc:
            if attempt < 2:
                time.sleep(0.05)
                continue
            raise _unusable(path, str(exc)) from None


def _inspect_sqlite(path: Path, params: str, timeout: float, check: bool) -> None:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?{params}", uri=True, timeout=timeout)
    try:
        _classify(conn, path)
        if check:
            problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)").fetchall()]
            if problems != ["ok"]:
                raise CacheError(
                    f"sae-tune cache {path}: the database is corrupt ({'; '.join(map(str, problems))}); "
                    "sae-tune will not modify it. Move it away to start afresh."
                )
    finally:
        conn.close()


class Store:
    """The SQLite cache at ``path`` (argument, ``$SAE_TUNE_CACHE``, or the user cache dir).

    Safe for several processes at once: WAL mode, a busy timeout of ``timeout`` seconds, and every write in
    its own ``BEGIN IMMEDIATE`` transaction. ``check`` runs SQLite's quick_check on an existing file before
    opening it for writing. A cache this process may not write raises ``CacheError`` ("... is read-only");
    ``read_only=True`` opens an existing cache for reading only (see ``Store.for_reading``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 30.0,
        check: bool = True,
        read_only: bool = False,
    ) -> None:
        self.path = resolve_cache_path(path)
        self.read_only = read_only
        _inspect_existing(self.path, timeout, check)
        if read_only:
            self._open_read_only(timeout)
            return
        problem = write_problem(self.path)
        if problem is not None:
            raise CacheReadOnlyError(self._read_only_message(problem))
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), timeout=timeout)
        except (OSError, sqlite3.Error) as exc:
            raise CacheError(f"sae-tune cache {self.path}: cannot open it ({exc})") from None
        self.db = Database(conn, execute_plugins=False)
        try:
            with self._errors("opening"):
                self.db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
                self._enable_wal(timeout)
                self._init_schema()
        except BaseException:
            self.db.close()
            raise

    @classmethod
    def for_reading(cls, path: str | os.PathLike[str] | None = None, *, timeout: float = 30.0) -> Store:
        """The cache at ``path`` for a command that only reads it: read-only when this process may not
        write it (someone else's cache), so that no ``-wal``/``-shm`` file of ours is left next to it."""
        resolved = resolve_cache_path(path)
        read_only = resolved.exists() and write_problem(resolved) is not None
        return cls(resolved, timeout=timeout, read_only=read_only)

    def _open_read_only(self, timeout: float) -> None:
        if not self.path.exists():
            raise CacheError(f"sae-tune cache {self.path}: does not exist")
        self.db = Database(connect_read_only(self.path, timeout), execute_plugins=False)
        try:
            with self._errors("opening read-only"):
                self.db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
                if _classify(self.db.conn, self.path) is None:
                    raise CacheError(f"sae-tune cache {self.path}: is empty (no sae-tune tables yet)")
        except BaseException:
            self.db.close()
            raise

    def _read_only_message(self, why: str) -> str:
        return (
            f"sae-tune cache {self.path} is read-only: {why}. Commands that only read it (cache show, "
            f"cache export, dispatch) still work; to write, use a cache of your own (--cache PATH or "
            f"{ENV_CACHE})."
        )

    # --- plumbing ------------------------------------------------------------------------------------
    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise CacheError(f"sae-tune cache {self.path}: {what} failed: {exc}") from None

    @contextlib.contextmanager
    def _write(self, what: str) -> Iterator[None]:
        """One write transaction holding the write lock from the start (no deadlocked lock upgrades)."""
        if self.read_only:
            raise CacheReadOnlyError(
                self._read_only_message(f"opened for reading only, so {what} is not possible")
            )
        with self._errors(what):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                self.db.commit()
            except BaseException:
                self.db.rollback()
                raise

    def _enable_wal(self, timeout: float) -> None:
        """Switch to WAL, retrying: the switch needs an exclusive lock and SQLite does not wait for it."""
        deadline, delay = time.monotonic() + timeout, 0.005
        while True:
            try:
                self.db.enable_wal()
                break
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(2 * delay, 0.2)
        mode = self.db.journal_mode
        if mode != "wal":
            raise CacheError(
                f"sae-tune cache {self.path}: WAL mode is not available here (journal mode stays {mode!r}); "
                f"put the cache on a local filesystem (see {ENV_CACHE})."
            )

    def _table(self, name: str) -> Table:
        return self.db.table(name)

    def _init_schema(self) -> None:
        with self._write("initializing the schema"):
            version = _classify(self.db.conn, self.path)
            if version is not None:
                if version < SCHEMA_VERSION:
                    self._migrate(version)
                self._rename_devices({old: cpu_key_name() for old in legacy_names()})
                return
            prov = {**_PROV_COLUMNS}
            self._table("meta").create({"key": str, "value": str}, pk="key")
            self._table("meta").insert_all(
                [
                    {"key": "schema", "value": SCHEMA_NAME},
                    {"key": "schema_version", "value": str(SCHEMA_VERSION)},
                    {"key": "created", "value": now_iso()},
                    {"key": "created_by", "value": sae_tune_version()},
                ]
            )
            self._table("trials").create(
                {
                    "id": int,
                    **_KEY_COLUMNS,
                    "impl": str,
                    "config": str,
                    "ms": float,
                    "ok": int,
                    "error": str,
                    "study": str,
                    "trial_number": int,
                    **prov,
                    "spread": float,
                },
                pk="id",
                not_null=[*_KEY_NOT_NULL, "impl", "config", "ok", *prov],
            )
            self._table("trials").create_index(["key_id"])
            self._table("winners").create(
                {
                    **_KEY_COLUMNS,
                    "impl": str,
                    "config": str,
                    "ms": float,
                    "dense_ms": float,
                    "speedup": float,
                    **prov,
                    "source": str,
                    "spread": float,
                    "origin": str,
                },
                pk="key_id",
                not_null=[*_KEY_NOT_NULL, "impl", "config", "ms", *prov, "source"],
            )
            self._table("winners").create_index(["device_name"])
            self._table("baselines").create(
                {**_KEY_COLUMNS, "impl": str, "config": str, "ms": float, **prov, "spread": float},
                pk=("key_id", "impl"),
                not_null=[*_KEY_NOT_NULL, "impl", "config", "ms", *prov],
            )

    def _migrate(self, version: int) -> None:
        """Inside the schema transaction: bring a cache of an older schema up to date, keeping every row.

        Only nullable columns are added (old rows read as "spread unknown", "no origin file").
        """
        for table, columns in _ADDED_COLUMNS.items():
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})").fetchall()}
            for name, sql_type in columns.items():
                if name not in have:
                    self.db.execute(f"ALTER TABLE [{table}] ADD COLUMN [{name}] {sql_type}")
        self.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
        self.db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('migrated', ?)",
            [f"from schema version {version} on {now_iso()} by {sae_tune_version()}"],
        )

    def _rename_devices(self, renames: Mapping[str, str]) -> None:
        """Inside the schema transaction: rows keyed by an old name of a device (this CPU's key name as an
        earlier release wrote it) move to its current name, keeping every trial, baseline and winner. A key
        that already has a winner under the new name keeps the faster of the two."""
        for old, new in renames.items():
            if old == new:
                continue
            found = 0
            for table in ("trials", "baselines", "winners"):
                rows = self.db.execute(
                    f"SELECT rowid AS row_number_, * FROM [{table}] WHERE device_name = ?", [old]
                )
                names = [d[0] for d in rows.description]
                for values in rows.fetchall():
                    found += 1
                    row = dict(zip(names, values, strict=True))
                    try:
                        key = CacheKey(**{**{k: row[k] for k in KEY_FIELDS}, "device_name": new})
                    except FieldError:
                        continue  # a row that was invalid before stays as it was (and is skipped on read)
                    self._move_row(table, row, key)
            if found:
                self.db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('renamed_devices', ?)",
                    [f"{old!r} -> {new!r} on {now_iso()} by {sae_tune_version()}"],
                )

    def _move_row(self, table: str, row: dict[str, Any], key: CacheKey) -> None:
        """Re-key one row of ``table`` (by rowid) to ``key``, resolving a clash with a row already there."""
        clash = None
        if table == "winners":
            clash = self.db.execute("SELECT ms FROM winners WHERE key_id = ?", [key.id]).fetchone()
        elif table == "baselines":
            clash = self.db.execute(
                "SELECT ms FROM baselines WHERE key_id = ? AND impl = ?", [key.id, row["impl"]]
            ).fetchone()
        if clash is not None:
            if row["ms"] is not None and clash[0] is not None and row["ms"] < clash[0]:
                where = "key_id = ?" + (" AND impl = ?" if table == "baselines" else "")
                args = [key.id] + ([row["impl"]] if table == "baselines" else [])
                self.db.execute(f"DELETE FROM [{table}] WHERE {where}", args)
            else:
                self.db.execute(f"DELETE FROM [{table}] WHERE rowid = ?", [row["row_number_"]])
                return
        self.db.execute(
            f"UPDATE [{table}] SET device_name = ?, key_id = ? WHERE rowid = ?",
            [key.device_name, key.id, row["row_number_"]],
        )

    @staticmethod
    def _key_row(key: CacheKey) -> dict[str, Any]:
        return {"key_id": key.id, **key.to_dict()}

    @staticmethod
    def _prov_row(prov: Provenance) -> dict[str, Any]:
        return {
            "recorded_at": prov.date,
            "sae_tune_version": prov.sae_tune_version,
            "host_kind": prov.host_kind,
        }

    def _rows(self, table: str, where: str | None, args: list[Any], order: str) -> list[dict[str, Any]]:
        with self._errors(f"reading {table}"):
            return list(self._table(table).rows_where(where, args or None, order_by=order))

    def _decode(
        self, table: str, row: dict[str, Any], source: str = "measured"
    ) -> tuple[CacheKey, Provenance]:
        try:
            key = CacheKey(**{k: row[k] for k in KEY_FIELDS})
            prov = Provenance(row["recorded_at"], row["sae_tune_version"], row["host_kind"], source)
        except (KeyError, ValueError) as exc:
            raise CacheError(f"sae-tune cache {self.path}: invalid row in {table}: {exc}") from None
        return key, prov

    def _config(self, table: str, text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except (TypeError, ValueError):
            value = None
        if type(value) is not dict:
            raise CacheError(f"sae-tune cache {self.path}: invalid config JSON in {table}: {_show(text)}")
        return value

    # --- writes --------------------------------------------------------------------------------------
    def record_trial(
        self,
        key: CacheKey,
        impl: str,
        config: Mapping[str, Any],
        ms: float | None,
        *,
        ok: bool = True,
        error: str | None = None,
        study: str | None = None,
        trial_number: int | None = None,
        spread: float | None = None,
    ) -> int:
        """Store one measurement (kept forever, so a changed search space does not force a re-tune).

        A failed trial (``ok=False``) may have no time; ``error`` is truncated to 4000 characters.
        ``spread`` is the relative interquartile range of the timing samples (None: unknown).
        Returns the trial's row id.
        """
        canonical = validate_config(impl, dict(config), key.op)
        check_ms("ms", ms, optional=not ok)
        check_spread("spread", spread)
        if study is not None:
            _text("study", study)
        if trial_number is not None:
            _int("trial_number", trial_number, 0, 1 << 31)
        row = {
            **self._key_row(key),
            "impl": impl,
            "config": json.dumps(canonical, sort_keys=True),
            "ms": None if ms is None else float(ms),
            "ok": int(bool(ok)),
            "error": None if error is None else str(error)[:MAX_ERROR_CHARS],
            "study": study,
            "trial_number": trial_number,
            **self._prov_row(Provenance.current()),
            "spread": None if spread is None else float(spread),
        }
        with self._write("recording a trial"):
            table = self._table("trials").insert(row)
        return int(table.last_rowid or 0)

    def record_baseline(
        self,
        key: CacheKey,
        impl: str,
        ms: float,
        config: Mapping[str, Any] | None = None,
        *,
        spread: float | None = None,
    ) -> None:
        """Store the latest time of a reference path (e.g. dense) for ``key``; replaces the previous one."""
        canonical = validate_config(impl, dict(config or {}), key.op)
        check_ms("ms", ms)
        check_spread("spread", spread)
        row = {
            **self._key_row(key),
            "impl": impl,
            "config": json.dumps(canonical, sort_keys=True),
            "ms": float(ms),
            **self._prov_row(Provenance.current()),
            "spread": None if spread is None else float(spread),
        }
        with self._write("recording a baseline"):
            self._table("baselines").upsert(row, pk=("key_id", "impl"))

    def _set_winner(self, rec: WinnerRecord) -> bool | None:
        """Inside an open write transaction: store ``rec`` if it may replace the current winner.

        A time measured here is the truth for its key: a measured record replaces an imported or shipped
        one whatever their times, and an imported or shipped record never replaces a measured one (returns
        None: kept local). Between records of the same standing a quiet one replaces a noisy one (spread
        past NOISY_SPREAD) even when slower, a noisy one never replaces a quiet one, and otherwise the
        faster wins (a tie keeps the incumbent). Returns True if stored, False if kept.
        """
        current = next(
            iter(self._table("winners").rows_where("key_id = ?", [rec.key.id], select="ms, source, spread")),
            None,
        )
        if current is not None:
            measured_now = current["source"] not in ("imported", "shipped")
            measured_new = rec.provenance.source == "measured"
            if measured_now and not measured_new:
                return None
            if measured_now == measured_new:
                noisy_now, noisy_new = is_noisy(self._stored_spread(current)), is_noisy(rec.spread)
                if noisy_new and not noisy_now:
                    return False
                if noisy_now == noisy_new and current["ms"] <= rec.ms:
                    return False
        dense_ms = rec.dense_ms
        if dense_ms is None:
            base = next(
                iter(self._table("baselines").rows_where("key_id = ? AND impl = 'dense'", [rec.key.id])), None
            )
            dense_ms = None if base is None else float(base["ms"])
        self._table("winners").upsert(
            {
                **self._key_row(rec.key),
                "impl": rec.impl,
                "config": json.dumps(rec.config, sort_keys=True),
                "ms": rec.ms,
                "dense_ms": dense_ms,
                "speedup": None if dense_ms is None else dense_ms / rec.ms,
                **self._prov_row(rec.provenance),
                "source": rec.provenance.source,
                "spread": rec.spread,
                "origin": rec.origin,
            },
            pk="key_id",
        )
        return True

    def set_winner_if_faster(
        self,
        key: CacheKey,
        impl: str,
        config: Mapping[str, Any],
        ms: float,
        dense_ms: float | None = None,
        *,
        provenance: Provenance | None = None,
        spread: float | None = None,
    ) -> bool:
        """Make this the winner for ``key`` unless a faster (or equally fast) one is stored; True if stored.

        A measured record (the default provenance) always replaces an imported or shipped winner: the time
        measured here is the truth for its key. A noisy winner (spread past NOISY_SPREAD) gives way to a
        quiet measurement even a slower one, and a noisy measurement never replaces a quiet winner.
        ``dense_ms`` defaults to the stored dense baseline for the key, if any; ``spread`` is the relative
        interquartile range of the timing samples (None: unknown).
        """
        canonical = check_winner(key, impl, dict(config), ms, dense_ms)
        rec = WinnerRecord(
            key=key,
            impl=impl,
            config=canonical,
            ms=float(ms),
            dense_ms=None if dense_ms is None else float(dense_ms),
            provenance=provenance or Provenance.current(),
            spread=check_spread("spread", spread),
        )
        with self._write("storing a winner"):
            return bool(self._set_winner(rec))

    def merge_winners(self, records: Iterable[WinnerRecord]) -> MergeResult:
        """Merge records in one transaction; a key measured here keeps its measured winner.

        Every record is re-validated first, so nothing is stored unless all are acceptable.
        """
        checked = []
        for i, rec in enumerate(records):
            try:
                config = check_winner(rec.key, rec.impl, rec.config, rec.ms, rec.dense_ms)
                spread = check_spread("spread", rec.spread)
                if rec.origin is not None:
                    _text("origin", rec.origin, MAX_ORIGIN)
            except FieldError as exc:
                raise FieldError(exc.field, f"record {i}: {exc.reason}") from None
            checked.append(dataclasses.replace(rec, config=config, ms=float(rec.ms), spread=spread))
        kept_local: set[str] = set()
        updated: set[str] = set()
        with self._write("importing winners"):
            keys = {rec.key.id for rec in checked}
            had = "SELECT 1 FROM winners WHERE key_id = ?"
            new = {k for k in keys if self.db.execute(had, [k]).fetchone() is None}
            for rec in checked:
                stored = self._set_winner(rec)
                if stored is None:
                    kept_local.add(rec.key.id)
                elif stored:
                    updated.add(rec.key.id)
        added = updated & new
        return MergeResult(
            updated=len(updated - added),
            kept_local=len(kept_local),
            added=len(added),
            unchanged=len(keys - updated - kept_local),
        )

    def import_winners(self, records: Iterable[WinnerRecord]) -> int:
        """``merge_winners`` returning only how many keys changed (added or updated)."""
        merged = self.merge_winners(records)
        return merged.added + merged.updated

    def forget_key(self, key: CacheKey) -> int:
        """Delete every trial, baseline and winner (measured or imported) of ``key`` in one transaction.

        For re-tuning a key from scratch (``sae-tune --retune``); returns the number of rows deleted.
        """
        with self._write("forgetting a key"):
            return sum(
                self.db.execute(f"DELETE FROM [{name}] WHERE key_id = ?", [key.id]).rowcount
                for name in ("trials", "baselines", "winners")
            )

    def clear(self) -> None:
        """Forget every trial, winner and baseline (the schema and meta stay)."""
        with self._write("clearing"):
            for name in ("trials", "winners", "baselines"):
                self._table(name).delete_where()

    # --- reads ---------------------------------------------------------------------------------------
    def winner(self, key: CacheKey) -> WinnerRecord | None:
        rows = self._rows("winners", "key_id = ?", [key.id], "key_id")
        return self._winner(rows[0]) if rows else None

    def _winner(self, row: dict[str, Any]) -> WinnerRecord:
        source = row["source"] if row.get("source") in SOURCES else "measured"
        key, prov = self._decode("winners", row, source)
        return WinnerRecord(
            key=key,
            impl=row["impl"],
            config=self._config("winners", row["config"]),
            ms=self._number("winners", row, "ms"),
            dense_ms=self._number("winners", row, "dense_ms", optional=True),
            provenance=prov,
            spread=self._spread("winners", row),
            origin=row.get("origin") if source == "imported" else None,
        )

    def _number(self, table: str, row: dict[str, Any], field: str, *, optional: bool = False) -> Any:
        """A stored time as a float; a value that is not a number is an invalid row (CacheError)."""
        value = row[field]
        if value is None and optional:
            return None
        try:
            return float(value)
        except (TypeError, ValueError):
            raise CacheError(
                f"sae-tune cache {self.path}: invalid row in {table}: {field}: not a number: {_show(value)}"
            ) from None

    @staticmethod
    def _stored_spread(row: Mapping[str, Any]) -> float | None:
        """An incumbent's spread for the replacement rule; an unreadable value counts as unknown."""
        try:
            return check_spread("spread", row.get("spread"))
        except FieldError:
            return None

    def _spread(self, table: str, row: dict[str, Any]) -> float | None:
        """The row's spread (None in rows written before schema version 2)."""
        try:
            return check_spread("spread", row.get("spread"))
        except FieldError as exc:
            raise CacheError(f"sae-tune cache {self.path}: invalid row in {table}: {exc}") from None

    def winners(self, device_name: str | None = None, *, op: str | None = "decode") -> list[WinnerRecord]:
        """Every winner of ``op`` (None: of every op; by default the decodes', what every caller before
        encode tuning meant), optionally of one device, ordered by device, dtype, shape and buckets."""
        clauses, args = [], []
        if device_name is not None:
            clauses.append("device_name = ?")
            args.append(device_name)
        if op is not None:
            check_key_field("op", op)
            clauses.append("op = ?")
            args.append(op)
        where = " AND ".join(clauses) or None
        order = "device_name, dtype, F, D, batch_bucket, l0_bucket, key_id"
        return [self._winner(row) for row in self._rows("winners", where, args, order)]

    @staticmethod
    def _where(key: CacheKey | None, op: str | None) -> tuple[str | None, list[Any]]:
        """Rows of ``key``, else of ``op`` (None: every op)."""
        if key is not None:
            return "key_id = ?", [key.id]
        if op is not None:
            return "op = ?", [check_key_field("op", op)]
        return None, []

    def trials(self, key: CacheKey | None = None, *, op: str | None = "decode") -> list[TrialRecord]:
        """Every recorded trial of ``key``, else of ``op`` (None: every op; by default the decodes'),
        oldest first."""
        where, args = self._where(key, op)
        out = []
        for row in self._rows("trials", where, args, "id"):
            row_key, prov = self._decode("trials", row)
            out.append(
                TrialRecord(
                    id=int(row["id"]),
                    key=row_key,
                    impl=row["impl"],
                    config=self._config("trials", row["config"]),
                    ms=self._number("trials", row, "ms", optional=True),
                    ok=bool(row["ok"]),
                    error=row["error"],
                    study=row["study"],
                    trial_number=row["trial_number"],
                    provenance=prov,
                    spread=self._spread("trials", row),
                )
            )
        return out

    def baselines(self, key: CacheKey | None = None, *, op: str | None = "decode") -> list[BaselineRecord]:
        """The baselines of ``key``, else of ``op`` (None: every op; by default the decodes')."""
        where, args = self._where(key, op)
        out = []
        for row in self._rows("baselines", where, args, "key_id, impl"):
            row_key, prov = self._decode("baselines", row)
            out.append(
                BaselineRecord(
                    key=row_key,
                    impl=row["impl"],
                    config=self._config("baselines", row["config"]),
                    ms=self._number("baselines", row, "ms"),
                    provenance=prov,
                    spread=self._spread("baselines", row),
                )
            )
        return out

    def devices(self) -> list[str]:
        """The device names that have winners, sorted."""
        with self._errors("listing devices"):
            query = "SELECT DISTINCT device_name FROM winners ORDER BY device_name"
            return [row["device_name"] for row in self.db.query(query)]

    def summary(self) -> dict[str, Any]:
        """Counts and versions, for ``sae-tune cache info`` style output."""
        with self._errors("summarizing"):
            meta = {row["key"]: row["value"] for row in self._table("meta").rows}
            trials = self._table("trials")
            devices = self.devices()
            return {
                "path": str(self.path),
                "schema_version": int(meta["schema_version"]),
                "created": meta.get("created"),
                "trials": trials.count,
                "failed_trials": trials.count_where("ok = 0"),
                "winners": self._table("winners").count,
                "baselines": self._table("baselines").count,
                "devices": devices,
                "size_bytes": self.path.stat().st_size if self.path.exists() else 0,
                "read_only": self.read_only,
            }
