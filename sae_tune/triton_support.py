"""Whether Triton kernels can run here, decided without importing Triton at package import."""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_installed() -> bool:
    """True when triton imports (called lazily: importing sae_tune never imports triton)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreter_active() -> bool:
    """Triton's interpreter runs kernels on CPU tensors; it is chosen when Triton is first imported."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """None when Triton kernels can run on ``device``, otherwise why not (for errors and ``explain``)."""
    device = torch.device(device)
    if not triton_installed():
        return "triton is not installed (it is available on Linux: pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and interpreter_active():
        return None
    return (
        f"Triton kernels need a CUDA device; tensors are on {device.type!r} "
        "(set TRITON_INTERPRET=1 before importing triton to run them in the interpreter, for testing)"
    )


def triton_available(device: torch.device | str = "cuda") -> bool:
    """True when a generated kernel can run on ``device`` in this process."""
    return triton_unavailable_reason(device) is None
