"""Write a run: ``bench.md`` (the eight tables with their notes) and ``bench.csv`` (one row per
measurement, each stamped with the device and versions)."""

from __future__ import annotations

import csv
import dataclasses
import re
import textwrap
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from sae_tune.bench.forward import DOES_NOT_FIT, FORWARD, UNPATCHED
from sae_tune.bench.measure import OK, UNAVAILABLE, WRONG, Measurement
from sae_tune.bench.paths import DENSE, DISPATCHER
from sae_tune.bench.runner import BenchResult, Stamp
from sae_tune.bench.tables import (
    BANDWIDTH,
    BATCH_SWEEP,
    L0_SWEEP,
    MEMORY,
    SHAPES,
    SPLIT,
    SUMMARY,
    WIDTH_SWEEP,
)
from sae_tune.cache.store import NOISY_SPREAD, is_noisy

HEADINGS = {
    SUMMARY: "## 1. Summary",
    SPLIT: "## 2. Kernel only vs full pipeline",
    L0_SWEEP: "## 3. L0 sweep",
    WIDTH_SWEEP: "## 4. Width sweep",
    SHAPES: "## 5. Real SAE shapes",
    MEMORY: "## 6. Peak memory",
    BANDWIDTH: "## 7. Achieved bandwidth and where dense starts to win",
    FORWARD: "## 8. SAE forward",
}

MEASUREMENT_FIELDS = tuple(f.name for f in dataclasses.fields(Measurement))
STAMP_FIELDS = tuple(f.name for f in dataclasses.fields(Stamp))


# --- number formatting ----------------------------------------------------------------------------------


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:.0f}"


def fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def noisy(r: Measurement | None, text: str) -> str:
    """``text`` flagged when ``r``'s time is noise (samples spread past NOISY_SPREAD): not a speed."""
    return f"{text} (noisy)" if r is not None and text != "-" and is_noisy(r.spread) else text


def fmt_diff(v: float | None) -> str:
    return "-" if v is None else "0" if v == 0 else f"{v:.1e}"


def fmt_mib(v: float | None) -> str:
    return "-" if v is None else f"{v / 2**20:.3g}"


def status_cell(r: Measurement) -> str:
    return "ok" if r.status == OK else r.status.upper() if r.status == WRONG else r.status


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def for_terminal(markdown: str, width: int = 120) -> str:
    """A section of bench.md as a terminal shows it within ``width`` columns: a table row that would be
    wider has its longest cells replaced by numbered references ("[1]"), whose texts follow the table,
    wrapped; other lines are wrapped. Nothing is cut."""
    out: list[str] = []
    notes: list[str] = []

    def flush() -> None:
        for i, note in enumerate(notes, 1):
            out.extend(
                textwrap.wrap(
                    note, width, initial_indent=f"[{i}] ", subsequent_indent="    ", break_on_hyphens=False
                )
            )
        notes.clear()

    for line in markdown.splitlines():
        if not line.startswith("|"):
            flush()
            out.extend(textwrap.wrap(line, width, break_on_hyphens=False) or [""])
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        while len(line) > width:
            longest = max(range(len(cells)), key=lambda i: len(cells[i]))
            if len(cells[longest]) <= 6:
                break  # nothing left worth a reference
            notes.append(cells[longest].replace("\\|", "|"))
            cells[longest] = f"[{len(notes)}]"
            line = "| " + " | ".join(cells) + " |"
        out.append(line)
    flush()
    return "\n".join(out)


def _paths(rows: Iterable[Measurement]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(r.path, None)
    return list(seen)


def _problems(rows: Iterable[Measurement]) -> list[str]:
    """One bullet per distinct failure, unavailability or wrong result (they are not timed)."""
    seen: dict[tuple[str, str, str], None] = {}
    for r in rows:
        if r.status != OK:
            seen.setdefault((r.path, r.status, r.note), None)
    return [f"- {path}: {status_cell_text(status)}: {note}" for path, status, note in seen]


def status_cell_text(status: str) -> str:
    return status.upper() if status == WRONG else status


def _notes(rows: Iterable[Measurement], extra: Iterable[str] = ()) -> str:
    return "\n".join([f"- {e}" for e in extra if e] + _problems(rows))


def _join(*blocks: str) -> str:
    """Paragraphs of a section, without the empty ones."""
    return "\n\n".join(b for b in blocks if b)


def _select(result: BenchResult, table: str, metric: str | None = "ms") -> list[Measurement]:
    return [r for r in result.measurements if r.table == table and (metric is None or r.metric == metric)]


# --- the tables -----------------------------------------------------------------------------------------


def summary_section(result: BenchResult) -> str:
    rows = _select(result, SUMMARY)
    c = result.config
    body = markdown_table(
        ("path", "ms", "vs dense", "max abs diff vs dense", "status", "note"),
        [
            (
                r.path,
                noisy(r, fmt_ms(r.value)),
                noisy(r, fmt_x(r.vs_dense)),
                fmt_diff(r.max_abs_diff),
                status_cell(r),
                r.note,
            )
            for r in rows
        ],
    )
    head = f"B={c.batch}, F={c.width}, D={c.d_model}, L0={c.l0} ({_workload(rows)})."
    extra = [
        result.triton_note,
        "torch.compile'd dense is compiled by its first call, before timing.",
        "The dispatcher's note is what sae_tune.explain() said it chose.",
    ]
    return _join(head, body, _notes([], extra))


def _workload(rows: list[Measurement]) -> str:
    r = next((r for r in rows if r.l0_mean is not None), None)
    return "" if r is None else f"workload L0 mean {r.l0_mean:g}, max {r.l0_max}"


def split_section(result: BenchResult) -> str:
    rows = _select(result, SPLIT)
    table = []
    for path in _paths(rows):
        full = next((r for r in rows if r.path == path and r.mode == "full"), None)
        kernel = next((r for r in rows if r.path == path and r.mode == "kernel"), None)
        prep = None
        if full and kernel and full.ok and kernel.ok and full.value:
            prep = f"{1 - kernel.value / full.value:.0%}"  # type: ignore[operator]
        status = "; ".join(sorted({status_cell(r) for r in (full, kernel) if r is not None}))
        table.append(
            (
                path,
                noisy(full, fmt_ms(full.value if full else None)),
                noisy(kernel, fmt_ms(kernel.value if kernel else None)),
                prep or "-",
                noisy(full, fmt_x(full.vs_dense if full else None)),
                noisy(kernel, fmt_x(kernel.vs_dense if kernel else None)),
                status,
            )
        )
    c = result.config
    head = (
        f"B={c.batch}, F={c.width}, D={c.d_model}, L0={c.l0}. Full: from dense activations. Kernel: the "
        "sparse structure (CSR, bags, or the kernels' own view) built before timing."
    )
    body = markdown_table(
        ("path", "full ms", "kernel ms", "preparation share", "full vs dense", "kernel vs dense", "status"),
        table,
    )
    return _join(head, body, _notes(rows, [result.triton_note]))


def sweep_cell(r: Measurement | None) -> str:
    if r is None:
        return "-"
    if r.status == OK:
        return noisy(r, fmt_ms(r.value) if r.path == DENSE else f"{fmt_ms(r.value)} ({fmt_x(r.vs_dense)})")
    return {WRONG: "WRONG", UNAVAILABLE: "n/a"}.get(r.status, r.status)


def pivot(rows: list[Measurement], key: Callable[[Measurement], object], key_label: str) -> str:
    """One line per sweep point, one column per path: ms and speedup vs dense."""
    paths = _paths(rows)
    points: dict[object, dict[str, Measurement]] = {}
    for r in rows:
        points.setdefault(key(r), {})[r.path] = r
    table = []
    for k, by_path in points.items():
        any_row = next(iter(by_path.values()))
        table.append(
            (k, f"{any_row.l0_mean:g} / {any_row.l0_max}", *(sweep_cell(by_path.get(p)) for p in paths))
        )
    headers = (key_label, "L0 mean / max", *(f"{p} ms" for p in paths))
    return markdown_table(headers, table)


def l0_section(result: BenchResult) -> str:
    rows = _select(result, L0_SWEEP)
    c = result.config
    head = f"B={c.batch}, F={c.width}, D={c.d_model}. Cells: ms (speedup vs dense). Plot: `l0_sweep.png`."
    return _join(head, pivot(rows, lambda r: r.l0, "L0"), _notes(rows))


def width_section(result: BenchResult) -> str:
    rows = _select(result, WIDTH_SWEEP)
    c = result.config
    head = f"B={c.batch}, L0={c.l0}, D={c.d_model}. Cells: ms (speedup vs dense). Plot: `width_sweep.png`."
    return _join(head, pivot(rows, lambda r: r.width, "F"), _notes(rows))


def shapes_section(result: BenchResult) -> str:
    rows = _select(result, SHAPES)
    table = [
        (
            r.shape,
            r.width,
            r.d_model,
            f"{r.l0} ({r.l0_mean:g} / {r.l0_max})",
            r.path,
            noisy(r, fmt_ms(r.value)),
            noisy(r, fmt_x(r.vs_dense)),
            fmt_diff(r.max_abs_diff),
            status_cell(r),
        )
        for r in rows
    ]
    head = (
        f"B={result.config.batch}. L0: the SAE's, then the workload's mean / max. max abs diff: against "
        "the dense output; status: within the dtype's tolerance of the exact fp64 result."
    )
    body = markdown_table(
        ("SAE", "F", "D", "L0", "path", "ms", "vs dense", "max abs diff vs dense", "status"), table
    )
    extra = [f"{c.label}: {c.note}" for c in result.config.shapes if c.note]
    return _join(head, body, _notes(rows, extra))


def memory_section(result: BenchResult) -> str:
    measured = _select(result, MEMORY, "peak_bytes")
    models = _select(result, MEMORY, "model_bytes")
    table = []
    for batch in result.config.memory_batches:
        names = _paths([r for r in measured + models if r.batch == batch])
        for name in names:
            m = next((r for r in measured if r.batch == batch and r.path == name), None)
            mod = next((r for r in models if r.batch == batch and r.path == name), None)
            table.append(
                (
                    batch,
                    name,
                    (m or mod).max_l0 or "-",  # type: ignore[union-attr]
                    fmt_mib(m.value) if m and m.ok else ("-" if m is None else status_cell(m)),
                    fmt_mib(mod.value) if mod else "-",
                )
            )
    methods = sorted({r.note for r in measured if r.ok})
    c = result.config
    head = (
        f"F={c.width}, D={c.d_model}, L0={c.l0}. MiB allocated during one decode beyond its inputs "
        "(output and temporaries). measured and model are different things; see the notes."
    )
    body = markdown_table(("B", "path", "max_l0", "measured MiB", "model MiB"), table)
    extra = [
        *methods,
        models[0].note if models else "",
        "Fixed allocation allocates the same for every overflow policy (validate, fallback, unchecked); "
        "it is measured with fallback.",
    ]
    if not result.triton:
        extra.append(
            "Triton modes are not run here, so exact and fixed allocation have model numbers only "
            "(measured with torch.cuda.max_memory_allocated on CUDA)."
        )
    return _join(head, body, _notes(measured, extra))


def bandwidth_section(result: BenchResult) -> str:
    c = result.config
    copy = next((r for r in result.measurements if r.metric == "copy_GB/s"), None)
    gbps = {(r.path, r.batch): r for r in _select(result, BANDWIDTH, "GB/s")}
    frac = {(r.path, r.batch): r for r in _select(result, BANDWIDTH, "fraction_of_copy")}
    sweep = _select(result, BATCH_SWEEP)
    at_ref = [r for r in sweep if r.batch == c.batch]
    table = []
    for r in at_ref:
        g, f = gbps.get((r.path, r.batch)), frac.get((r.path, r.batch))
        mb = "-" if g is None or g.value is None or r.value is None else f"{g.value * r.value:.3g}"
        gb = "-" if g is None or g.value is None else f"{g.value:.3g}"
        share = "-" if f is None or f.value is None else f"{f.value:.1%}"
        table.append((r.path, noisy(r, fmt_ms(r.value)), mb, gb, share, status_cell(r)))
    copy_text = f"{copy.value:.1f} GB/s ({copy.note})" if copy and copy.value else "not measured"
    head = (
        f"B={c.batch}, F={c.width}, D={c.d_model}, L0={c.l0}. Device copy bandwidth: {copy_text}. "
        "Bytes: the least traffic of each path's algorithm (dense reads all of W_dec; sparse paths read "
        "the fired rows), a model, not a hardware counter. A path that mostly reads (dense at small B) can "
        "pass 100%: the copy also pays for writing, and on CPUs for reading the lines it writes."
    )
    body = markdown_table(("path", "ms", "MB moved (model)", "GB/s", "of copy bandwidth", "status"), table)
    wins = next((r for r in result.measurements if r.metric == "dense_wins_from_batch"), None)
    sweep_head = (
        f"Batch sweep at F={c.width}, D={c.d_model}, L0={c.l0}. Cells: ms (speedup vs dense). "
        f"Plot: `batch_sweep.png`. **{wins.note if wins else 'not measured'}** "
        f"(the dispatcher is not counted as a sparse path)."
    )
    extra = [f"{DISPATCHER}: no bandwidth (its bytes depend on what it chose)."]
    sweep_table = pivot(sweep, lambda r: r.batch, "B")
    return _join(head, body, "### Batch sweep", sweep_head, sweep_table, _notes(sweep, extra))


def _forward_cell(r: Measurement | None, text: Callable[[float], str]) -> str:
    """A number of the SAE forward table, or why there is none."""
    if r is None:
        return "not timed"
    if r.ok:
        return text(r.value)  # type: ignore[arg-type]
    if r.status == UNAVAILABLE and r.note.startswith(DOES_NOT_FIT):
        return DOES_NOT_FIT
    return {WRONG: "WRONG", UNAVAILABLE: "n/a"}.get(r.status, r.status)


def forward_section(result: BenchResult) -> str:
    times = {(r.shape, r.batch, r.path): r for r in _select(result, FORWARD, "ms")}
    peaks = _select(result, FORWARD, "peak_bytes")
    table = []
    for m in peaks:
        t = times.get((m.shape, m.batch, m.path))
        table.append(
            (
                m.shape,
                m.batch,
                f"{m.l0_mean:g} / {m.l0_max}" if m.l0_mean is not None else "-",
                m.path,
                noisy(t, _forward_cell(t, fmt_ms)),
                noisy(t, fmt_x(t.of_baseline)) if t is not None and t.ok else "-",
                _forward_cell(m, lambda v: f"{v / 1e6:.0f}" if v >= 10e6 else f"{v / 1e6:.2g}"),
                fmt_x(m.of_baseline) if m.ok else "-",
                fmt_diff(m.max_abs_diff),
                status_cell(m if m.status != OK or t is None else t),
            )
        )
    head = (
        "A SAELens JumpReLU SAE built from its config (random weights, threshold firing about the SAE's L0 "
        f"per N(0, 1) token), N(0, 1) input, {result.stamp.dtype}, under torch.no_grad(). Modes: "
        f"{UNPATCHED} = SAELens's own forward; decode-only = SAELens's forward with only the decoder "
        "matmul routed through the dispatcher (what a forward with an activation hook gets); sparse = the "
        "patched forward: sparse_encode -> SparseActs -> decode, no dense (B, F) activations. time: median "
        "of the modes timed interleaved in one run. extra peak: MB (10^6 bytes) allocated during one "
        "forward beyond its inputs (output and temporaries). x unpatched: this / unpatched (below 1 is "
        "better). check: the output against the exact (fp64) decode of SAELens's own activations, within "
        "the dtype's tolerance; a wrong mode is neither measured nor timed."
    )
    body = markdown_table(
        (
            "SAE",
            "B",
            "L0 mean / max",
            "mode",
            "time (ms)",
            "x unpatched",
            "extra peak (MB)",
            "x unpatched",
            "max abs diff vs unpatched",
            "check",
        ),
        table,
    )
    methods = sorted({r.note for r in peaks if r.ok})
    problems: dict[str, None] = {}
    for r in [*peaks, *times.values()]:
        if r.status != OK:
            problems.setdefault(f"- {r.shape} B={r.batch} {r.path}: {status_cell_text(r.status)}: {r.note}")
    notes = [f"- extra peak memory {m}" for m in methods]
    untimed = sorted({r.shape for r in peaks if (r.shape, r.batch, r.path) not in times})
    notes += [f"- {s}: extra peak memory only (not timed: minutes per forward)" for s in untimed]
    return _join(head, body, "\n".join([*notes, *problems]))


SECTIONS: dict[str, Callable[[BenchResult], str]] = {
    SUMMARY: summary_section,
    SPLIT: split_section,
    L0_SWEEP: l0_section,
    WIDTH_SWEEP: width_section,
    SHAPES: shapes_section,
    MEMORY: memory_section,
    BANDWIDTH: bandwidth_section,
    FORWARD: forward_section,
}


def header(result: BenchResult) -> str:
    s = result.stamp
    where = f"{s.device} (compute capability {s.capability})" if s.capability else f"{s.device} (CPU)"
    if s.device_kind == "cuda":
        timing = "triton.testing.do_bench(warmup=25, rep=100) medians (it clears L2 between runs)"
    elif s.cache_flush_mib:
        timing = (
            "medians of interleaved perf_counter runs after warm-up, each from a cold cache "
            f"({s.cache_flush_mib} MiB rewritten before every timed call; warm-cache times of the sparse "
            "paths, the same batch decoded again and again, are lower)"
        )
    else:
        timing = "medians of interleaved perf_counter runs after warm-up (caches not flushed)"
    lines = [
        "# sae-tune bench",
        "",
        f"- device: {where}; host CPU: {s.cpu_model}, {s.threads} torch threads",
        f"- torch {s.torch}, triton {s.triton}, sae-tune {s.sae_tune}; dtype {s.dtype}",
        f"- date (UTC): {s.date}; configuration: {s.config}; wall time {result.seconds:.0f} s",
        f"- timing: {timing}; in each row every path is timed interleaved with dense, so ratios come from "
        "one run. A path is first checked against the exact (fp64) result; a wrong or failing path is "
        "reported and never timed.",
        "- workloads: seeded synthetic SAE activations (lognormal per-token L0, Zipf feature frequencies), "
        "random weights.",
    ]
    if any(is_noisy(r.spread) for r in result.measurements):
        lines.append(
            f"- (noisy): the interquartile range of that time's samples exceeds {NOISY_SPREAD:.0%} of their "
            "median (another process took the cores): the time and its ratios are not a speed."
        )
    if result.triton_note:
        lines.append(f"- {result.triton_note}")
    if result.kept:
        lines.append(
            f"- kept from an earlier run of this configuration into this folder (--resume), not measured in "
            f"this one: {', '.join(result.kept)}; their CSV rows carry that run's date"
        )
    return "\n".join(lines)


def markdown(result: BenchResult) -> str:
    """The whole report; a table that was not run is left out."""
    parts = [header(result)]
    present = {r.table for r in result.measurements}
    for table, section in SECTIONS.items():
        if table in present:
            parts.append(f"{HEADINGS[table]}\n\n{section(result)}")
    return "\n\n".join(parts) + "\n"


def write_csv(result: BenchResult, path: Path) -> None:
    stamp = dataclasses.asdict(result.stamp)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[*MEASUREMENT_FIELDS, *STAMP_FIELDS])
        writer.writeheader()
        for r in result.measurements:
            row = {k: ("" if v is None else v) for k, v in r.to_row().items()}
            writer.writerow({**row, **stamp})


def write_markdown(result: BenchResult, path: Path) -> None:
    path.write_text(markdown(result), encoding="utf-8")
