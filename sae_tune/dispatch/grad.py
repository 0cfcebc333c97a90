"""Gradients for a decode computed by a sparse path: the forward is the sparse path, the backward is the
dense product's backward, so gradients are exactly what ``acts @ W_dec + b_dec`` would give.

This lets an SAE forward with gradients enabled (the default for ``nn.Parameter`` weights outside
``torch.no_grad()``) still take the fast path; nothing is computed for the backward unless it runs.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_tune.targets.library.paths import DecodeFn


class SparseDecodeFunction(torch.autograd.Function):
    """``fn(acts, W_dec, b_dec)`` forward; the backward of ``acts @ W_dec + b_dec`` (acts is 2-D)."""

    @staticmethod
    def forward(
        acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None, fn: DecodeFn
    ) -> torch.Tensor:
        return fn(acts, W_dec, b_dec)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        acts, W_dec, b_dec, _ = inputs
        ctx.save_for_backward(acts, W_dec)
        ctx.b_dtype = None if b_dec is None else b_dec.dtype

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        acts, W_dec = ctx.saved_tensors
        # As autograd does for ``(acts @ W_dec) + b_dec``: the product's gradient in its own dtype.
        grad_prod = grad_out.to(W_dec.dtype)
        need_acts, need_w, need_b, _ = ctx.needs_input_grad
        grad_acts = grad_prod @ W_dec.t() if need_acts else None
        grad_w = acts.t() @ grad_prod if need_w else None
        grad_b = grad_out.sum(0).to(ctx.b_dtype) if need_b else None
        return grad_acts, grad_w, grad_b, None


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """True when autograd will record this call."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def with_dense_backward(
    fn: DecodeFn, acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None
) -> torch.Tensor:
    """Run ``fn`` under autograd with the dense product's backward (acts must be 2-D)."""
    return SparseDecodeFunction.apply(acts, W_dec, b_dec, fn)
