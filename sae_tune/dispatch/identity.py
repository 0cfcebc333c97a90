"""Which tuned entries apply here: the device's name and the software versions, found without importing
Triton (dispatch runs in processes that never use Triton, e.g. on CPU)."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from importlib import metadata

import torch

from sae_tune import cpu_identity
from sae_tune.device import gpu_key_name


@dataclass(frozen=True)
class Identity:
    """The fields of a ``CacheKey`` that describe where a decode runs (as the tuner writes them)."""

    device_name: str
    capability: str | None
    torch_version: str
    triton_version: str | None


def installed_triton_version() -> str | None:
    """``triton.__version__`` if triton is imported, else the installed distribution's version, else None."""
    module = sys.modules.get("triton")
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def device_identity(device: torch.device) -> Identity:
    """Identity of a CPU or CUDA device; ValueError for other device types."""
    if device.type == "cpu":
        name, capability = cpu_identity.cpu_key_name(), None
    elif device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        name, capability = gpu_key_name(torch.cuda.get_device_name(index)), f"{major}.{minor}"
    else:
        raise ValueError(f"no tuned configs for device type {device.type!r}")
    return Identity(name, capability, str(torch.__version__), installed_triton_version())
