"""Click options shared by commands: variant fields and dtypes, validated into typed values.

Building these options imports nothing heavy (no torch, no kernel targets), so that ``--help`` and the
commands that need no tensor start fast; the values are typed (``Variant``, ``torch.dtype``) when a
command runs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "float16", "bfloat16")

# Variant's choices and defaults as the options show them. sae_tune.targets.triton.variant holds the truth
# (importing it imports torch and every target); tests/test_cli_light.py checks that these equal it.
ALLOCS = ("chunked", "exact", "fixed")
OVERFLOWS = ("validate", "fallback", "unchecked")
_VARIANT_DEFAULTS = SimpleNamespace(
    alloc="chunked",
    overflow="fallback",
    max_l0=128,
    block_f=1024,
    block_d=256,
    block_l=8,
    num_warps=2,
    num_warps_build=4,
    num_stages=2,
    chunk_slots=8,
    unit_chunks=8,
)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a --dtype value (one of ``DTYPE_NAMES``)."""
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def __getattr__(name: str) -> Any:
    if name == "DTYPES":  # the name -> torch.dtype table, built on first use (it imports torch)
        return {n: torch_dtype(n) for n in DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def variant_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add one option per Variant field; the command receives ``variant``."""
    fields = [
        click.option(
            "--alloc", type=click.Choice(ALLOCS), default=_VARIANT_DEFAULTS.alloc, show_default=True
        ),
        click.option(
            "--overflow",
            type=click.Choice(OVERFLOWS),
            default=_VARIANT_DEFAULTS.overflow,
            show_default=True,
            help="--alloc fixed only.",
        ),
        click.option(
            "--max-l0",
            type=int,
            default=_VARIANT_DEFAULTS.max_l0,
            show_default=True,
            help="--alloc fixed only.",
        ),
        click.option(
            "--chunk-slots",
            type=int,
            default=_VARIANT_DEFAULTS.chunk_slots,
            show_default=True,
            help="--alloc chunked only: slots per chunk of a token.",
        ),
        click.option(
            "--unit-chunks",
            type=int,
            default=_VARIANT_DEFAULTS.unit_chunks,
            show_default=True,
            help="--alloc chunked only: chunks per work unit.",
        ),
    ]
    for name in ("block_f", "block_d", "block_l", "num_warps", "num_warps_build", "num_stages"):
        flag = "--" + name.replace("_", "-")
        fields.append(
            click.option(flag, type=int, default=getattr(_VARIANT_DEFAULTS, name), show_default=True)
        )

    @functools.wraps(command)
    def wrapper(**kwargs: Any) -> Any:
        from sae_tune.targets.triton.variant import Variant

        names = [f for f in Variant.__dataclass_fields__ if f in kwargs]
        # an option left at its default passes the Variant's own default, which every alloc accepts
        values = {f: kwargs.pop(f) for f in names}
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
    return click.option("--dtype", type=click.Choice(DTYPE_NAMES), default="float32", show_default=True)(
        command
    )


def available_devices(*, indexed: bool = True) -> list[str]:
    """The devices this machine has: cpu, and cuda (with cuda:N per GPU when ``indexed``) if present."""
    import torch

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
        import torch

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
