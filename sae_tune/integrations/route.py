"""Route one library's decoder matmul through the dispatcher, leaving every other line of its code alone.

``RouteDecoderMatmul(W_dec)`` is a ``TorchFunctionMode`` held only while a wrapped ``decode`` runs. It
replaces the first ``acts @ W_dec`` whose right operand *is* that decoder weight (identity, not
equality) by ``sae_tune.sparse_decode(acts, W_dec)``, and passes every other torch call through
unchanged: the bias add, hooks, normalisation and reshaping are the library's own code. Operands it does
not handle as plain dense tensors (sparse layouts, subclasses, mixed dtypes or devices, wrong shapes)
also go to torch unchanged, so errors and results there are exactly torch's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

MATMULS = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__})
PLAIN = (torch.Tensor, torch.nn.Parameter)

# A tensor's promise that it holds at most k non-zeros per row: (k, tensor._version when promised).
BOUND_ATTR = "_sae_tune_row_nnz_bound"


def promise_row_bound(t: torch.Tensor, k: int) -> None:
    """Record that ``t`` has at most ``k`` non-zeros per row, valid until ``t`` is modified in place."""
    try:
        setattr(t, BOUND_ATTR, (int(k), t._version))
    except (AttributeError, RuntimeError):  # a tensor type that takes no attributes: no promise
        pass


def row_bound(t: torch.Tensor) -> int | None:
    """The promised per-row bound of ``t`` if it is still valid (``t`` not modified in place since)."""
    bound = getattr(t, BOUND_ATTR, None)
    if bound is None or bound[1] != t._version:
        return None
    return bound[0]


def handles(acts: Any, W_dec: torch.Tensor) -> bool:
    """Whether ``acts @ W_dec`` is a plain dense decode the dispatcher computes exactly like torch."""
    return (
        type(acts) in PLAIN
        and acts.layout == torch.strided
        and W_dec.layout == torch.strided
        and acts.dim() >= 1
        and W_dec.dim() == 2
        and acts.shape[-1] == W_dec.shape[0]
        and acts.dtype == W_dec.dtype
        and acts.dtype.is_floating_point
        and acts.device == W_dec.device
    )


class RouteDecoderMatmul(TorchFunctionMode):
    """Send the first ``acts @ W_dec`` (W_dec by identity) to ``decode``; everything else to torch."""

    def __init__(self, W_dec: torch.Tensor, decode: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.W_dec = W_dec
        self.decode = decode
        self.routed = False

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if (
            not self.routed
            and func in MATMULS
            and len(args) == 2
            and not kwargs
            and args[1] is self.W_dec
            and handles(args[0], self.W_dec)
        ):
            self.routed = True
            return self.decode(args[0], self.W_dec, k=row_bound(args[0]))
        return func(*args, **kwargs)
