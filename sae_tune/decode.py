"""``sparse_decode``: the public entry point for ``feature_acts @ W_dec + b_dec`` through a variant."""

from __future__ import annotations

import torch

from sae_tune.inputs import check_decode_inputs
from sae_tune.kernels import run_variant
from sae_tune.variants import Variant


def sparse_decode(
    feature_acts: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
    *,
    variant: Variant,
    allow_truncation: bool = False,
) -> torch.Tensor:
    """``feature_acts @ W_dec (+ b_dec)`` computed by gathering only the W_dec rows of fired features.

    feature_acts: (..., F); W_dec: (F, D); b_dec: (D,) or None. The result has shape (..., D) and the
    dtype of the dense expression. ``allow_truncation`` must be True for an ``unchecked`` variant, which
    drops the features of a token beyond max_l0.
    """
    if not isinstance(variant, Variant):
        raise TypeError(f"variant must be a sae_tune.Variant, got {type(variant).__name__}")
    inputs = check_decode_inputs(feature_acts, W_dec, b_dec)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (feature_acts, W_dec, b_dec)
    ):
        raise RuntimeError(
            "the generated kernels have no backward; call sparse_decode under torch.no_grad() "
            "or use the dense product where gradients are needed"
        )
    out = run_variant(inputs, variant, allow_truncation=allow_truncation)
    return out.reshape(*inputs.lead_shape, inputs.D)
