"""Click options shared by commands: variant fields and dtypes, validated into typed values."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import click
import torch

from sae_tune.targets.triton.variant import ALLOCS, OVERFLOWS, Variant

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_VARIANT_DEFAULTS = Variant()


def variant_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one option per Variant field; the command receives ``variant``."""
    fields = [
        click.option(
            "--alloc", type=click.Choice(ALLOCS), default=_VARIANT_DEFAULTS.alloc, show_default=True
        ),
        click.option(
            "--overflow", type=click.Choice(OVERFLOWS), default=None, help="--alloc fixed only [fallback]"
        ),
        click.option("--max-l0", type=int, default=None, help="--alloc fixed only [128]"),
        click.option(
            "--chunk-slots",
            type=int,
            default=None,
            help=f"--alloc chunked only: slots per chunk of a token [{_VARIANT_DEFAULTS.chunk_slots}]",
        ),
        click.option(
            "--unit-chunks",
            type=int,
            default=None,
            help=f"--alloc chunked only: chunks per work unit [{_VARIANT_DEFAULTS.unit_chunks}]",
        ),
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
            field = re.match(r"Variant\.(\w+)", str(exc))
            hint = "'--" + field.group(1).replace("_", "-") + "'" if field else None
            raise click.BadParameter(str(exc), param_hint=hint) from exc
        return command(**kwargs)

    for option in reversed(fields):
        wrapper = option(wrapper)
    return wrapper


def dtype_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--dtype", type=click.Choice(list(DTYPES)), default="float32", show_default=True)(
        command
    )


def available_devices(*, indexed: bool = True) -> list[str]:
    """The devices this machine has: cpu, and cuda (with cuda:N per GPU when ``indexed``) if present."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names.append("cuda")
        if indexed:
            names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return names


class DeviceType(click.ParamType):
    """A device that exists here (checked when the option is parsed, so a typo is a usage error)."""

    name = "device"

    def __init__(self, *, indexed: bool = True) -> None:
        self.indexed = indexed

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[cpu|cuda" + ("|cuda:N]" if self.indexed else "]")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if isinstance(value, torch.device):
            value = str(value)
        text = str(value).strip().lower()
        choices = available_devices(indexed=self.indexed)
        if text in choices:
            return text
        if text == "cuda" or (self.indexed and re.fullmatch(r"cuda:\d+", text)):
            if not torch.cuda.is_available():
                self.fail(f"{value!r}: no CUDA device is available here; choose from: {', '.join(choices)}")
            self.fail(f"{value!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        self.fail(f"{value!r} is not a device here; choose from: {', '.join(choices)}")
