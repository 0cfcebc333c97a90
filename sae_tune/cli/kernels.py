"""Commands about the kernel family itself: print a generated kernel, compile the space for a GPU."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING

import click

from sae_tune.artefacts import UnsafeArtefactDir
from sae_tune.cli.options import dtype_option, torch_dtype, variant_options
from sae_tune.progress import progress_interval, track

if TYPE_CHECKING:
    import torch

    from sae_tune.targets.triton.variant import Variant

# the generated targets by name, as --target offers them: sae_tune.targets.GENERATED's names, spelled out
# so that loading the CLI does not load the targets (tests/test_cli_light.py checks that they agree)
GENERATED_NAMES = ["triton", "cpu"]


def _other_target(name: str, config_json: str | None, dtype: str) -> str:
    """The rendered source of a generated target other than Triton, from its default or a JSON config."""
    from sae_tune.targets import by_name

    target = by_name(name)
    if config_json is None:
        impl, config = target.default(65536, 2304, torch_dtype(dtype)) or (target.impls[0], {})
    else:
        impl = target.impls[0]
        try:
            config = json.loads(config_json)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="'--config'") from None
        if not isinstance(config, dict):
            raise click.BadParameter("must be a JSON object", param_hint="'--config'")
    try:
        config = target.parse(impl, config)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="'--config'") from None
    return target.render(impl, config, torch_dtype(dtype)) or ""


@click.command("show-kernel")
@variant_options
@click.option(
    "--target",
    type=click.Choice(GENERATED_NAMES),
    default="triton",
    show_default=True,
    help="Which generated target: Triton (the options above) or the C target (--config).",
)
@click.option(
    "--config",
    "config_json",
    show_default="the C target's default variant",
    help="--target cpu only: a JSON variant.",
)
@dtype_option
@click.option("--path", "show_path", is_flag=True, help="Print where the generated file is instead.")
def show_kernel(variant: Variant, target: str, config_json: str | None, dtype: str, show_path: bool) -> None:
    """Print the generated source of one variant (Triton, or C with --target cpu)."""
    try:
        _show(variant, target, config_json, dtype, show_path)
    except UnsafeArtefactDir as exc:
        raise click.ClickException(str(exc)) from exc


def _show(variant: Variant, target: str, config_json: str | None, dtype: str, show_path: bool) -> None:
    from sae_tune.targets.triton.render import render, write_module

    if target != "triton":
        if show_path:
            raise click.UsageError("--path is for the Triton target; C sources are built, not imported")
        click.echo(_other_target(target, config_json, dtype), nl=False)
        return
    if config_json is not None:
        raise click.UsageError("--config is for --target cpu; Triton variants take the options above")
    if show_path:
        try:
            click.echo(write_module(variant))
        except OSError as exc:
            raise click.ClickException(f"cannot write the generated kernel: {exc}") from exc
    else:
        click.echo(render(variant), nl=False)


def _build_all(name: str, F: int, D: int, dtype: str, as_json: bool) -> None:
    """Build every variant of a generated target's default space here; exit 1 if any fails."""
    import torch

    from sae_tune.targets import SpaceRequest, by_name

    target = by_name(name)
    device = torch.device("cpu")
    reason = target.available(device)
    if reason is not None:
        raise click.ClickException(f"the {name} target cannot build here: {reason}")
    request = SpaceRequest(F=F, D=D, dtype=torch_dtype(dtype), device=device, batch_bucket=1)
    results = []
    for impl, config in track(target.space(request), f"build {name}", unit="variant"):
        try:
            target.precompile(impl, config, torch_dtype(dtype))
            results.append({"variant": target.label(impl, config), "ok": True, "error": None})
        except Exception as exc:  # a compiler error is a result to report, not a crash
            results.append({"variant": target.label(impl, config), "ok": False, "error": str(exc)[:2000]})
    if as_json:
        click.echo(json.dumps(results, indent=1))
    else:
        for r in results:
            click.echo(f"{r['variant']:60s} {'ok' if r['ok'] else 'FAILED ' + r['error']}")
    failed = sum(not r["ok"] for r in results)
    click.echo(f"{name}: {len(results) - failed} of {len(results)} variants built ({dtype})", err=True)
    if failed:
        sys.exit(1)


@click.command("compile-check")
@click.option(
    "--arch",
    "archs",
    multiple=True,
    default=("sm_90",),
    show_default=True,
    help="Target architecture (sm_80, sm_86, sm_89, sm_90); repeat for several.",
)
@dtype_option
@click.option(
    "--width",
    "F",
    type=click.IntRange(1),
    default=65536,
    show_default=True,
    help="SAE width the default space is built for.",
)
@click.option("--d-model", "D", type=click.IntRange(1), default=2304, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of results.")
@click.option(
    "--target",
    type=click.Choice(GENERATED_NAMES),
    default="triton",
    show_default=True,
    help="triton: compile for the --arch GPUs; cpu: build every C variant with this machine's compiler.",
)
@click.option(
    "--op",
    type=click.Choice(("decode", "encode")),
    default="decode",
    show_default=True,
    help="triton: the decode family, or the encode (GEMM + threshold + compaction) space.",
)
def compile_check_command(
    archs: tuple[str, ...], dtype: str, F: int, D: int, as_json: bool, target: str, op: str
) -> None:
    """Compile every variant of the default space ahead of time (for real GPUs, or this CPU).

    Exit code 1 when any variant fails to compile, spills registers or (encode) needs more shared memory
    than the architecture gives a block.
    """
    progress_interval()  # a bad SAE_TUNE_PROGRESS_INTERVAL is refused before any work
    if target != "triton":
        if op != "decode":
            raise click.UsageError("--op encode compiles the Triton encode; the C encode builds on first use")
        _build_all(target, F, D, dtype, as_json)
        return

    from sae_tune.targets.triton.compile_check import ARCHS, compile_check, summary
    from sae_tune.targets.triton.support import interpreter_active, triton_import_error, triton_installed

    bad = [a for a in archs if a not in ARCHS]
    if bad:
        raise click.BadParameter(
            f"unknown {', '.join(bad)}; choose from {', '.join(ARCHS)}", param_hint="'--arch'"
        )
    if op == "encode":
        _compile_encode(archs, torch_dtype(dtype), F, D, as_json)
        return
    from sae_tune.targets.triton.variant import Variant

    space = Variant.search_space(F, D, torch_dtype(dtype))
    if not space:
        raise click.UsageError(f"--width {F} --d-model {D}: the default space has no variant for this shape")
    if not triton_installed():
        raise click.ClickException(f"compile-check needs Triton: {triton_import_error()}")
    if interpreter_active():
        raise click.ClickException("compile-check needs real Triton kernels: unset TRITON_INTERPRET")
    tty = sys.stderr.isatty()
    started = time.perf_counter()
    results = []
    for arch in archs:

        def bar(items, arch=arch):
            return track(items, f"compile {arch}", unit="variant")

        if not tty:  # off a terminal: a line per architecture, then progress lines (sae_tune.progress)
            click.echo(
                f"[{time.perf_counter() - started:6.1f} s] compile {arch}: {len(space)} variants", err=True
            )
        results += compile_check(space, arch, torch_dtype(dtype), progress=bar, F=F, D=D)
    if not tty:
        click.echo(f"[{time.perf_counter() - started:6.1f} s] compile-check done", err=True)
    if as_json:
        click.echo(json.dumps([r.to_json() for r in results], indent=1))
    else:
        for r in results:
            usage = f"regs {r.registers:4d}  spills {r.spills:5d}  shared {r.shared:6d}" if r.ok else r.error
            click.echo(f"{r.arch:6s} {r.variant:52s} {r.status:6s} {usage}")
        for arch in archs:
            click.echo(summary([r for r in results if r.arch == arch], arch), err=True)
    if not all(r.passed for r in results):
        sys.exit(1)


def _compile_encode(archs: tuple[str, ...], dtype: torch.dtype, F: int, D: int, as_json: bool) -> None:
    """Compile every Triton encode variant for each architecture; exit 1 on a failure, a spill or a
    kernel that needs more shared memory than the architecture gives a block."""
    from sae_tune.targets.triton.compile_check import summary
    from sae_tune.targets.triton.encode import all_variants
    from sae_tune.targets.triton.encode_compile import compile_encode

    started = time.perf_counter()
    results = []
    for arch in archs:
        variants = all_variants(dtype)
        click.echo(
            f"[{time.perf_counter() - started:6.1f} s] compile {arch}: {len(variants)} encode variants",
            err=True,
        )
        bar = track(variants, f"compile {arch} encode", unit="variant")
        results += [compile_encode(v, arch, dtype, F, D) for v in bar]
    if as_json:
        click.echo(json.dumps([r.to_json() for r in results], indent=1))
    else:
        for r in results:
            if r.ok:
                mma = "/".join(sorted({str(k.sass.get("mma_kind") or "FFMA") for k in r.kernels}))
                usage = f"regs {r.registers:4d}  spills {r.spills:5d}  shared {r.shared:6d}  {mma}"
            else:
                usage = r.error
            click.echo(f"{r.arch:6s} {r.variant:40s} {r.status:6s} {usage}")
    for arch in archs:
        click.echo(
            summary([r for r in results if r.arch == arch], arch, "encode variants compiled, fit, no spills"),
            err=True,
        )
    if not all(r.passed for r in results):
        sys.exit(1)
