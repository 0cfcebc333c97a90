"""``sparse_decode``: the public entry point for ``feature_acts @ W_dec + b_dec``, through a given variant
or through the dispatcher."""

from __future__ import annotations

import dataclasses

import torch

from sae_tune.dispatch import decode as dispatch_decode
from sae_tune.inputs import (
    autocast_cast,
    autocast_dtype,
    bias_after,
    check_decode_inputs,
    dtype_names,
    resolved,
)
from sae_tune.sparse_acts import SparseActs
from sae_tune.targets.triton.launch import check_kernel_tensor, run_variant
from sae_tune.targets.triton.variant import Variant


def sparse_decode(
    feature_acts: torch.Tensor | SparseActs,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
    *,
    variant: Variant | None = None,
    allow_truncation: bool = False,
    k: int | None = None,
) -> torch.Tensor:
    """``feature_acts @ W_dec (+ b_dec)`` computed by gathering only the W_dec rows of fired features.

    feature_acts: (..., F); W_dec: (F, D), of feature_acts' dtype (float32, float16, bfloat16 or float64);
    b_dec: (D,), None, or (without ``variant``) any dtype and shape ``acts @ W_dec + b_dec`` takes (a bias
    of another dtype or a broadcast shape is added by torch after the product, as the dense expression
    adds it). The result has the dense expression's shape and dtype.

    Without ``variant`` the dispatcher chooses the path (tuned cache, shipped configs, cost model or
    dense; ``sae_tune.explain`` says which and why), with correct gradients when autograd records the
    call. With a ``variant`` that variant runs, and inputs that require gradients are refused.

    ``k`` is a promise that no token has more than k non-zeros (a TopK SAE's k): it lets paths that keep
    at most k features per token run, and they check it on the device (a token above the cap still
    decodes exactly). ``allow_truncation`` lets them run without that promise and drop the features of a
    token beyond their cap; an ``unchecked`` variant needs one of the two (under ``k`` alone it runs with
    the fallback policy). Under ``torch.autocast`` the result has the dtype ``acts @ W_dec`` has there.

    A ``SparseActs`` (from ``sparse_encode``) is decoded straight from its CSR: there is nothing to scan.
    """
    if isinstance(feature_acts, SparseActs):
        if variant is not None:
            raise TypeError(
                "variant= takes dense feature_acts; a SparseActs is decoded from its CSR directly"
            )
        _check_promise(k, allow_truncation)
        if bias_after(tuple(feature_acts.lead_shape or ()), W_dec, b_dec) is not None:
            # another dtype is promoted inside; a broadcast shape is added as the dense expression adds it
            if not (isinstance(b_dec, torch.Tensor) and tuple(b_dec.shape) == (W_dec.shape[1],)):
                return decode_sparse_acts(feature_acts, W_dec, None) + b_dec
        return decode_sparse_acts(feature_acts, W_dec, b_dec)
    if variant is None:
        return dispatch_decode(feature_acts, W_dec, b_dec, k=k, allow_truncation=allow_truncation)
    if not isinstance(variant, Variant):
        raise TypeError(f"variant must be a sae_tune.Variant, got {type(variant).__name__}")
    _check_promise(k, allow_truncation)
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


def _check_promise(k: object, allow_truncation: object) -> None:
    if type(allow_truncation) is not bool:
        raise TypeError(f"allow_truncation must be True or False, got {allow_truncation!r}")
    if k is not None and (type(k) is not int or k < 1):
        raise ValueError(f"k must be a positive int or None, got {k!r}")


def decode_sparse_acts(
    acts: SparseActs, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None
) -> torch.Tensor:
    """``acts.to_dense() @ W_dec (+ b_dec)`` from the CSR: one weighted sum of W_dec rows per token
    (``F.embedding_bag`` with the CSR offsets as bags), shaped ``acts.lead_shape + (D,)``.

    The CSR is checked again first (its tensors may have been edited since construction): on CPU before
    any read, raising ``ValueError`` naming the field; elsewhere without a host sync (clamped offsets and
    indices, a NaN result and an asynchronous assert when they were invalid; see ``SparseActs``)."""
    if not isinstance(acts, SparseActs):
        raise TypeError(f"acts must be a SparseActs, got {type(acts).__name__}")
    offsets, indices, ok = acts._csr()
    for name, t in (("W_dec", W_dec), ("b_dec", b_dec)):
        if t is None and name == "b_dec":
            continue
        if not isinstance(t, torch.Tensor) or t.layout is not torch.strided:
            raise TypeError(f"{name} must be a dense torch.Tensor, got {type(t).__name__}")
    if W_dec.dim() != 2 or W_dec.shape[0] != acts.num_features:
        raise ValueError(
            f"W_dec must have shape ({acts.num_features}, D) to match the activations' {acts.num_features} "
            f"features, got {tuple(W_dec.shape)}"
        )
    values, W = acts.values, resolved(W_dec)
    target = autocast_dtype(values)
    if target is not None:
        values, W = autocast_cast(values, target), autocast_cast(W, target)
    if values.dtype != W.dtype:
        raise TypeError(
            f"the activations ({values.dtype}) and W_dec ({W.dtype}) must have the same dtype, as for "
            f"feature_acts @ W_dec (dtypes: {dtype_names((torch.float32, torch.float16, torch.bfloat16))})"
        )
    if W.device != acts.device:
        raise ValueError(f"the activations are on {acts.device} but W_dec is on {W.device}")
    D = W.shape[1]
    if b_dec is not None:
        if b_dec.shape != (D,):
            raise ValueError(
                f"b_dec must have shape ({D},) to match W_dec {tuple(W.shape)}, got {tuple(b_dec.shape)}"
            )
        if b_dec.device != W.device:
            raise ValueError(f"b_dec is on {b_dec.device} but W_dec is on {W.device}")
    if indices.numel() == 0 or D == 0:
        out = torch.zeros(offsets.numel() - 1, D, dtype=W.dtype, device=W.device)
    else:
        out = torch.nn.functional.embedding_bag(
            indices,
            W,
            offsets,
            mode="sum",
            per_sample_weights=values,
            include_last_offset=True,
        )
    if b_dec is not None:
        out = out + resolved(b_dec)
    assert acts.lead_shape is not None
    return SparseActs._poisoned(out, ok).reshape(*acts.lead_shape, D)
