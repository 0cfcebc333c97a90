"""Whether Triton kernels can run here, decided without importing Triton at package import."""

from __future__ import annotations

import functools
import os

import torch

INSTALL_HINT = (
    'install it with `pip install "sae-tune[triton]"` (Linux), or use a CUDA build of torch, '
    "which brings its own Triton"
)


@functools.cache
def triton_import_error() -> str | None:
    """None when triton imports, otherwise why not (called lazily: importing sae_tune never imports it).

    Triton is an optional dependency: CPU-only installs leave it out, CUDA builds of torch bring it.
    """
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name == "triton":
            return f"triton is not installed: {INSTALL_HINT}"
        return (
            f"triton is installed but cannot be imported ({type(exc).__name__}: {exc}); "
            f"reinstall it: {INSTALL_HINT}"
        )
    return None


def triton_installed() -> bool:
    """True when triton imports."""
    return triton_import_error() is None


def interpreter_active() -> bool:
    """Triton's interpreter runs kernels on CPU tensors; it is chosen when Triton is first imported."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """None when Triton kernels can run on ``device``, otherwise why not (for errors and ``explain``)."""
    device = torch.device(device)
    if not triton_installed():
        return triton_import_error() or f"triton is not installed: {INSTALL_HINT}"
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
