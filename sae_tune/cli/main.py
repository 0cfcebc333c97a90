"""Entry point of the ``sae-tune`` command: the main job on the group, the rest as subcommands.

Loading the command line imports nothing heavy (no torch, numpy, pandas, Triton or Optuna): each command
imports what it needs when it runs, so ``sae-tune --help``, ``sae-tune list`` and every ``--help`` start
in a fraction of a second (tests/test_cli_light.py).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from sae_tune import __version__
from sae_tune.cli.bench import bench_command
from sae_tune.cli.cache import cache_group
from sae_tune.cli.kernels import compile_check_command, show_kernel
from sae_tune.cli.selftest import selftest_command
from sae_tune.cli.specs import list_command
from sae_tune.cli.tune import run_tune, tune_options

# Errors whose message is meant for the user (a value that cannot be used, a cache that cannot be used),
# by module and class name, so that catching them imports nothing. A command turns the ones it expects
# into usage errors naming the option; any other reaches the user as "Error: <message>", never as a
# traceback: exit status 2 where the command cannot run as given (a cache this user may not write, as
# `sae-tune cache` says), else 1.
USER_ERRORS = {
    "sae_tune.cache.store": ("CacheError", "FieldError"),
    "sae_tune.cache.share": ("ConfigFileError", "NoSuchDevice"),
    "sae_tune.specs": ("SpecError",),
    "sae_tune.autotune.search": ("TuneError", "WorkloadTooLarge"),
    "sae_tune.autotune.workload": ("WorkloadError",),
    "sae_tune.targets.base": ("ConfigFieldError",),
    "sae_tune.artefacts": ("UnsafeArtefactDir",),
    "sae_tune.progress": ("ProgressSettingError",),
}
_CANNOT_RUN = {("sae_tune.cache.store", "CacheReadOnlyError")}


def user_error(exc: BaseException) -> click.ClickException | None:
    """The one-line error to show for ``exc`` when it is one of ``USER_ERRORS``, else None."""
    for module_name, names in USER_ERRORS.items():
        module = sys.modules.get(module_name)  # not imported: ``exc`` cannot be one of its errors
        if module is None or not isinstance(exc, tuple(getattr(module, n) for n in names)):
            continue
        message = " ".join(str(exc).split("\n")) or type(exc).__name__
        error = click.ClickException(message)
        if any(isinstance(exc, getattr(sys.modules[m], n)) for m, n in _CANNOT_RUN if m in sys.modules):
            error.exit_code = 2
        return error
    return None


class MainGroup(click.Group):
    """The ``sae-tune`` group: a user's mistake that no command caught is one line, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            error = user_error(exc)
            if error is None:
                raise
            raise error from exc


@click.group(
    cls=MainGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]}
)
@click.version_option(__version__, prog_name="sae-tune")
@tune_options
@click.pass_context
def main(ctx: click.Context, **options) -> None:
    """sae-tune: autotuned sparse decoding for sparse autoencoders.

    With --sae (or --width/--d-model/--l0) it tunes that SAE shape on the local device, stores every
    measurement in the cache and prints the winners: `sae-tune --sae gemma-2b-l20`.
    """
    flags = {p.name: p.opts[0] for p in ctx.command.params}
    given = [
        flags[name]
        for name in options
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
    ]
    if ctx.invoked_subcommand is not None:
        if given:  # options of the main job would be ignored by a subcommand: refuse them
            raise click.UsageError(
                f"option(s) of the main job (sae-tune --sae ...) given to `sae-tune "
                f"{ctx.invoked_subcommand}`, which does not use them: {', '.join(given)}; "
                "put a subcommand's options after its name"
            )
        return
    if not given:
        click.echo(ctx.get_help())
        return
    run_tune(**options)


main.add_command(list_command)
main.add_command(cache_group)
main.add_command(show_kernel)
main.add_command(compile_check_command)
main.add_command(bench_command)
main.add_command(selftest_command)


if __name__ == "__main__":
    main()
