"""Render a CpuVariant and the call's dtypes into readable C source.

Only validated words and ints reach the template: the variant is re-validated, and the dtypes are mapped
through fixed tables to C type names and conversion functions (never formatted from outside text).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import NamedTuple

import torch

from sae_tune.targets.cpu.variant import FAMILIES, SCHEDULES, CpuVariant
from sae_tune.targets.templating import environment, folder_hash

TEMPLATE_DIR = Path(__file__).parent / "templates"
ENTRY_TEMPLATE = "decode.c.jinja"
ENCODE_TEMPLATE = "compact.c.jinja"

# dtype -> (short name, C storage type of a value, raw-bits type, |x| mask, to-fp32 function, from-fp32)
_KINDS: dict[torch.dtype, tuple[str, str, str, str, str, str]] = {
    torch.float32: ("f32", "float", "uint32_t", "0x7fffffffu", "f32_from_f32", ""),
    torch.float16: ("f16", "uint16_t", "uint16_t", "0x7fffu", "f32_from_f16", "f16_from_f32"),
    torch.bfloat16: ("bf16", "uint16_t", "uint16_t", "0x7fffu", "f32_from_bf16", "bf16_from_f32"),
}
_ACT_VALUE = {
    torch.float32: "f32_from_bits32",
    torch.float16: "f32_from_f16",
    torch.bfloat16: "f32_from_bf16",
}

_env = environment(TEMPLATE_DIR)


class CpuDtypes(NamedTuple):
    """The dtypes a kernel is specialised for: activations and W_dec (one dtype), bias (or None), output."""

    inputs: torch.dtype
    bias: torch.dtype | None
    out: torch.dtype


def check_dtypes(dtypes: CpuDtypes | tuple) -> CpuDtypes:
    """The dtypes as a CpuDtypes, or a TypeError naming the one that has no C kernel."""
    if not isinstance(dtypes, tuple) or len(dtypes) != 3:
        raise TypeError(f"dtypes must be (input dtype, bias dtype or None, output dtype), got {dtypes!r}")
    inputs, bias, out = dtypes
    for what, dtype in (("input", inputs), ("bias", bias), ("output", out)):
        if dtype is None and what == "bias":
            continue
        if dtype not in _KINDS:
            raise TypeError(f"the CPU kernels take float32, float16 or bfloat16 {what}s, got {dtype}")
    expected = inputs if bias is None else torch.promote_types(inputs, bias)
    if out != expected:
        raise TypeError(f"output dtype must be {expected} (the dense expression's dtype), got {out}")
    return CpuDtypes(inputs, bias, out)


@functools.cache
def template_hash() -> str:
    """sha256 over every C template's name and text."""
    return folder_hash(TEMPLATE_DIR)


def _checked_params(variant: CpuVariant) -> dict[str, object]:
    if not isinstance(variant, CpuVariant):
        raise TypeError(f"expected a CpuVariant, got {type(variant).__name__}")
    CpuVariant(**dataclasses.asdict(variant))  # validate again: the object may have been tampered with
    params = variant.template_params()
    for key, value in params.items():
        ok = value in FAMILIES if key == "family" else value in SCHEDULES if key == "schedule" else None
        if ok is None:
            ok = type(value) is int
        if not ok:
            raise ValueError(f"template parameter {key}={value!r} is not allowed")
    return params


def render(variant: CpuVariant, dtypes: CpuDtypes | tuple) -> str:
    """The C source of ``variant`` specialised for ``dtypes`` (what show-kernel prints)."""
    params = _checked_params(variant)
    inputs, bias, out = check_dtypes(dtypes)
    in_kind, w_ctype, bits_ctype, abs_mask, w_value, _ = _KINDS[inputs]
    out_kind, out_ctype, _, _, _, out_value = _KINDS[out]
    context = {
        **params,
        "name": variant.name,
        "unrolls": sorted({1, variant.unroll}),
        "in_kind": in_kind,
        "w_ctype": w_ctype,
        "bits_ctype": bits_ctype,
        "abs_mask": abs_mask,
        "act_value": _ACT_VALUE[inputs],
        "w_value": w_value,
        "bias_kind": _KINDS[bias][0] if bias is not None else None,
        "bias_ctype": _KINDS[bias][1] if bias is not None else "",
        "bias_value": _KINDS[bias][4] if bias is not None else "",
        "bias_size": bias.itemsize if bias is not None else 0,
        "out_kind": out_kind,
        "out_ctype": out_ctype,
        "out_value": out_value,
    }
    return _env.get_template(ENTRY_TEMPLATE).render(**context)


# dtype -> all-exponent-bits mask of its raw bits (Inf and NaN have every exponent bit set)
_EXP_MASKS = {torch.float32: "0x7f800000u", torch.float16: "0x7c00u", torch.bfloat16: "0x7f80u"}


def render_encode(dtype: torch.dtype) -> str:
    """The C source of the encode's threshold + compaction kernels for pre-activations of ``dtype``."""
    if dtype not in _KINDS:
        raise TypeError(f"the CPU encode kernels take float32, float16 or bfloat16, got {dtype}")
    kind, _, bits_ctype, _, _, _ = _KINDS[dtype]
    context = {
        "kind": kind,
        "bits_ctype": bits_ctype,
        "exp_mask": _EXP_MASKS[dtype],
        "to_f32": _ACT_VALUE[dtype],
    }
    return _env.get_template(ENCODE_TEMPLATE).render(**context)
