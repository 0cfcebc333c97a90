"""Candidates the tuner races: library paths built from torch ops, and generated Triton variants.

A candidate is an implementation name and a JSON-able config, the same pair the cache stores. Only
candidates that can never return a wrong result for the workload are offered: truncating paths appear
only where no token can exceed their cap (a TopK SAE with k <= cap).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from sae_tune.specs import SAESpec
from sae_tune.torch_paths import TORCH_PATHS, DecodeFn
from sae_tune.triton_support import triton_unavailable_reason
from sae_tune.variants import Variant

TRITON = "triton"
# Token chunks raced for the library paths (0 = the whole batch at once).
CHUNKS = (0, 16, 64, 256)


@dataclass(frozen=True)
class Candidate:
    """One implementation with one config; ``config_json`` keeps it hashable and stable."""

    impl: str
    config_json: str

    @classmethod
    def of(cls, impl: str, config: dict[str, Any]) -> Candidate:
        return cls(impl, json.dumps(config, sort_keys=True))

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    @property
    def label(self) -> str:
        if self.impl == TRITON:
            return f"triton[{Variant.from_dict(self.config).name}]"
        params = ",".join(f"{k}={v}" for k, v in sorted(self.config.items()) if v is not None)
        return f"{self.impl}[{params}]" if params else self.impl

    def build(self) -> DecodeFn:
        """The callable that decodes ``(acts, W_dec, b_dec)`` with this candidate."""
        if self.impl == TRITON:
            from sae_tune.decode import sparse_decode

            variant = Variant.from_dict(self.config)

            def run(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None) -> torch.Tensor:
                return sparse_decode(acts, W_dec, b_dec, variant=variant)

            return run
        return TORCH_PATHS[self.impl].build(**self.config)


def library_baselines(dtype: torch.dtype, device: torch.device) -> list[Candidate]:
    """The library paths at their defaults: always timed, so a tuned result is never worse than them."""
    return [
        Candidate.of(name, {})
        for name, path in TORCH_PATHS.items()
        if not path.params and path.supports(dtype, device)
    ]


@dataclass(frozen=True)
class SearchSpace:
    """What a study may choose from, for one device, dtype, SAE and batch bucket."""

    torch_impls: tuple[str, ...]
    topk_k: int | None
    chunks: tuple[int, ...]
    variants: tuple[Variant, ...]

    @property
    def impls(self) -> tuple[str, ...]:
        return self.torch_impls + ((TRITON,) if self.variants else ())

    def torch_config(self, impl: str, chunk: int) -> dict[str, Any]:
        config: dict[str, Any] = {"k": self.topk_k} if TORCH_PATHS[impl].params else {}
        if chunk:
            config["chunk"] = chunk
        return config

    def contains(self, cand: Candidate) -> bool:
        if cand.impl == TRITON:
            try:
                return Variant.from_dict(cand.config) in self.variants
            except (TypeError, ValueError):
                return False
        if cand.impl not in self.torch_impls:
            return False
        config = cand.config
        chunk = config.get("chunk") or 0
        return chunk in self.chunks and config == self.torch_config(cand.impl, chunk)

    def size(self) -> int:
        return len(self.torch_impls) * len(self.chunks) + len(self.variants)


def search_space(
    spec: SAESpec,
    batch_bucket: int,
    dtype: torch.dtype,
    device: torch.device,
    max_l0s: tuple[int, ...],
) -> SearchSpace:
    """The candidates for this tuning job; Triton variants only where they run for real (CUDA)."""
    impls = []
    topk_k = spec.k if spec.arch == "topk" else None
    for name, path in TORCH_PATHS.items():
        if not path.supports(dtype, device):
            continue
        if path.can_truncate and topk_k is None:
            continue  # a JumpReLU token can fire any number of features: a fixed k could drop some
        impls.append(name)
    chunks = tuple(c for c in CHUNKS if c < batch_bucket)
    variants: tuple[Variant, ...] = ()
    if device.type == "cuda" and triton_unavailable_reason(device) is None:
        caps = tuple(sorted(set(max_l0s) | ({topk_k} if topk_k else set())))
        space = Variant.search_space(spec.width, spec.d_model, dtype, max_l0s=caps, allow_unchecked=True)
        variants = tuple(v for v in space if overflow_impossible_or_handled(v, topk_k))
    return SearchSpace(tuple(impls), topk_k, chunks, variants)


def overflow_impossible_or_handled(variant: Variant, topk_k: int | None) -> bool:
    """May the tuner pick this variant? ``fallback`` and exact allocation handle any L0; ``validate``
    (raises) and ``unchecked`` (truncates) only where no token can exceed max_l0: TopK with k <= max_l0."""
    if variant.alloc == "exact" or variant.overflow == "fallback":
        return True
    return topk_k is not None and topk_k <= variant.max_l0
