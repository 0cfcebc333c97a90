"""``sparse_decode``: the public entry point for ``feature_acts @ W_dec + b_dec``, through a given variant
or through the dispatcher."""

from __future__ import annotations

import torch

from sae_tune.dispatch import decode as dispatch_decode
from sae_tune.inputs import check_decode_inputs
from sae_tune.kernels import run_variant
from sae_tune.variants import Variant


def sparse_decode(
    feature_acts: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
    *,
    variant: Variant | None = None,
    allow_truncation: bool = False,
    k: int | None = None,
) -> torch.Tensor:
    """``feature_acts @ W_dec (+ b_dec)`` computed by gathering only the W_dec rows of fired features.

    feature_acts: (..., F); W_dec: (F, D); b_dec: (D,) or None. The result has shape (..., D) and the
    dtype of the dense expression.

    Without ``variant`` the dispatcher chooses the path (tuned cache, shipped configs, cost model or
    dense; ``sae_tune.explain`` says which and why), with correct gradients when autograd records the
    call. With a ``variant`` that variant runs, and inputs that require gradients are refused.

    ``k`` is a promise that no token has more than k non-zeros (a TopK SAE's k): it lets paths that keep
    at most k features per token run. ``allow_truncation`` lets them run without that promise (they then
    drop the features of a token beyond their cap); an ``unchecked`` variant needs one of the two.
    """
    if variant is None:
        return dispatch_decode(feature_acts, W_dec, b_dec, k=k, allow_truncation=allow_truncation)
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
    if k is not None:
        if type(k) is not int or k < 1:
            raise ValueError(f"k must be a positive int or None, got {k!r}")
        allow_truncation = allow_truncation or k <= variant.max_l0
    out = run_variant(inputs, variant, allow_truncation=allow_truncation)
    return out.reshape(*inputs.lead_shape, inputs.D)
