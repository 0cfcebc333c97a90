"""Checks of decode inputs shared by every path: shapes, dtypes, devices, named in the error."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# What the generated kernels compute in (they accumulate in fp32, so float64 would lose precision).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    """``float32, float16, bfloat16``: the dtypes a message says are accepted."""
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


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


def resolved(t: torch.Tensor) -> torch.Tensor:
    """``t`` with a lazy negation or conjugation applied (e.g. ``z.conj().imag``): such views share
    storage with their base and only carry a bit, which code reading raw memory would ignore. A no-op
    (the same tensor) for ordinary tensors."""
    return t.resolve_conj().resolve_neg() if (t.is_neg() or t.is_conj()) else t


def check_decode_inputs(
    feature_acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None
) -> DecodeInputs:
    """Validate ``feature_acts @ W_dec + b_dec`` and flatten the leading dimensions of the activations.

    The returned tensors have their negation/conjugation bits resolved, so every path (and every kernel
    that reads memory through a pointer) sees the values the user sees.
    """
    for name, t in (("feature_acts", feature_acts), ("W_dec", W_dec), ("b_dec", b_dec)):
        if t is None and name == "b_dec":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout is not torch.strided:
            raise TypeError(
                f"{name} must be a dense (strided) tensor, got layout {t.layout}; convert it with "
                ".to_dense() or use torch.sparse.mm"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype ({dtype_names(FLOAT_DTYPES)}), got {t.dtype}")
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec must be 2-D (F, D), got shape {tuple(W_dec.shape)}")
    if feature_acts.dim() < 1:
        raise ValueError(
            f"feature_acts must have at least one dimension (..., F), got a {feature_acts.dim()}-D tensor"
        )
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
        b_dec = resolved(b_dec)
    if F >= 2**31:
        raise ValueError(f"W_dec has {F} rows; feature indices must fit in int32 (< 2**31)")
    lead_shape = tuple(feature_acts.shape[:-1])
    # explicit token count: reshape(-1, 0) is ambiguous when F == 0
    acts = resolved(feature_acts).reshape(math.prod(lead_shape), F)
    return DecodeInputs(acts, resolved(W_dec), b_dec, lead_shape, out_dtype)


# --- autocast ---------------------------------------------------------------------------------------------


def autocast_dtype(*tensors: torch.Tensor | None) -> torch.dtype | None:
    """The dtype ``acts @ W_dec`` computes in under an active ``torch.autocast`` for the tensors' device,
    or None when autocast is off there (or the inputs are not tensors)."""
    t = tensors[0] if tensors else None
    if not isinstance(t, torch.Tensor):
        return None
    device_type = t.device.type
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return None


def autocast_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as autocast casts a matmul operand: floating tensors other than float64 go to ``dtype``."""
    if t.is_floating_point() and t.dtype != torch.float64 and t.dtype != dtype:
        return t.to(dtype)
    return t


# --- a bias the paths do not fuse -----------------------------------------------------------------------


def bias_after(lead_shape: tuple[int, ...], W_dec: torch.Tensor, b_dec: torch.Tensor | None) -> str | None:
    """Why ``b_dec`` must be added by torch after the product instead of inside a path, or None when a
    path takes it (a (D,) vector of W_dec's dtype, or no bias; other inputs are left to the input checks).

    The dense expression ``acts @ W_dec + b_dec`` rounds the product to W_dec's dtype, then adds the bias
    with torch's type promotion and broadcasting: computing the product alone and adding ``b_dec`` after
    is that expression, for every bias dtype and every shape that broadcasts. A shape that does not
    broadcast is a ``ValueError`` naming ``b_dec``.
    """
    if not (isinstance(b_dec, torch.Tensor) and isinstance(W_dec, torch.Tensor)) or W_dec.dim() != 2:
        return None
    if b_dec.layout is not torch.strided:
        return None
    D = W_dec.shape[1]
    same_shape = tuple(b_dec.shape) == (D,)
    if same_shape and b_dec.dtype == W_dec.dtype:
        return None
    product = (*lead_shape, D)
    if not same_shape:
        try:
            torch.broadcast_shapes(product, tuple(b_dec.shape))
        except RuntimeError:
            raise ValueError(
                f"b_dec must have shape ({D},) to match W_dec {tuple(W_dec.shape)}, or a shape that "
                f"broadcasts against the product's {product} as in acts @ W_dec + b_dec; got "
                f"{tuple(b_dec.shape)}"
            ) from None
    if b_dec.device != W_dec.device and b_dec.dim() != 0:  # torch adds a 0-dim tensor from any device
        raise ValueError(f"b_dec is on {b_dec.device} but W_dec is on {W_dec.device}")
    if b_dec.dtype != W_dec.dtype:
        out = torch.promote_types(W_dec.dtype, b_dec.dtype)
        return (
            f"b_dec ({dtype_names((b_dec.dtype,))}) is added by torch after the product in "
            f"{dtype_names((W_dec.dtype,))}, giving {dtype_names((out,))} as acts @ W_dec + b_dec does"
        )
    return f"b_dec of shape {tuple(b_dec.shape)} is broadcast by torch after the product, as in dense"
