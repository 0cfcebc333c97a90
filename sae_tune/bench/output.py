"""Where a bench run's results go, table by table, so that nothing measured is lost when a run stops.

After each table the run writes that table's rows to ``tables/<name>.csv`` and rewrites ``bench.md``,
``bench.csv`` and the table's plots with everything measured so far. Every file is written to a temporary
name in its folder and renamed into place, so a file under its real name is always complete: a run
stopped mid-table leaves the earlier tables whole and no half-written table.

``resume=True`` (``sae-tune bench --resume``) keeps the tables whose ``tables/<name>.csv`` a run of the
same configuration on the same device and software wrote into the folder, and measures only the rest.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from sae_tune.bench.measure import Measurement
from sae_tune.bench.runner import BenchResult, Stamp

TABLES_DIR = "tables"
MEASUREMENT_FIELDS = tuple(f.name for f in dataclasses.fields(Measurement))
STAMP_FIELDS = tuple(f.name for f in dataclasses.fields(Stamp))
CSV_FIELDS = (*MEASUREMENT_FIELDS, *STAMP_FIELDS)
# A kept table must come from the same kind of run: the same configuration, device, dtype and software.
# (date and host CPU model may differ: the CPU model is in the device name on CPU.)
RESUME_MATCH = (
    "device_kind",
    "device",
    "capability",
    "dtype",
    "config",
    "threads",
    "torch",
    "triton",
    "sae_tune",
    "cache_flush_mib",
)


class OutputError(RuntimeError):
    """A result file cannot be written (the folder is gone, read-only or full); the message names it."""


class TableFileError(ValueError):
    """A table file that cannot be read back as a complete table of this run; the message says why."""


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` into a temporary file beside ``path`` (same suffix, so that plot writers see the
    format), then rename it to ``path``: readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def csv_rows(rows: Iterable[Measurement], stamp: Stamp) -> list[dict[str, str]]:
    """The CSV rows of ``rows``: every measurement field, then the run's stamp ("" for None)."""
    stamp_row = {k: str(v) for k, v in dataclasses.asdict(stamp).items()}
    out = []
    for r in rows:
        row = {k: "" if v is None else str(v) for k, v in r.to_row().items()}
        out.append({**row, **stamp_row})
    return out


def csv_text(rows: Iterable[Mapping[str, str]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _parsers() -> dict[str, Callable[[str], object]]:
    """How to read each Measurement field back from its CSV text."""
    hints = typing.get_type_hints(Measurement)
    parsers: dict[str, Callable[[str], object]] = {}
    for name in MEASUREMENT_FIELDS:
        hint = hints[name]
        optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
        base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint

        def parse(text: str, base: type = base, optional: bool = optional) -> object:
            if optional and text == "":
                return None
            return base(text)

        parsers[name] = parse
    return parsers


def read_table(path: Path, stamp: Stamp) -> tuple[list[Measurement], list[dict[str, str]]]:
    """The measurements and CSV rows of one table file; TableFileError if it is not a table of a run like
    this one (other columns, an unreadable value, another configuration, device or software)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TableFileError(f"cannot read it ({exc})") from exc
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != CSV_FIELDS:
        raise TableFileError("its columns are not those of this version's tables")
    parsers = _parsers()
    want = {k: str(v) for k, v in dataclasses.asdict(stamp).items()}
    rows, measurements = [], []
    for i, row in enumerate(reader, start=2):
        if None in row or any(v is None for v in row.values()):
            raise TableFileError(f"line {i} does not have one value per column")
        differ = [f for f in RESUME_MATCH if row[f] != want[f]]
        if differ:
            theirs = ", ".join(f"{f} {row[f]!r}" for f in differ)
            raise TableFileError(f"it was measured by another kind of run ({theirs})")
        try:
            measurements.append(Measurement(**{k: parsers[k](row[k]) for k in MEASUREMENT_FIELDS}))
        except (TypeError, ValueError) as exc:
            raise TableFileError(f"line {i}: {exc}") from exc
        rows.append(dict(row))
    return measurements, rows


class BenchOutput:
    """The folder of one run: writes each table as soon as it is done; with ``resume``, reads back the
    tables an earlier run of the same kind completed there."""

    def __init__(self, out_dir: str | os.PathLike[str], *, resume: bool = False) -> None:
        self.out = Path(out_dir)
        self.tables = self.out / TABLES_DIR
        self.resume = resume
        self._csv: dict[str, list[dict[str, str]]] = {}  # runner name -> its CSV rows
        self.kept: list[str] = []

    def describe(self) -> str:
        """Where the results go (said when the run starts)."""
        kept = " (--resume: tables already there from a run like this one are kept)" if self.resume else ""
        return (
            f"results go to {self.out}/: bench.md, bench.csv and the sweep plots, rewritten as each table "
            f"is done; each table's rows in {self.tables}/<table>.csv{kept}"
        )

    def table_path(self, name: str) -> Path:
        return self.tables / f"{name}.csv"

    def completed(
        self, stamp: Stamp, names: Iterable[str], log: Callable[[str], None] = lambda _: None
    ) -> dict[str, list[Measurement]]:
        """With ``resume``: the tables of ``names`` already complete in the folder, by name (a file that is
        not a complete table of a run like this one is measured again, and the log says why)."""
        done: dict[str, list[Measurement]] = {}
        if not self.resume:
            return done
        for name in names:
            path = self.table_path(name)
            if not path.is_file():
                continue
            try:
                measurements, rows = read_table(path, stamp)
            except TableFileError as exc:
                log(f"{name}: {path} is not kept ({exc}); measuring it again")
                continue
            done[name] = measurements
            self._csv[name] = rows
            self.kept.append(name)
        return done

    def table_done(self, name: str, rows: list[Measurement], result: BenchResult) -> list[Path]:
        """Write table ``name``'s rows, then bench.md, bench.csv and its plots with all of ``result``."""
        _mkdir(self.tables)
        self._csv[name] = csv_rows(rows, result.stamp)
        text = csv_text(self._csv[name])
        write_atomic(self.table_path(name), lambda p: p.write_text(text, encoding="utf-8"))
        return self.write(result, plot_tables={r.table for r in rows})

    def write(self, result: BenchResult, plot_tables: set[str] | None = None) -> list[Path]:
        """bench.md, bench.csv (every table's rows, a kept table's with its own run's stamp) and the plots
        of ``plot_tables`` (None: every sweep in ``result`` whose plot is missing); returns the files."""
        from sae_tune.bench.plots import PLOTS, plot_sweep, sweep_title
        from sae_tune.bench.report import markdown
        from sae_tune.bench.tables import RUNNERS

        _mkdir(self.out)
        md, csv_path = self.out / "bench.md", self.out / "bench.csv"
        text = markdown(result)
        write_atomic(md, lambda p: p.write_text(text, encoding="utf-8"))
        ordered = [name for name in RUNNERS if name in self._csv] + [n for n in self._csv if n not in RUNNERS]
        table = csv_text([row for name in ordered for row in self._csv[name]])
        write_atomic(csv_path, lambda p: p.write_text(table, encoding="utf-8"))
        files = [md, csv_path]
        for sweep, (file_name, xlabel, x) in PLOTS.items():
            rows = [r for r in result.measurements if r.table == sweep]
            path = self.out / file_name
            if not rows:
                continue
            wanted = (not path.exists()) if plot_tables is None else sweep in plot_tables
            if wanted:
                title = sweep_title(sweep, result)
                write_atomic(path, lambda p, a=(rows, x, xlabel, title): plot_sweep(*a, p))
            if path.exists():
                files.append(path)
        return files


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {path}: {exc.strerror or exc}") from exc
