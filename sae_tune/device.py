"""What device a measurement was taken on.

Timings are only meaningful for the device, torch and Triton versions they were measured with, so every
cache key starts from a ``DeviceInfo``. The CUDA path is deliberately thin (two torch calls): no machine
that builds this project has a GPU, and anything more would be untested code.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_tune import cpu_identity
from sae_tune.cpu_identity import bounded_name, describe_cpu, printable

DEVICE_KINDS = ("cpu", "cuda")


@dataclass(frozen=True)
class DeviceInfo:
    """Identity of one compute device and the software stack that drives it.

    kind            "cpu" or "cuda".
    name            GPU name (``torch.cuda.get_device_name``) or the CPU model.
    capability      compute capability like "9.0" on CUDA; None on CPU (the CPU model is ``name``).
    torch_version   ``torch.__version__``.
    triton_version  ``triton.__version__``, or None when triton cannot be imported.
    """

    kind: str
    name: str
    capability: str | None
    torch_version: str
    triton_version: str | None


def cpu_model_name(cpuinfo: Path | None = None) -> str:
    """The CPU model, readable and bounded (``cpu_identity``): two machines with the same architecture but
    different CPU models time differently, so the model (not just "x86_64") names a CPU."""
    return (cpu_identity.this_cpu() if cpuinfo is None else describe_cpu(cpuinfo)).readable


def cpu_key_name(cpuinfo: Path | None = None) -> str:
    """How a CPU is named in cache keys and built objects' keys: its bounded model name and a digest of its
    generation and vector extensions, e.g. "AMD EPYC [x86_64 3f0c9a1b2d4e]"."""
    return (cpu_identity.this_cpu() if cpuinfo is None else describe_cpu(cpuinfo)).key_name


GPU_NAME_MAX = 96


def gpu_key_name(raw: str) -> str:
    """A GPU's name as cache keys hold it: printable, whitespace-normalised, bounded (a digest of the
    whole name replaces what does not fit)."""
    return bounded_name(" ".join(printable(raw).split()) or "unknown gpu", GPU_NAME_MAX)


def triton_version() -> str | None:
    """The importable triton's version, or None. Imported lazily: triton is optional and slow to import."""
    module = sys.modules.get("triton")
    if module is None:
        try:
            import triton as module
        except ImportError:
            return None
    version = getattr(module, "__version__", None)
    return str(version) if version else None


def _normalize(device: torch.device | str) -> tuple[str, int | None]:
    dev = torch.device(device)
    if dev.type not in DEVICE_KINDS:
        raise ValueError(f"unsupported device type {dev.type!r}; sae-tune knows {list(DEVICE_KINDS)}")
    if dev.type == "cpu":
        return "cpu", None
    return "cuda", dev.index if dev.index is not None else torch.cuda.current_device()


@functools.cache
def _describe(kind: str, index: int | None) -> DeviceInfo:
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability(index)
        name = gpu_key_name(torch.cuda.get_device_name(index))
        capability: str | None = f"{major}.{minor}"
    else:
        name, capability = cpu_key_name(), None
    return DeviceInfo(
        kind=kind,
        name=name,
        capability=capability,
        torch_version=str(torch.__version__),
        triton_version=triton_version(),
    )


def describe_device(device: torch.device | str) -> DeviceInfo:
    """Describe ``device`` (e.g. "cpu", "cuda", "cuda:1", a ``torch.device``); cached per device.

    "cuda" without an index means the current CUDA device, as torch does.
    """
    return _describe(*_normalize(device))


def clear_device_cache() -> None:
    """Forget cached descriptions (tests, or after the visible CUDA devices changed)."""
    _describe.cache_clear()


_SLUG = re.compile(r"[^A-Za-z0-9]+")


SLUG_MAX = 100


def device_slug(name: str) -> str:
    """A file-name-safe, bounded form of a device name ("NVIDIA GeForce RTX 4090" ->
    "NVIDIA_GeForce_RTX_4090"); a long name keeps a digest of the whole so that names stay distinct."""
    slug = _SLUG.sub("_", name).strip("_") or "unknown"
    return _SLUG.sub("_", bounded_name(slug, SLUG_MAX))
