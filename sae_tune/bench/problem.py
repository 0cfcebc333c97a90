"""One benchmark problem: seeded synthetic activations, random weights and the exact result.

The exact result is computed in fp64 from the non-zeros only (an ``embedding_bag`` over the fired rows),
so checking a path costs O(B * L0 * D) even where the dense fp64 product would take seconds (large
batches, wide SAEs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sae_tune.autotune.verify import Reference
from sae_tune.autotune.workload import L0Stats, calibrate_l0, random_weights, synthetic_acts
from sae_tune.specs import SAESpec


@dataclass(frozen=True)
class Problem:
    """Inputs of one decode and what every path must return."""

    spec: SAESpec
    acts: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    reference: Reference
    stats: L0Stats

    @property
    def batch(self) -> int:
        return self.acts.shape[0]

    @property
    def nnz(self) -> int:
        return round(self.stats.mean * self.stats.n_tokens)

    @property
    def out_dtype(self) -> torch.dtype:
        return torch.promote_types(self.W_dec.dtype, self.b_dec.dtype)


def sparse_reference(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None) -> Reference:
    """``acts @ W_dec + b_dec`` and ``|acts| @ |W_dec| + |b_dec|`` in fp64, reading only fired rows."""
    token, feature = acts.nonzero().unbind(1)
    counts = torch.bincount(token, minlength=acts.shape[0])
    offsets = torch.zeros(acts.shape[0] + 1, dtype=torch.int64, device=acts.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    rows, slot = feature.unique(return_inverse=True)
    W = W_dec[rows].double()
    weights = acts[token, feature].double()

    def bag(table: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if acts.shape[0] == 0 or W.shape[0] == 0:
            return torch.zeros(acts.shape[0], W_dec.shape[1], dtype=torch.float64, device=acts.device)
        return F.embedding_bag(
            slot, table, offsets, mode="sum", per_sample_weights=w, include_last_offset=True
        )

    value, scale = bag(W, weights), bag(W.abs(), weights.abs())
    if b_dec is not None:
        value, scale = value + b_dec.double(), scale + b_dec.double().abs()
    return Reference(value, scale)


class WeightCache:
    """Keeps the weights of the last shape: consecutive problems of one shape share them, and at most
    one W_dec (2.4 GB for a 262k x 2304 SAE) is alive at a time."""

    def __init__(self, *, dtype: torch.dtype, device: torch.device, seed: int) -> None:
        self.dtype, self.device, self.seed = dtype, device, seed
        self._key: tuple[int, int] | None = None
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, width: int, d_model: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._key != (width, d_model):
            self._value = None  # free the old one before allocating the new one
            self._value = random_weights(width, d_model, dtype=self.dtype, device=self.device, seed=self.seed)
            self._key = (width, d_model)
        assert self._value is not None
        return self._value


def make_problem(spec: SAESpec, batch: int, weights: WeightCache, *, seed: int) -> Problem:
    """The seeded problem of ``batch`` tokens of ``spec`` on the weight cache's device and dtype."""
    W, b = weights.get(spec.width, spec.d_model)
    acts = synthetic_acts(spec, batch, dtype=W.dtype, device=W.device, seed=seed)
    return Problem(spec, acts, W, b, sparse_reference(acts, W, b), calibrate_l0(acts))
