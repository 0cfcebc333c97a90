"""What device a measurement was taken on.

Timings are only meaningful for the device, torch and Triton versions they were measured with, so every
cache key starts from a ``DeviceInfo``. The CUDA path is deliberately thin (two torch calls): no machine
that builds this project has a GPU, and anything more would be untested code.
"""

from __future__ import annotations

import functools
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

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


def cpu_model_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU model: /proc/cpuinfo "model name", else ``platform.processor()``, else the machine type.

    Two machines with the same architecture but different CPU models time differently, so the model (not
    just "x86_64") names a CPU in the cache.
    """
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        field, sep, value = line.partition(":")
        if sep and field.strip() == "model name" and value.strip():
            return " ".join(value.split())
    for candidate in (platform.processor(), platform.machine()):
        if candidate and candidate.strip():
            return " ".join(candidate.split())
    return "unknown cpu"


# Instruction-set extensions that change how generated CPU code runs (vector width, fp16/bf16 support).
ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_bf16", "asimd", "fphp", "sve", "sve2",
)  # fmt: skip


def cpu_isa(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's generation and vector extensions, e.g. "family 26 model 2: avx2 avx512f fma": one model
    name ("AMD EPYC") covers several generations that time generated kernels differently."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        field, sep, value = line.partition(":")
        if sep:
            fields.setdefault(field.strip(), value.strip())
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    have = [f for f in ISA_FLAGS if f in flags]
    family, model = fields.get("cpu family"), fields.get("model")
    known = family and model and model.isdigit()
    generation = f"family {family} model {model}" if known else platform.machine()
    return f"{generation}: {' '.join(have) or 'no vector extensions listed'}"


def cpu_key_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """How a CPU is named in cache keys: its model and its generation and ISA, e.g.
    "AMD EPYC [family 26 model 2: avx2 avx512f fma]"."""
    return f"{cpu_model_name(cpuinfo)} [{cpu_isa(cpuinfo)}]"


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
        name = " ".join(torch.cuda.get_device_name(index).split())
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


def device_slug(name: str) -> str:
    """A file-name-safe form of a device name ("NVIDIA GeForce RTX 4090" -> "NVIDIA_GeForce_RTX_4090")."""
    slug = _SLUG.sub("_", name).strip("_")
    return slug or "unknown"
