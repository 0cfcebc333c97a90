"""Entry point of the ``sae-tune`` command: the main job on the group, the rest as subcommands."""

from __future__ import annotations

import click

from sae_tune import __version__
from sae_tune.cli.bench import bench_command
from sae_tune.cli.cache import cache_group
from sae_tune.cli.kernels import compile_check_command, show_kernel
from sae_tune.cli.selftest import selftest_command
from sae_tune.cli.specs import list_command
from sae_tune.cli.tune import run_tune, tune_options


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
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
