"""The CPU target: C + OpenMP kernels rendered from Jinja, built by the system C compiler, called by ctypes.

The face the tuner, dispatcher and CLI use (the "target contract"): ``NAME``, ``available``,
``CpuVariant``, ``search_space``, ``default_variant``, ``render``, ``build``, ``run``, ``CpuBuildError``.
"""

from __future__ import annotations

import torch

from sae_tune.targets.cpu.build import CpuBuildError, CpuKernel, compiler
from sae_tune.targets.cpu.launch import build, kernel_dtypes, run
from sae_tune.targets.cpu.render import CpuDtypes, render
from sae_tune.targets.cpu.variant import CpuVariant, default_variant, search_space

NAME = "cpu"


def available(device: torch.device | str) -> str | None:
    """None when CPU kernels can run on ``device``, else a sentence saying why not."""
    device = torch.device(device)
    if device.type != "cpu":
        return f"the C kernels run on CPU tensors, not on {device}"
    cc = compiler()
    return cc if isinstance(cc, str) else None


__all__ = [
    "NAME",
    "CpuBuildError",
    "CpuDtypes",
    "CpuKernel",
    "CpuVariant",
    "available",
    "build",
    "default_variant",
    "kernel_dtypes",
    "render",
    "run",
    "search_space",
]
