"""The main job: ``sae-tune --sae NAME`` tunes one SAE shape on the local device and prints a table.

Besides the decode, the job tunes ``sparse_encode`` for the shape at the same batch sizes (the chunk size,
and any other target's encode candidates; ``sae_tune.autotune.encode_search``): a few candidates, timed
within a second or two per batch size on CPU.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from sae_tune.artefacts import UnsafeArtefactDir
from sae_tune.cli.options import DTYPE_NAMES, DeviceType, torch_dtype

# Short headers and plain columns, so that a row with the longest winner label fits 120 columns.
TABLE_HEADERS = ("B", "winner", "ms", "dense ms", "vs dense", "vs csr", "vs bag", "trials")


@dataclass(frozen=True)
class ResolvedSpec:
    """The SAE to tune and where its L0 came from (``l0_assumed``: not stated by its source)."""

    spec: Any  # sae_tune.specs.SAESpec (imported lazily: the CLI starts fast)
    l0_source: str
    l0_assumed: bool = False


def looks_like_path(value: str) -> bool:
    """A --sae value is a folder when it has a path separator or starts with . or ~; else a preset."""
    seps = {os.sep, "/"} | ({os.altsep} if os.altsep else set())
    return any(sep in value for sep in seps) or value.startswith((".", "~"))


def stderr_is_terminal() -> bool:
    """Progress shows as a bar on a terminal, else as a line per phase (logs, CI, pipes)."""
    return sys.stderr.isatty()


def _bad(option: str, message: str) -> click.BadParameter:
    return click.BadParameter(message, param_hint=f"'{option}'")


def resolve_spec(
    sae: str | None,
    width: int | None,
    d_model: int | None,
    l0: int | None,
    arch: str | None,
    k: int | None,
) -> ResolvedSpec:
    """A preset name, a local SAELens directory, or an explicit shape; options that do not apply to the
    SAE chosen are refused, never ignored."""
    from sae_tune.specs import SpecError, get_spec, read_saelens_dir, spec_from_shape

    if sae is None:
        try:
            return _explicit_shape(width, d_model, l0, arch, k, spec_from_shape)
        except SpecError as exc:
            raise click.UsageError(str(exc)) from exc
    if width is not None or d_model is not None:
        raise click.UsageError(
            "give either --sae or --width/--d-model, not both (--sae already fixes the shape)"
        )
    try:
        if looks_like_path(sae) or Path(sae).is_dir():
            path = Path(sae).expanduser()
            if not path.exists():
                raise _bad("--sae", f"no such directory: {sae}")
            if not path.is_dir():
                raise _bad("--sae", f"not a directory: {sae} (a local SAELens SAE is a folder with cfg.json)")
            spec, origin = read_saelens_dir(path)
            resolved = ResolvedSpec(spec, f"{path / 'cfg.json'}: {origin.source}", origin.assumed)
        else:
            resolved = ResolvedSpec(get_spec(sae), f"preset {sae.strip().lower()}")
    except SpecError as exc:
        raise _bad("--sae", str(exc)) from exc
    return _apply_overrides(resolved, l0, arch, k, spec_from_shape)


def _explicit_shape(width, d_model, l0, arch, k, spec_from_shape) -> ResolvedSpec:
    arch = arch or "jumprelu"
    if k is not None and arch != "topk":
        raise _bad("--k", f"--k applies to TopK SAEs (--arch topk), not --arch {arch}")
    if arch == "topk" and l0 is None:
        l0 = k  # a TopK SAE fires exactly k per token
    if arch == "topk" and k is not None and l0 != k:
        raise _bad("--l0", f"a TopK SAE fires exactly k={k} per token; leave --l0 out or equal to --k")
    if width is None or d_model is None or l0 is None:
        raise click.UsageError("give --sae NAME|DIR, or all of --width, --d-model and --l0")
    if k is not None and k > width:
        raise _bad("--k", f"--k {k} exceeds --width {width}")
    if l0 > width:
        raise _bad("--l0", f"--l0 {l0} exceeds --width {width} (at most every feature fires)")
    return ResolvedSpec(spec_from_shape(width, d_model, l0, arch, k), "--l0" if arch != "topk" else "--k")


def _apply_overrides(resolved: ResolvedSpec, l0, arch, k, spec_from_shape) -> ResolvedSpec:
    """--arch must agree with the SAE's own; --k only for TopK (it sets L0 too); --l0 for the others."""
    spec = resolved.spec
    if arch is not None and arch != spec.arch:
        raise _bad("--arch", f"{spec.name} is a {spec.arch} SAE, not {arch}; leave --arch out with --sae")
    if k is not None:
        if spec.arch != "topk":
            raise _bad("--k", f"--k applies to TopK SAEs; {spec.name} is a {spec.arch} SAE")
        if l0 is not None and l0 != k:
            raise _bad("--l0", f"a TopK SAE fires exactly k per token; --l0 {l0} contradicts --k {k}")
        if k > spec.width:
            raise _bad("--k", f"--k {k} exceeds the width of {spec.name} ({spec.width})")
        if k != spec.k:
            spec = spec_from_shape(spec.width, spec.d_model, k, "topk", k, name=f"{spec.name}-k-{k}")
        return ResolvedSpec(spec, "--k")
    if l0 is not None:
        if spec.arch == "topk":
            raise _bad("--l0", f"{spec.name} is a TopK SAE: its L0 is k={spec.k}; set --k to change it")
        if l0 > spec.width:
            raise _bad("--l0", f"--l0 {l0} exceeds the width of {spec.name} ({spec.width})")
        if l0 != spec.l0:
            spec = spec_from_shape(spec.width, spec.d_model, l0, spec.arch, name=f"{spec.name}-l0-{l0}")
        return ResolvedSpec(spec, "--l0")
    return resolved


def _check_cache_limits(spec: Any, sizes: tuple[int, ...] | list[int], *, from_sae: bool) -> None:
    """Refuse, before anything is measured, a shape or batch size the cache cannot key (CacheKey's bounds):
    otherwise the first result to be stored would fail after minutes of tuning."""
    from sae_tune.cache.store import MAX_BATCH_BUCKET, MAX_D, MAX_F, batch_bucket

    if spec.width > MAX_F:
        option = "--sae" if from_sae else "--width"
        raise _bad(option, f"width {spec.width} exceeds the {MAX_F} features the cache can key")
    if spec.d_model > MAX_D:
        option = "--sae" if from_sae else "--d-model"
        raise _bad(option, f"d_model {spec.d_model} exceeds the {MAX_D} the cache can key")
    for b in sizes:
        if batch_bucket(b) > MAX_BATCH_BUCKET:
            raise _bad("--batch-size", f"{b} exceeds the {MAX_BATCH_BUCKET} tokens the cache can key")


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


LABEL_WIDTH = 34
TABLE_WIDTH = 120


def fitted(headers: tuple[str, ...], rows_of: Callable[[Callable[[str], str]], list[tuple]]) -> str:
    """A plain table of ``rows_of(label_of)`` with whole labels, or, where a line would pass
    ``TABLE_WIDTH`` columns, with each label wrapped over lines of ``LABEL_WIDTH`` characters."""
    from tabulate import tabulate

    def render(label_of: Callable[[str], str]) -> str:
        return tabulate(rows_of(label_of), headers=headers, tablefmt="simple", disable_numparse=True)

    table = render(lambda label: label)
    if max(map(len, table.splitlines()), default=0) <= TABLE_WIDTH:
        return table
    return render(wrap_label)


def _echo_prose(text: str) -> None:
    """A sentence of the tuner's output, wrapped at ``TABLE_WIDTH`` columns (words and paths kept whole)."""
    click.echo(textwrap.fill(text, TABLE_WIDTH, break_on_hyphens=False, break_long_words=False))


def _time_cell(value: float, spread: float | None) -> str:
    """A time in ms; a noisy one shows its spread."""
    from sae_tune.cache.store import is_noisy

    return f"{value:.3f} ±{spread * 100:.0f}%" if is_noisy(spread) else f"{value:.3f}"


def _approx(text: str, noisy: bool) -> str:
    """A ratio; "~" where a noisy time is in it (then it is not a speedup)."""
    return f"~{text}" if noisy and text != "-" else text


def _count(n: int, failed: int) -> str:
    return f"{n}" + (f" ({failed} failed)" if failed else "")


def wrap_label(label: str, width: int = LABEL_WIDTH) -> str:
    """A winner's label on lines of at most ``width`` characters, broken after a "-" (labels are dash-
    separated parameters), so that a table row with the longest label fits 120 columns."""
    lines: list[str] = []
    while len(label) > width:
        cut = label.rfind("-", 0, width) + 1 or width
        lines.append(label[:cut])
        label = label[cut:]
    return "\n".join([*lines, label])


def format_table(results) -> str:
    from sae_tune.cache.store import is_noisy

    def row(r, label_of: Callable[[str], str]) -> tuple:
        return (
            r.batch_size,
            label_of(r.best.label),
            _time_cell(r.best_ms, r.best_spread),
            f"{r.dense_ms:.3f}" + ("*" if is_noisy(r.dense_spread) else ""),
            _approx(_ratio(r.speedup), r.noisy),
            _approx(_ratio(r.versus("sparse_csr")), r.noisy),
            _approx(_ratio(r.versus("embedding_bag_csr")), r.noisy),
            _count(r.trials, r.failed),
        )

    return fitted(TABLE_HEADERS, lambda label_of: [row(r, label_of) for r in results])


def _cache_error(cache: str | None, exc: Exception) -> click.BadParameter:
    hint = "'--cache'" if cache is not None else "'--cache' (default from SAE_TUNE_CACHE or the user cache)"
    return click.BadParameter(str(exc), param_hint=hint)


def run_tune(
    *,
    sae: str | None,
    width: int | None,
    d_model: int | None,
    l0: int | None,
    arch: str | None,
    k: int | None,
    device: str | None,
    dtype: str,
    batch_sizes: tuple[int, ...],
    trials: int,
    time_budget: float | None,
    acts_path: str | None,
    cache: str | None,
    storage: str | None,
    seed: int,
    as_json: bool,
    retune: bool = False,
) -> None:
    import torch

    from sae_tune.autotune.search import (
        TuneError,
        WorkloadTooLarge,
        default_batch_sizes,
        optuna_storage,
        quiet_optuna,
    )
    from sae_tune.autotune.workload import WorkloadError, load_acts
    from sae_tune.cache.store import CacheError, Store
    from sae_tune.progress import progress_interval

    started = time.perf_counter()
    resolved = resolve_spec(sae, width, d_model, l0, arch, k)
    spec = resolved.spec
    if resolved.l0_assumed:
        click.echo(f"note: {resolved.l0_source}; assumed L0={spec.l0} (give --l0 to set it)", err=True)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sizes = batch_sizes or default_batch_sizes(dev)
    _check_cache_limits(spec, sizes, from_sae=sae is not None)
    acts = None
    if acts_path is not None:
        try:
            acts = load_acts(acts_path, width=spec.width)
        except WorkloadError as exc:
            raise _bad("--acts", str(exc)) from exc
    try:
        study_storage = optuna_storage(storage)
    except ValueError as exc:
        raise _bad("--storage", str(exc).removeprefix(f"--storage {storage!r}: ")) from exc
    quiet_optuna()
    progress_interval()  # a bad SAE_TUNE_PROGRESS_INTERVAL is refused before any work
    show_bar = stderr_is_terminal()

    def phase(message: str) -> None:
        if not show_bar:
            click.echo(f"[{time.perf_counter() - started:7.1f} s] {message}", err=True)

    try:
        store = Store(cache)
    except (CacheError, sqlite3.Error) as exc:
        raise _cache_error(cache, exc) from exc
    results = []
    try:
        with store:
            results, tuner = _tune_sizes(
                spec, dev, dtype, store, acts, seed, study_storage, retune, sizes, trials, time_budget,
                as_json, show_bar, phase,
            )  # fmt: skip
            encoded = _tune_encode(spec, tuner, store, sizes, seed, retune, phase)
    except (CacheError, sqlite3.Error) as exc:
        raise _cache_error(cache, exc) from exc
    except WorkloadTooLarge as exc:
        raise _bad("--batch-size", str(exc)) from exc
    except (TuneError, UnsafeArtefactDir) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        payload = {
            "sae": spec.name,
            "F": spec.width,
            "D": spec.d_model,
            "l0": spec.l0,
            "l0_source": resolved.l0_source,
            "l0_assumed": resolved.l0_assumed,
            "arch": spec.arch,
            "device": tuner.info.name,
            "device_kind": dev.type,
            "dtype": dtype,
            "torch": tuner.info.torch_version,
            "triton": tuner.info.triton_version,
            "cache": str(store.path),
            "retune": retune,
            "seconds": round(time.perf_counter() - started, 1),
            "results": [r.to_json() for r in results],
            "encode": [r.to_json() for r in encoded],
        }
        click.echo(json.dumps(payload, indent=1))
    else:
        click.echo(format_table(results))
        _echo_prose(
            "ms: median wall-clock time per decode, re-timed interleaved with dense in one run; vs csr / "
            "vs bag: against torch.sparse CSR and embedding_bag; trials: candidates measured."
        )
        if encoded:
            click.echo(format_encode_table(encoded))
            _echo_prose("encode ms: median time of sparse_encode's candidates, timed interleaved in one run.")
        if any(r.noisy for r in [*results, *encoded]):
            _echo_prose(
                "noisy: ±N% (a time whose samples spread past half their median: a busy machine), * (a "
                "noisy dense time), ~ (a ratio with a noisy time in it, not a speedup); such a winner is "
                "stored flagged and replaced by the next quiet measurement."
            )


def activation_for(spec: Any) -> str:
    """The encode activation of a spec: "topk" when it has k, "jumprelu" for JumpReLU, else "relu"."""
    from sae_tune.autotune.encode_search import activation_of

    return activation_of(spec.arch, spec.k)


def _tune_encode(spec, tuner, store, sizes, seed, retune, phase) -> list:
    """Tune ``sparse_encode`` for the SAE's shape at each batch size (with the decoder's W_dec as W_enc's
    values); a failure is reported on stderr and leaves the decode results as they are."""
    from sae_tune.autotune.encode_search import describe, tune_encode
    from sae_tune.progress import track

    activation = activation_for(spec)
    started = time.perf_counter()
    try:
        W_enc = tuner.W_dec.T.contiguous()
    except (RuntimeError, MemoryError) as exc:
        click.echo(f"note: encode not tuned (W_enc does not fit on {tuner.device}: {exc})", err=True)
        return []
    forgotten: set = set() if retune else None  # type: ignore[assignment]
    out = []
    for b in sizes:
        try:
            result = tune_encode(
                store, W_enc, batch_size=b, activation=activation, k=spec.k, l0=float(spec.l0),
                info=tuner.info, seed=seed, forgotten=forgotten,
                progress=lambda items, b=b: track(items, f"encode B={b}: checks", unit="candidate"),
            )  # fmt: skip
        except (RuntimeError, MemoryError) as exc:  # out of memory for this batch size's encode
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            click.echo(f"note: encode not tuned for batch size {b}: {first}", err=True)
            continue
        phase(describe(result))
        out.append(result)
    phase(f"encode ({activation}) tuned in {time.perf_counter() - started:.1f} s")
    return out


def format_encode_table(results) -> str:
    def row(r, label_of: Callable[[str], str]) -> tuple:
        ratio = _ratio(None if r.default_ms is None else r.default_ms / r.best_ms)
        return (
            r.batch_size,
            r.key.op,
            label_of(r.best.label),
            _time_cell(r.best_ms, r.best_spread),
            "-" if r.default_ms is None else _time_cell(r.default_ms, r.default_spread),
            _approx(ratio, r.noisy),
            _count(len(r.times), len(r.failed)),
        )

    headers = ("B", "op", "encode winner", "ms", "default ms", "vs default", "candidates")
    return fitted(headers, lambda label_of: [row(r, label_of) for r in results])


def _tune_sizes(
    spec, dev, dtype, store, acts, seed, study_storage, retune, sizes, trials, time_budget, as_json,
    show_bar, phase,
):  # fmt: skip
    """Build the tuner and tune each batch size; progress goes to stderr (a bar on a terminal, else
    a line per phase), never to stdout, which holds only the table or the JSON."""
    from sae_tune.autotune.search import Tuner
    from sae_tune.progress import Progress

    try:
        tuner = Tuner(
            spec,
            device=dev,
            dtype=torch_dtype(dtype),
            store=store,
            acts=acts,
            seed=seed,
            storage=study_storage,
            phase=phase,
            retune=retune,
            notice=lambda message: click.echo(f"note: {message}", err=True),
        )
    except (RuntimeError, MemoryError) as exc:  # W_dec of this shape does not fit on the device
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise click.UsageError(
            f"--width {spec.width} x --d-model {spec.d_model}: the SAE weights cannot be built on "
            f"{dev}: {first}"
        ) from exc
    if not as_json:
        _echo_prose(
            f"{spec.name}: F={spec.width} D={spec.d_model} L0~{spec.l0} ({spec.arch}) on "
            f"{tuner.info.name} [{dev.type}], {dtype}; workload L0 mean {tuner.l0.mean:.1f}, "
            f"p99 {tuner.l0.p99}, max {tuner.l0.max}; cache {store.path}"
        )
    phase(f"{spec.name} on {tuner.info.name}: batch sizes {', '.join(map(str, sizes))}, {trials} trials each")
    results = []
    for b in sizes:
        with Progress(trials, f"B={b}: search", unit="trial", tty=show_bar) as bar:
            tuner.progress = lambda n, best, bar=bar: bar.update(n, best)
            if show_bar:
                tuner.phase = bar.describe
            results.append(tuner.tune_batch(b, trials=trials, time_budget=time_budget))
    return results, tuner


def tune_options(command):
    """Options of the main job (on the ``sae-tune`` group itself)."""
    options = [
        click.option(
            "--sae",
            help="Preset name (see `sae-tune list`) or a local SAELens directory (a value with a path "
            "separator or starting with . or ~ is always a directory).",
        ),
        click.option("--width", type=click.IntRange(1), help="SAE width F (with --d-model and --l0)."),
        click.option("--d-model", type=click.IntRange(1), help="Model dimension D."),
        click.option(
            "--l0",
            type=click.IntRange(1),
            help="Mean non-zero features per token (with --sae: overrides the SAE's own L0).",
        ),
        click.option(
            "--arch",
            type=click.Choice(["jumprelu", "topk", "relu"]),
            default=None,
            help="Architecture of an explicit shape [default: jumprelu]; with --sae it must match.",
        ),
        click.option("--k", type=click.IntRange(1), help="TopK only: features kept per token."),
        click.option(
            "--device",
            type=DeviceType(),
            help="cpu, cuda or cuda:N [default: cuda if available, else cpu].",
        ),
        click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True),
        click.option(
            "--batch-size",
            "batch_sizes",
            type=click.IntRange(1),
            multiple=True,
            help="Tokens per decode; repeat for several [cpu: 1 32 256; cuda: 1 .. 4096].",
        ),
        click.option(
            "--trials",
            type=click.IntRange(1),
            default=20,
            show_default=True,
            help="Candidates measured per batch size by the search (a repeated suggestion is not "
            "measured again and does not count).",
        ),
        click.option(
            "--time-budget",
            type=click.FloatRange(min=0, min_open=True),
            help="Seconds per batch size for the search.",
        ),
        click.option(
            "--acts",
            "acts_path",
            type=click.Path(exists=True, dir_okay=False),
            help="Real activations (.pt, .npy, .safetensors) instead of the synthetic workload.",
        ),
        click.option("--cache", type=click.Path(), help="SQLite cache file [env SAE_TUNE_CACHE]."),
        click.option("--storage", help="Optuna storage shared by processes: journal:PATH or a database URL."),
        click.option(
            "--retune",
            is_flag=True,
            help="Forget the stored trials, baselines and winner of each key tuned (and its Optuna study "
            "in --storage) and measure afresh.",
        ),
        click.option("--seed", type=click.IntRange(0, 2**32 - 1), default=0, show_default=True),
        click.option("--json", "as_json", is_flag=True, help="Print one JSON object with a results list."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
