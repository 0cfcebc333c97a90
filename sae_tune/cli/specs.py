"""``sae-tune list``: the registry of SAE shapes."""

from __future__ import annotations

import click


@click.command("list")
def list_command() -> None:
    """Print the SAE presets: name, width, d_model, L0, architecture, SAELens release and id."""
    from tabulate import tabulate

    from sae_tune.specs import list_specs

    rows = [
        (s.name, s.width, s.d_model, s.l0, s.arch, s.release or "-", s.sae_id or "-") for s in list_specs()
    ]
    click.echo(
        tabulate(rows, headers=("name", "F", "D", "L0", "arch", "release", "sae_id"), tablefmt="github")
    )
