"""The targets: every way sae-tune can run a decode, behind one contract (``base.Target``).

``library`` (stock torch ops, always in the race), ``triton`` (generated GPU kernels) and ``cpu``
(generated C + OpenMP). The tuner, the cache's validation, the dispatcher, ``show-kernel`` and ``bench``
loop over ``TARGETS``; each implementation name stored in the cache belongs to exactly one target.
"""

from __future__ import annotations

import functools
import hashlib

from sae_tune.targets.base import (
    CallFacts,
    ConfigFieldError,
    DecodeFn,
    Gated,
    ModelProblem,
    SpaceRequest,
    Target,
)
from sae_tune.targets.cpu.target import CpuTarget
from sae_tune.targets.library import LibraryTarget
from sae_tune.targets.triton import TritonTarget

TARGETS: tuple[Target, ...] = (LibraryTarget(), TritonTarget(), CpuTarget())
IMPLS: tuple[str, ...] = tuple(impl for t in TARGETS for impl in t.impls)
GENERATED: tuple[Target, ...] = tuple(t for t in TARGETS if t.generated)


def target_of(impl: str) -> Target:
    """The target that owns ``impl``; ValueError naming the known ones otherwise."""
    for target in TARGETS:
        if target.owns(impl):
            return target
    raise ValueError(f"unknown implementation {impl!r} (known: {', '.join(IMPLS)})")


def by_name(name: str) -> Target:
    for target in TARGETS:
        if target.name == name:
            return target
    raise ValueError(f"unknown target {name!r} (known: {', '.join(t.name for t in TARGETS)})")


@functools.cache
def templates_hash() -> str:
    """One hash over every generated target's templates: part of every cache key."""
    digest = hashlib.sha256()
    for target in GENERATED:
        digest.update(f"{target.name}:{target.source_hash()}|".encode())
    return digest.hexdigest()


__all__ = [
    "GENERATED",
    "IMPLS",
    "TARGETS",
    "CallFacts",
    "ConfigFieldError",
    "DecodeFn",
    "Gated",
    "ModelProblem",
    "SpaceRequest",
    "Target",
    "by_name",
    "target_of",
    "templates_hash",
]
