"""What ahead-of-time compilation found per Triton version: the record that prunes the Triton spaces.

Register allocation is Triton's and ptxas's, and both change between releases: the same encode variant
that compiles without spills with one Triton spills with another. ``enc-m16-n128-k64-g8-s16-st4-w4``
compiles without spills on sm_90 in bf16 with Triton 3.6.0, 3.8.0 and 3.9.0 and spills 8 bytes with
3.7.1 (the Triton of torch 2.13's CUDA wheels); ``enc-m128-n64-k64-g8-s16-st3-w8`` spills in fp16 on
sm_80 and sm_89 with 3.6.0 only; eight decode variants spill 8-16 bytes in fp32 with 3.7.1 on sm_80 or
sm_90 and none with 3.9.0. So no space is claimed spill-free once for all versions: this module records,
per (Triton version, architecture, dtype), the variants that ``sae-tune compile-check [--op encode]``
found spilling, and the tuner's spaces (``encode.encode_space``, ``TritonTarget.space``) leave those out
on a GPU of that architecture with that Triton. A version, architecture or dtype not measured gets the
union of the record for the dtype (what spilled with any measured Triton), the cautious choice: a spill
is a slower kernel, never a wrong one.

To extend the record for a new Triton: ``sae-tune compile-check [--op encode] --arch sm_80 --arch sm_89
--arch sm_90 --dtype D --json`` for each dtype with that Triton installed (rows with ``spills`` > 0 are
what to add), then add the version to ``MEASURED`` (encode) or ``DECODE_MEASURED``.
"""

from __future__ import annotations

import re

import torch

# Triton versions whose whole encode space was compiled for every architecture and dtype below. Older
# Tritons (<= 3.5) lack the launch specialisation API that compile-check uses, so they cannot be measured
# this way.
MEASURED: tuple[str, ...] = ("3.6.0", "3.7.1", "3.8.0", "3.9.0")
ARCHS: tuple[str, ...] = ("sm_80", "sm_89", "sm_90")
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")

# (Triton version, arch, dtype) -> {encode variant name: spilled bytes}; every other combination of the
# measured versions, archs and dtypes compiled the whole encode space without a spill (gemma-2b-l20 shape).
ENCODE_SPILLS: dict[tuple[str, str, str], dict[str, int]] = {
    ("3.6.0", "sm_80", "float16"): {"enc-m128-n64-k64-g8-s16-st3-w8": 16},
    ("3.6.0", "sm_89", "float16"): {"enc-m128-n64-k64-g8-s16-st3-w8": 32},
    ("3.7.1", "sm_90", "bfloat16"): {"enc-m16-n128-k64-g8-s16-st4-w4": 8},
}

# The decode space (``Variant.search_space`` at the gemma-2b-l20 shape, 384 variants) compiled per (Triton,
# arch, dtype): the combinations measured, and the spills found, keyed by ``decode_key`` (max_l0 is a runtime
# argument, so every cap compiles to the same kernels). 3.9.0: the README's compile-check of the space.
DECODE_MEASURED: frozenset[tuple[str, str, str]] = frozenset(
    {(version, arch, "float32") for version in ("3.7.1", "3.9.0") for arch in ARCHS}
    | {("3.7.1", "sm_90", "bfloat16")}
)
DECODE_SPILLS: dict[tuple[str, str, str], dict[str, int]] = {
    ("3.7.1", "sm_80", "float32"): {
        "chunked-c8-u8-f1024-d128-l8-w4-wb4-s2": 16,
        "chunked-c16-u4-f1024-d128-l8-w4-wb4-s2": 16,
        "fixed-fallback-f1024-d128-l4-w2-wb4-s2": 8,
        "fixed-fallback-f4096-d128-l4-w2-wb4-s2": 8,
    },
    ("3.7.1", "sm_90", "float32"): {
        "fixed-fallback-f1024-d512-l4-w8-wb4-s2": 8,
        "fixed-fallback-f4096-d512-l4-w8-wb4-s2": 8,
    },
}


def base_version(version: str) -> str:
    """'3.7.1+git1234' -> '3.7.1' (local builds and pre-release tags compile as their release)."""
    return version.split("+")[0].strip()


def arch_of(capability: tuple[int, int]) -> str:
    """(9, 0) -> 'sm_90'."""
    major, minor = capability
    return f"sm_{major}{minor}"


def decode_key(name: str) -> str:
    """A decode variant's name without its max_l0 ('fixed-fallback-m64-f1024-...' ->
    'fixed-fallback-f1024-...'); encode names are their own key."""
    return re.sub(r"^(fixed-[a-z]+)-m\d+-", r"\1-", name)


def _record(name: str) -> tuple[dict[tuple[str, str, str], dict[str, int]], str]:
    return (ENCODE_SPILLS, name) if name.startswith("enc-") else (DECODE_SPILLS, decode_key(name))


def is_measured(name: str, version: str | None, arch: str, dtype: str) -> bool:
    """Whether the record holds this variant's kind (encode or decode) for this Triton, arch and dtype."""
    if version is None:
        return False
    if name.startswith("enc-"):
        return base_version(version) in MEASURED and arch in ARCHS and dtype in DTYPES
    return (base_version(version), arch, dtype) in DECODE_MEASURED


def spills(name: str, version: str | None, arch: str, dtype: str) -> int | None:
    """Bytes the variant ``name`` is recorded (or, where nothing was measured, feared) to spill with
    ``version`` on ``arch`` in ``dtype``; None when it is not. Unmeasured: the most it spilled in
    ``dtype`` with any measured version or architecture."""
    record, key = _record(name)
    if is_measured(name, version, arch, dtype):
        return record.get((base_version(version or ""), arch, dtype), {}).get(key)
    sizes = [found[key] for (_, _, d), found in record.items() if d == dtype and key in found]
    return max(sizes) if sizes else None


def pruned_reason(name: str, version: str | None, arch: str, dtype: str) -> str | None:
    """Why the variant ``name`` is left out of the space here, or None when it stays."""
    size = spills(name, version, arch, dtype)
    if size is None:
        return None
    if is_measured(name, version, arch, dtype):
        return f"spills {size} bytes with Triton {version} on {arch} in {dtype} (compile facts)"
    return (
        f"spilled {size} bytes in {dtype} with a measured Triton; Triton {version} on {arch} is not in "
        "the compile facts, so it is left out"
    )


def pruned_on(name: str, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the variant ``name`` is left out of the space on ``device`` with the installed Triton, or
    None. Off CUDA nothing is pruned (Triton's interpreter has no registers to spill), nor where this
    torch cannot read the device's architecture (no CUDA device to run on)."""
    if device.type != "cuda":
        return None
    from sae_tune.device import triton_version

    try:
        arch = arch_of(torch.cuda.get_device_capability(device))
    except (AssertionError, RuntimeError):  # a torch built without CUDA, or no such device
        return None
    return pruned_reason(name, triton_version(), arch, str(dtype).removeprefix("torch."))
