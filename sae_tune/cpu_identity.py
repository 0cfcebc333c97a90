"""Who a CPU is, for cache keys and built objects: a bounded, readable name plus a stable digest.

A CPU is named in every cache key, study name and built object's key. Its description comes from the
operating system (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS, ``platform`` elsewhere) and can be
anything: a 200-character unicode model name, an aarch64 machine with no model name at all, a VM that
lists nothing. So the key name is

    "<readable model name, whitespace-normalised, at most 64 characters> [<arch> <12-hex digest>]"

where the digest covers what times generated kernels differently: the architecture, the vendor, the
generation (x86 family / model / stepping, ARM implementer / part / variant) and the full set of vector
extensions that change generated code. Two CPUs that differ in any of those get different keys; one CPU
always gets the same key, whatever order its flags are listed in. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
import sys
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

READABLE_MAX = 64  # characters of the model name kept in a key name
DIGEST_HEX = 12  # 48 bits: collisions between distinct CPUs of one cache are out of reach
KEY_NAME_MAX = READABLE_MAX + 40  # the readable part, " [", the architecture, " ", the digest, "]"

# Vector and matrix extensions that change what a generated kernel compiles to or how fast it runs,
# named as Linux lists them (x86 "flags", aarch64 "Features"). The digest uses every one a CPU has.
X86_EXTENSIONS = (
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2",
    "avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl", "avx512ifma", "avx512vbmi", "avx512_vbmi2",
    "avx512_vnni", "avx512_bitalg", "avx512_vpopcntdq", "avx512_bf16", "avx512_fp16", "avx_vnni",
    "avx_vnni_int8", "avx_ifma", "avx10", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
)  # fmt: skip
ARM_EXTENSIONS = (
    "asimd", "fphp", "asimdhp", "asimddp", "asimdfhm", "bf16", "i8mm", "sve", "sve2", "svebf16",
    "svei8mm", "sme", "sme2",
)  # fmt: skip
EXTENSIONS = X86_EXTENSIONS + ARM_EXTENSIONS

# macOS: hw.optional.* keys -> the Linux name of the same extension.
_SYSCTL_EXTENSIONS = {
    "hw.optional.sse4_1": "sse4_1",
    "hw.optional.sse4_2": "sse4_2",
    "hw.optional.avx1_0": "avx",
    "hw.optional.avx2_0": "avx2",
    "hw.optional.fma": "fma",
    "hw.optional.f16c": "f16c",
    "hw.optional.bmi2": "bmi2",
    "hw.optional.avx512f": "avx512f",
    "hw.optional.avx512dq": "avx512dq",
    "hw.optional.avx512cd": "avx512cd",
    "hw.optional.avx512bw": "avx512bw",
    "hw.optional.avx512vl": "avx512vl",
    "hw.optional.avx512ifma": "avx512ifma",
    "hw.optional.avx512vbmi": "avx512vbmi",
    "hw.optional.neon": "asimd",
    "hw.optional.AdvSIMD": "asimd",
    "hw.optional.neon_fp16": "asimdhp",
    "hw.optional.arm.FEAT_FP16": "asimdhp",
    "hw.optional.arm.FEAT_DotProd": "asimddp",
    "hw.optional.arm.FEAT_FHM": "asimdfhm",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_SME": "sme",
    "hw.optional.arm.FEAT_SME2": "sme2",
}
SYSCTL_KEYS = (
    "machdep.cpu.brand_string",
    "machdep.cpu.vendor",
    "machdep.cpu.family",
    "machdep.cpu.model",
    "machdep.cpu.stepping",
    "hw.cpufamily",
    "hw.cpusubfamily",
    *_SYSCTL_EXTENSIONS,
)

# ARM CPU implementer / part codes of the server cores users run on (Linux lists no model name there).
_ARM_PARTS = {
    ("0x41", "0xd0c"): "ARM Neoverse-N1",  # AWS Graviton2, Ampere Altra
    ("0x41", "0xd40"): "ARM Neoverse-V1",  # AWS Graviton3
    ("0x41", "0xd49"): "ARM Neoverse-N2",
    ("0x41", "0xd4f"): "ARM Neoverse-V2",  # AWS Graviton4, NVIDIA Grace
    ("0x41", "0xd8e"): "ARM Neoverse-N3",
    ("0x41", "0xd84"): "ARM Neoverse-V3",
    ("0x41", "0xd08"): "ARM Cortex-A72",
    ("0x41", "0xd0b"): "ARM Cortex-A76",
    ("0xc0", "0xac3"): "Ampere-1",
    ("0xc0", "0xac4"): "Ampere-1a",
}
_ARM_IMPLEMENTERS = {"0x41": "ARM", "0x42": "Broadcom", "0x43": "Cavium", "0x46": "Fujitsu",
                     "0x48": "HiSilicon", "0x4e": "NVIDIA", "0x51": "Qualcomm", "0x61": "Apple",
                     "0xc0": "Ampere"}  # fmt: skip


@dataclass(frozen=True)
class CpuDescription:
    """What the operating system says about a CPU, reduced to what names it in a cache key.

    model       the readable model name (may be long, unicode or empty).
    arch        the machine architecture ("x86_64", "aarch64", "arm64", ...).
    vendor      "GenuineIntel", "AuthenticAMD", an ARM implementer code, or "".
    generation  "family 6 model 143 stepping 8", "implementer 0x41 part 0xd0c variant 0x3", or "".
    extensions  the relevant vector extensions it has (a subset of ``EXTENSIONS``).
    """

    model: str
    arch: str
    vendor: str
    generation: str
    extensions: frozenset[str]

    @property
    def digest(self) -> str:
        """A stable digest of everything that times generated kernels differently, and of the whole model
        name (so two models whose names agree in their first ``READABLE_MAX`` characters stay apart)."""
        blob = "\n".join(
            [self.arch, self.vendor, self.generation, " ".join(sorted(self.extensions)), self.model]
        )
        return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_HEX]

    @property
    def readable(self) -> str:
        return readable_part(self.model or self.arch or "unknown cpu")

    @property
    def key_name(self) -> str:
        """The bounded name a CPU has in cache keys, e.g. "AMD EPYC [x86_64 3f0c9a1b2d4e]"."""
        return f"{self.readable} [{printable(self.arch)[:16] or 'cpu'} {self.digest}]"


def readable_part(text: str, limit: int = READABLE_MAX) -> str:
    """``text`` as printable, whitespace-normalised text of at most ``limit`` characters (never empty)."""
    cleaned = " ".join(printable(text).split())
    if len(cleaned) > limit:
        cleaned = cleaned[: limit - 1].rstrip() + "…"
    return cleaned or "unknown cpu"


def printable(text: str) -> str:
    """Printable characters only (a control or format character becomes a space), NFC-normalised."""
    text = unicodedata.normalize("NFC", str(text))
    return "".join(c if c.isprintable() else " " for c in text).replace("[", "(").replace("]", ")")


def bounded_name(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` characters, else a readable prefix plus a digest of the whole,
    so that distinct long names stay distinct (study names, file names)."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:DIGEST_HEX]
    return f"{text[: limit - DIGEST_HEX - 1]}~{digest}"


# --- reading a description -------------------------------------------------------------------------


def _first_block_fields(text: str) -> dict[str, str]:
    """The first value of each field in /proc/cpuinfo (every processor repeats the same CPU)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        field, sep, value = line.partition(":")
        if sep:
            fields.setdefault(field.strip(), value.strip())
    return fields


def parse_cpuinfo(text: str, machine: str) -> CpuDescription:
    """A description from the text of Linux's /proc/cpuinfo (x86 or aarch64) on a ``machine``."""
    fields = _first_block_fields(text)
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    extensions = frozenset(e for e in EXTENSIONS if e in flags)
    model = fields.get("model name") or fields.get("Processor") or fields.get("cpu model") or ""
    if "CPU implementer" in fields:
        implementer = fields.get("CPU implementer", "").lower()
        part = fields.get("CPU part", "").lower()
        variant = fields.get("CPU variant", "").lower()
        generation = f"implementer {implementer} part {part} variant {variant}"
        vendor = implementer
        if not model:
            model = _ARM_PARTS.get((implementer, part)) or (
                f"{_ARM_IMPLEMENTERS.get(implementer, 'ARM')} part {part or '?'}"
            )
    else:
        vendor = fields.get("vendor_id", "")
        parts = [(name, fields.get(field, "")) for name, field in
                 (("family", "cpu family"), ("model", "model"), ("stepping", "stepping"))]  # fmt: skip
        generation = " ".join(f"{name} {value}" for name, value in parts if value)
    return CpuDescription(model, machine, vendor, generation, extensions)


def parse_sysctl(values: Mapping[str, str], machine: str) -> CpuDescription:
    """A description from macOS's ``sysctl`` values (``SYSCTL_KEYS``; missing keys are fine)."""
    extensions = frozenset(
        name for key, name in _SYSCTL_EXTENSIONS.items() if values.get(key, "").strip() not in ("", "0")
    )
    generation = " ".join(
        f"{key.rsplit('.', 1)[-1]} {values[key].strip()}"
        for key in (
            "machdep.cpu.family",
            "machdep.cpu.model",
            "machdep.cpu.stepping",
            "hw.cpufamily",
            "hw.cpusubfamily",
        )  # fmt: skip
        if values.get(key, "").strip()
    )
    model = values.get("machdep.cpu.brand_string", "").strip()
    return CpuDescription(
        model, machine, values.get("machdep.cpu.vendor", "").strip(), generation, extensions
    )


Runner = Callable[[list[str]], str]


def _run_sysctl(args: list[str]) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
    return done.stdout


def read_sysctl(run: Runner = _run_sysctl) -> dict[str, str]:
    """The ``SYSCTL_KEYS`` macOS knows, read with one ``sysctl`` call per key (an unknown key is absent,
    not an error: Intel and Apple silicon Macs know different keys)."""
    values = {}
    for key in SYSCTL_KEYS:
        try:
            out = run(["sysctl", "-n", key])
        except (OSError, subprocess.SubprocessError):
            continue
        if out and out.strip():
            values[key] = out.strip()
    return values


def describe_cpu(
    cpuinfo: Path = Path("/proc/cpuinfo"),
    system: str | None = None,
    machine: str | None = None,
    sysctl: Runner = _run_sysctl,
) -> CpuDescription:
    """This machine's CPU: /proc/cpuinfo on Linux, sysctl on macOS, ``platform`` otherwise."""
    system = system if system is not None else platform.system()
    machine = machine if machine is not None else (platform.machine() or "unknown")
    if system == "Darwin":
        return parse_sysctl(read_sysctl(sysctl), machine)
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    desc = parse_cpuinfo(text, machine)
    if not desc.model and platform.processor().strip():
        desc = CpuDescription(platform.processor(), machine, desc.vendor, desc.generation, desc.extensions)
    return desc


@functools.cache
def this_cpu() -> CpuDescription:
    """This machine's CPU, read once per process."""
    return describe_cpu()


def cpu_key_name() -> str:
    """This machine's CPU as cache keys and built objects name it."""
    return this_cpu().key_name


# --- names written by sae-tune 0.1.0 before bounded names (read for migration only) -----------------

_LEGACY_ISA_FLAGS = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_bf16", "asimd", "fphp", "sve", "sve2",
)  # fmt: skip


def legacy_key_name(cpuinfo_text: str, machine: str, processor: str = "") -> str:
    """The key name the previous release gave this CPU ("MODEL [family F model M: ext ...]"), so that a
    cache written then is found and migrated, never orphaned."""
    fields = _first_block_fields(cpuinfo_text)
    model = " ".join(fields.get("model name", "").split())
    if not model:
        model = next((" ".join(c.split()) for c in (processor, machine) if c and c.strip()), "unknown cpu")
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    have = [f for f in _LEGACY_ISA_FLAGS if f in flags]
    family, number = fields.get("cpu family"), fields.get("model")
    generation = f"family {family} model {number}" if family and number and number.isdigit() else machine
    return f"{model} [{generation}: {' '.join(have) or 'no vector extensions listed'}]"


@functools.cache
def legacy_names() -> frozenset[str]:
    """This machine's CPU key names as earlier releases wrote them (empty where none can be derived)."""
    if sys.platform == "darwin":
        return frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    name = legacy_key_name(text, platform.machine(), platform.processor())
    return frozenset({name}) if name != cpu_key_name() else frozenset()


def current_device_name(name: str) -> str:
    """``name`` as this release names the same device: a legacy key name of this machine's CPU becomes
    its current key name; every other name is returned unchanged."""
    return cpu_key_name() if name in legacy_names() else name


def model_of(key_name: str) -> str:
    """The model part of a device key name ("AMD EPYC [x86_64 3f0c...]" -> "AMD EPYC"; a GPU name is
    returned whole)."""
    return key_name.split(" [", 1)[0]
