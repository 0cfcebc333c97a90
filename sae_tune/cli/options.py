"""Click options shared by commands: variant fields and dtypes, validated into typed values."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click
import torch

from sae_tune.variants import ALLOCS, OVERFLOWS, Variant

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_VARIANT_DEFAULTS = Variant()


def variant_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one option per Variant field; the command receives ``variant``."""
    fields = [
        click.option(
            "--alloc", type=click.Choice(ALLOCS), default=_VARIANT_DEFAULTS.alloc, show_default=True
        ),
        click.option("--overflow", type=click.Choice(OVERFLOWS), default=None, help="fixed only [fallback]"),
        click.option("--max-l0", type=int, default=None, help="fixed only [128]"),
    ]
    for name in ("block_f", "block_d", "block_l", "num_warps", "num_warps_build", "num_stages"):
        flag = "--" + name.replace("_", "-")
        fields.append(
            click.option(flag, type=int, default=getattr(_VARIANT_DEFAULTS, name), show_default=True)
        )

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        names = [f for f in Variant.__dataclass_fields__ if f in kwargs]
        values = {f: kwargs.pop(f) for f in names}
        values = {k: v for k, v in values.items() if v is not None}
        try:
            kwargs["variant"] = Variant(**values)
        except (TypeError, ValueError) as exc:
            raise click.UsageError(str(exc)) from exc
        return command(**kwargs)

    for option in reversed(fields):
        wrapper = option(wrapper)
    return wrapper


def dtype_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True)(
        command
    )
