"""What the dispatcher decided for one call, and the candidates it decides between."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

SOURCES = ("cache", "nearest", "shipped", "model", "dense", "csr")


class DispatchWarning(UserWarning):
    """A tuned entry or cache file was not used (unreadable, invalid, or wrong against dense)."""


@dataclass(frozen=True)
class Decision:
    """The path a decode takes and why; returned by ``sae_tune.explain``.

    implementation  the implementation name of a target: "dense", a library path ("embedding_bag_csr",
                    ...), "triton" or "cpu" (generated kernels).
    config          the parameters it runs with (the target's variant as a dict), read-only.
    source          where the choice came from: "cache" (tuned here, this batch bucket), "nearest"
                    (tuned here, another batch bucket or software version), "shipped" (per-GPU file),
                    "model" (cost model), "dense" (nothing else applies) or "csr" (a ``SparseActs``,
                    decoded straight from its CSR: nothing to choose).
    reason          one line saying why.
    """

    implementation: str
    config: Mapping[str, Any]
    source: str
    reason: str

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"Decision.source must be one of {list(SOURCES)}, got {self.source!r}")
        object.__setattr__(self, "config", MappingProxyType(dict(self.config)))

    @property
    def label(self) -> str:
        """Short name, e.g. ``embedding_bag_csr[chunk=16]`` or ``triton[exact-f1024-...]``."""
        return Option(self.implementation, _dump(self.config), self.source, self.reason).label

    def __str__(self) -> str:
        return f"{self.label} ({self.source}): {self.reason}"


def _dump(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), sort_keys=True)


@dataclass(frozen=True)
class Option:
    """One candidate the dispatcher may run: implementation, config (as JSON, so it hashes), provenance.

    ``l0_bucket`` is the tuned entry's L0 bucket (None for the cost model and dense).
    """

    impl: str
    config_json: str
    source: str
    reason: str
    l0_bucket: int | None = field(default=None, compare=False)

    @classmethod
    def of(cls, impl: str, config: Mapping[str, Any], source: str, reason: str, **kw: Any) -> Option:
        return cls(impl, _dump(config), source, reason, **kw)

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    @property
    def what(self) -> tuple[str, str]:
        """Identity of the code that runs (provenance aside)."""
        return self.impl, self.config_json

    @property
    def label(self) -> str:
        from sae_tune.targets import target_of

        try:
            return target_of(self.impl).label(self.impl, self.config)
        except ValueError:  # an implementation no target owns: named as stored
            return f"{self.impl}{self.config}"

    def decision(self) -> Decision:
        return Decision(self.impl, self.config, self.source, self.reason)
