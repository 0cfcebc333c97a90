"""PNG plots of the sweeps (matplotlib, Agg backend: no display needed): time per decode and speedup
against dense, one line per path. Only correct, timed measurements are drawn."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sae_tune.bench.measure import Measurement
from sae_tune.bench.paths import DENSE
from sae_tune.bench.runner import BenchResult, Stamp
from sae_tune.bench.tables import BATCH_SWEEP, L0_SWEEP, WIDTH_SWEEP

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTS: dict[str, tuple[str, str, Callable[[Measurement], int | None]]] = {
    L0_SWEEP: ("l0_sweep.png", "L0 (non-zero features per token)", lambda r: r.l0),
    WIDTH_SWEEP: ("width_sweep.png", "SAE width F", lambda r: r.width),
    BATCH_SWEEP: ("batch_sweep.png", "batch size B (tokens)", lambda r: r.batch),
}


def plot_sweep(
    rows: list[Measurement], x: Callable[[Measurement], int | None], xlabel: str, title: str, path: Path
) -> None:
    """Draw the sweep and write it to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = sweep_figure(rows, x, xlabel, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


TITLE_SIZE = 11


def wrap_text(text: str, fits: Callable[[str], bool]) -> str:
    """``text`` in lines that each ``fits``: broken between words, and inside a word only where the word
    alone does not fit; every character is kept, in order."""
    lines: list[str] = []
    current = ""
    for word in text.split(" "):
        candidate = f"{current} {word}" if current else word
        if fits(candidate):
            current = candidate
            continue
        if current:
            lines.append(current)
        while len(word) > 1 and not fits(word):
            n = len(word) - 1
            while n > 1 and not fits(word[:n]):
                n -= 1
            lines.append(word[:n])
            word = word[n:]
        current = word
    if current:
        lines.append(current)
    return "\n".join(lines)


def sweep_figure(
    rows: list[Measurement], x: Callable[[Measurement], int | None], xlabel: str, title: str
) -> Figure:
    """The sweep's figure; its title wrapped to the figure's width (a long device name is never cut)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.font_manager import FontProperties
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator

    series: dict[str, list[tuple[int, float, float | None]]] = {}
    for r in rows:
        xv = x(r)
        if r.ok and r.metric == "ms" and xv is not None and r.value is not None:
            series.setdefault(r.path, []).append((xv, r.value, r.vs_dense))
    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    for name, points in series.items():
        points.sort()
        xs = [p[0] for p in points]
        style = {"color": "black", "linewidth": 2.2} if name == DENSE else {}
        ax_t.plot(xs, [p[1] for p in points], "o-", label=name, **style)
        if name != DENSE:
            sp = [(p[0], p[2]) for p in points if p[2] is not None]
            ax_s.plot([p[0] for p in sp], [p[1] for p in sp], "o-", label=name)
    ax_s.axhline(1.0, color="black", linewidth=1.2, linestyle="--", label="dense (1x)")
    ticks = sorted({p[0] for points in series.values() for p in points})
    for ax, ylabel in ((ax_t, "ms per decode (median)"), (ax_s, "speedup vs dense (higher is better)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 1-2-5: labelled, not crowded
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    renderer = fig.canvas.get_renderer()
    font = FontProperties(size=TITLE_SIZE)
    room = 0.96 * fig.bbox.width  # pixels, at the figure's dpi like the text it measures

    def fits(line: str) -> bool:
        return renderer.get_text_width_height_descent(line, font, ismath=False)[0] <= room

    fig.suptitle(wrap_text(title, fits).replace("$", r"\$"), fontsize=TITLE_SIZE)  # "$" is not math here
    return fig


def sweep_title(table: str, result: BenchResult) -> str:
    """The plot's title: what is fixed in the sweep, the dtype, the device, torch and the date."""
    c, s = result.config, result.stamp
    fixed = {
        L0_SWEEP: f"B={c.batch}, F={c.width}, D={c.d_model}",
        WIDTH_SWEEP: f"B={c.batch}, L0={c.l0}, D={c.d_model}",
        BATCH_SWEEP: f"F={c.width}, D={c.d_model}, L0={c.l0}",
    }[table]
    name = table.replace("_", " ").replace("l0", "L0")
    return f"{name} ({fixed}, {s.dtype}) on {_device(s)}, torch {s.torch}, {s.date[:10]}"


def _device(s: Stamp) -> str:
    return f"{s.device} (sm {s.capability})" if s.capability else s.device


def write_plots(result: BenchResult, out_dir: Path) -> list[Path]:
    """One PNG per sweep that was run; returns their paths."""
    written = []
    for table, (name, xlabel, x) in PLOTS.items():
        rows = [r for r in result.measurements if r.table == table]
        if rows:
            path = out_dir / name
            plot_sweep(rows, x, xlabel, sweep_title(table, result), path)
            written.append(path)
    return written
