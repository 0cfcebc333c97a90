"""Checks of decode inputs shared by every path: shapes, dtypes, devices, named in the error."""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass(frozen=True)
class DecodeInputs:
    """Validated inputs: acts flattened to (tokens, F), and how to shape the result."""

    acts: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor | None
    lead_shape: tuple[int, ...]
    out_dtype: torch.dtype

    @property
    def n_tokens(self) -> int:
        return self.acts.shape[0]

    @property
    def F(self) -> int:
        return self.W_dec.shape[0]

    @property
    def D(self) -> int:
        return self.W_dec.shape[1]


def check_decode_inputs(
    feature_acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None
) -> DecodeInputs:
    """Validate ``feature_acts @ W_dec + b_dec`` and flatten the leading dimensions of the activations."""
    for name, t in (("feature_acts", feature_acts), ("W_dec", W_dec), ("b_dec", b_dec)):
        if t is None and name == "b_dec":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype (float32, float16, bfloat16), got {t.dtype}")
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be 2-D (F, D), got shape {tuple(W_dec.shape)}")
    if feature_acts.dim() < 1:
        raise ValueError("feature_acts must have at least one dimension (..., F)")
    F, D = W_dec.shape
    if feature_acts.shape[-1] != F:
        raise ValueError(
            f"feature_acts has {feature_acts.shape[-1]} features (shape {tuple(feature_acts.shape)}) but "
            f"W_dec has {F} rows (shape {tuple(W_dec.shape)})"
        )
    if feature_acts.dtype != W_dec.dtype:
        raise TypeError(
            f"feature_acts ({feature_acts.dtype}) and W_dec ({W_dec.dtype}) must have the same dtype, "
            "as for feature_acts @ W_dec"
        )
    if feature_acts.device != W_dec.device:
        raise ValueError(f"feature_acts is on {feature_acts.device} but W_dec is on {W_dec.device}")
    out_dtype = W_dec.dtype
    if b_dec is not None:
        if b_dec.shape != (D,):
            raise ValueError(
                f"b_dec must have shape ({D},) to match W_dec {tuple(W_dec.shape)}, got {tuple(b_dec.shape)}"
            )
        if b_dec.device != W_dec.device:
            raise ValueError(f"b_dec is on {b_dec.device} but W_dec is on {W_dec.device}")
        out_dtype = torch.promote_types(out_dtype, b_dec.dtype)
    if F >= 2**31:
        raise ValueError(f"W_dec has {F} rows; feature indices must fit in int32 (< 2**31)")
    lead_shape = tuple(feature_acts.shape[:-1])
    return DecodeInputs(feature_acts.reshape(-1, F), W_dec, b_dec, lead_shape, out_dtype)
