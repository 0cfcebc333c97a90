"""``sparse_decode``: the public entry point for ``feature_acts @ W_dec + b_dec``, through a given variant
or through the dispatcher."""

from __future__ import annotations

import dataclasses

import torch

from sae_tune.dispatch import decode as dispatch_decode
from sae_tune.inputs import autocast_cast, autocast_dtype, check_decode_inputs
from sae_tune.targets.triton.launch import check_kernel_tensor, run_variant
from sae_tune.targets.triton.variant import Variant


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
    at most k features per token run, and they check it on the device (a token above the cap still
    decodes exactly). ``allow_truncation`` lets them run without that promise and drop the features of a
    token beyond their cap; an ``unchecked`` variant needs one of the two (under ``k`` alone it runs with
    the fallback policy). Under ``torch.autocast`` the result has the dtype ``acts @ W_dec`` has there.
    """
    if variant is None:
        return dispatch_decode(feature_acts, W_dec, b_dec, k=k, allow_truncation=allow_truncation)
    if not isinstance(variant, Variant):
        raise TypeError(f"variant must be a sae_tune.Variant, got {type(variant).__name__}")
    if type(allow_truncation) is not bool:
        raise TypeError(f"allow_truncation must be True or False, got {allow_truncation!r}")
    if k is not None and (type(k) is not int or k < 1):
        raise ValueError(f"k must be a positive int or None, got {k!r}")
    target = autocast_dtype(feature_acts)
    if target is not None and isinstance(W_dec, torch.Tensor):
        # as autocast runs ``feature_acts @ W_dec``: both operands in its dtype (the bias add is not cast)
        feature_acts, W_dec = autocast_cast(feature_acts, target), autocast_cast(W_dec, target)
    for name, t in (("feature_acts", feature_acts), ("W_dec", W_dec), ("b_dec", b_dec)):
        if t is not None or name != "b_dec":
            check_kernel_tensor(name, t)  # with the dtypes this path takes in the message
    inputs = check_decode_inputs(feature_acts, W_dec, b_dec)
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (feature_acts, W_dec, b_dec)
    ):
        raise RuntimeError(
            "the generated kernels have no backward; call sparse_decode under torch.no_grad() "
            "or use the dense product where gradients are needed"
        )
    if variant.can_truncate and not allow_truncation and k is not None and k <= variant.max_l0:
        # A k promise can be broken without anyone noticing (an edit through .data or a hook), so it
        # never licenses truncation: the same slots with the fallback policy cost the same when it holds
        # and stay exact for a token above max_l0 when it does not.
        variant = dataclasses.replace(variant, overflow="fallback")
    out = run_variant(inputs, variant, allow_truncation=allow_truncation)
    return out.reshape(*inputs.lead_shape, inputs.D)
