"""Candidates the tuner races: every target's default space for the job (``sae_tune.targets``).

A candidate is an implementation name and a JSON-able config, the same pair the cache stores. Only
candidates that can never return a wrong result for the workload are offered (each target's ``space``
leaves out what could truncate a token of this SAE), and only where their timings are speeds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from sae_tune.specs import SAESpec
from sae_tune.targets import TARGETS, DecodeFn, SpaceRequest, target_of


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
        return target_of(self.impl).label(self.impl, self.config)

    def build(self) -> DecodeFn:
        """The callable that decodes ``(acts, W_dec, b_dec)`` with this candidate."""
        return target_of(self.impl).build(self.impl, self.config)


def baselines(dtype: torch.dtype, device: torch.device) -> list[Candidate]:
    """Every target's reference paths at their defaults (dense and the library paths): always timed, so a
    tuned result is never worse than what a user could write."""
    return [Candidate.of(impl, {}) for t in TARGETS for impl in t.baselines(dtype, device)]


@dataclass(frozen=True)
class SearchSpace:
    """What a study may choose from: for each implementation, its configs in the targets' order."""

    request: SpaceRequest
    configs: dict[str, tuple[dict[str, Any], ...]]
    groups: dict[str, tuple[str, ...]]  # target name -> its implementations in this space

    @property
    def impls(self) -> tuple[str, ...]:
        return tuple(self.configs)

    def group_of(self, impl: str) -> str:
        return next(name for name, impls in self.groups.items() if impl in impls)

    def fields(self, impl: str) -> tuple[str, ...]:
        """The config fields of ``impl`` in the order they first appear (the variant's field order)."""
        seen: dict[str, None] = {}
        for config in self.configs[impl]:
            seen.update(dict.fromkeys(config))
        return tuple(seen)

    def values(self, impl: str, name: str) -> list[Any]:
        """Every value ``name`` takes among the configs of ``impl`` (None where a config leaves it out)."""
        seen: dict[Any, None] = {}
        for config in self.configs[impl]:
            seen[config.get(name)] = None
        return list(seen)

    def contains(self, cand: Candidate) -> bool:
        return cand.config in self.configs.get(cand.impl, ())

    def size(self) -> int:
        return sum(len(c) for c in self.configs.values())

    def warm_starts(self) -> list[Candidate]:
        """The targets' own first tries (their default variants) that lie in this space."""
        out = []
        for target in TARGETS:
            for impl in target.impls:
                if impl in self.configs:
                    out += [Candidate.of(impl, c) for c in target.warm_starts(self.request)]
        return [c for c in out if self.contains(c)]


def search_space(
    spec: SAESpec,
    batch_bucket: int,
    dtype: torch.dtype,
    device: torch.device,
    max_l0s: tuple[int, ...],
) -> SearchSpace:
    """The candidates for this tuning job, from every target that runs for real on ``device``."""
    request = SpaceRequest(
        F=spec.width,
        D=spec.d_model,
        dtype=dtype,
        device=device,
        batch_bucket=batch_bucket,
        max_l0s=tuple(max_l0s),
        topk_k=spec.k if spec.arch == "topk" else None,
    )
    configs: dict[str, list[dict[str, Any]]] = {}
    groups: dict[str, tuple[str, ...]] = {}
    for target in TARGETS:
        for impl, config in target.space(request):
            configs.setdefault(impl, []).append(config)
            if impl not in groups.get(target.name, ()):
                groups[target.name] = (*groups.get(target.name, ()), impl)
    return SearchSpace(request, {impl: tuple(c) for impl, c in configs.items()}, groups)
