"""Entry point of the ``sae-tune`` command."""

from __future__ import annotations

import click

from sae_tune import __version__
from sae_tune.cli.kernels import compile_check_command, show_kernel


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sae-tune")
def main() -> None:
    """sae-tune: autotuned sparse decoding for sparse autoencoders."""


main.add_command(show_kernel)
main.add_command(compile_check_command)


if __name__ == "__main__":
    main()
