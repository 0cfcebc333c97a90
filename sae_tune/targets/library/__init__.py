"""The library target: decode paths built from stock torch ops (dense, torch.sparse, embedding_bag), and
``sparse_encode``'s chunked torch encode (``encode.py``).

Always in the race, so that tuning never makes a decode slower than what a user could write in a few
lines; dense is what the user had. Its encode's first candidate is what an untuned ``sparse_encode`` runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sae_tune.targets.base import (
    CallFacts,
    ConfigFieldError,
    DecodeFn,
    EncodeProblem,
    EncodeRequest,
    EncodeResult,
    Gated,
    ModelProblem,
    SpaceRequest,
    Target,
)
from sae_tune.targets.library import encode as _encode
from sae_tune.targets.library.paths import TORCH_PATHS

# Token chunks raced for the library paths (0 = the whole batch at once).
CHUNKS = (0, 16, 64, 256)
MAX_PARAM = 1 << 24
# torch ops each modelled path runs besides its data movement (see paths.py), for the per-op overhead.
MODEL_OPS = {"dense": 1, "embedding_bag_csr": 9}
_BIAS_OPS = 1


class LibraryTarget(Target):
    name = "library"
    impls = tuple(TORCH_PATHS)

    def available(self, device: torch.device) -> str | None:
        return None

    def dtypes(self) -> tuple[torch.dtype, ...]:
        return (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    def parse(self, impl: str, config: Mapping[str, Any]) -> dict[str, Any]:
        """Exactly the path's build parameters plus an optional ``chunk``, all positive ints."""
        path = TORCH_PATHS.get(impl)
        if path is None:
            raise ValueError(f"unknown library path {impl!r}")
        allowed = (*path.params, "chunk")
        unknown = sorted(repr(k) for k in config if k not in allowed)
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for {impl} (takes {list(allowed)})")
        for name in path.params:
            if name not in config:
                raise ConfigFieldError(name, f"missing: {impl} needs {list(path.params)}")
        out: dict[str, Any] = {}
        for name in allowed:
            if name not in config:
                continue
            value = config[name]
            if name == "chunk" and value is None:
                out[name] = None
                continue
            if type(value) is not int or not 1 <= value <= MAX_PARAM:
                raise ConfigFieldError(name, f"must be an int in [1, {MAX_PARAM}], got {value!r}")
            out[name] = value
        return out

    def label(self, impl: str, config: Mapping[str, Any]) -> str:
        params = ",".join(f"{k}={v}" for k, v in sorted(config.items()) if v is not None)
        return f"{impl}[{params}]" if params else impl

    def space(self, request: SpaceRequest) -> list[tuple[str, dict[str, Any]]]:
        """Every path that runs here, each also in token chunks; a fixed-k path only for a TopK SAE."""
        out: list[tuple[str, dict[str, Any]]] = []
        chunks = [c for c in CHUNKS if c < request.batch_bucket]
        for name, path in TORCH_PATHS.items():
            if not path.supports(request.dtype, request.device):
                continue
            if path.can_truncate and request.topk_k is None:
                continue  # a JumpReLU token can fire any number of features: a fixed k could drop some
            for chunk in chunks:
                config: dict[str, Any] = {"k": request.topk_k} if path.params else {}
                if chunk:
                    config["chunk"] = chunk
                out.append((name, config))
        return out

    def baselines(self, dtype: torch.dtype, device: torch.device) -> list[str]:
        """The paths at their defaults: always timed, so a tuned result is never worse than them."""
        return [n for n, p in TORCH_PATHS.items() if not p.params and p.supports(dtype, device)]

    def modelled(
        self, device: torch.device, dtype: torch.dtype, F: int, D: int
    ) -> list[tuple[str, dict[str, Any]]]:
        return [(impl, {}) for impl in MODEL_OPS]

    def cost(self, impl: str, problem: ModelProblem, rates: Any) -> float:
        """Dense reads all of W_dec (and is compute-bound for large batches); embedding_bag pays a
        ``nonzero()`` scan of the activations, then moves the fired rows and the (token, feature) pairs."""
        if impl not in MODEL_OPS:
            raise ValueError(f"the cost model has no formula for {impl!r}")
        p, s, bw = problem, problem.itemsize, rates.bandwidth
        ops = MODEL_OPS[impl] * rates.op_overhead
        bias = (2 * p.out_bytes / bw + _BIAS_OPS * rates.op_overhead) if p.has_bias else 0.0
        if impl == "dense":
            moved = (p.F * p.D + p.n_tokens * p.F) * s + p.out_bytes
            return ops + max(moved / bw, 2 * p.n_tokens * p.F * p.D / rates.flops) + bias
        moved = p.nnz * (p.D * s + 16 + s) + p.out_bytes  # fired rows, (token, feature) pairs, values
        return ops + p.n_tokens * p.F / rates.scan + moved / bw + bias

    def gate(self, impl: str, config: Mapping[str, Any], facts: CallFacts) -> Gated | str:
        path = TORCH_PATHS.get(impl)
        if path is None:
            return f"unknown implementation {impl!r}"
        if path.can_truncate:
            cap = config.get("k")
            if type(cap) is not int or not facts.bounded_by(cap):
                return (
                    f"{impl} keeps only k={cap} features per token and the caller did not promise "
                    "that no token has more"
                )
        if not path.supports(facts.dtype, facts.device):
            return f"{impl} does not run {facts.dtype} on {facts.device.type}"
        return Gated(impl, dict(config))

    def build(self, impl: str, config: Mapping[str, Any]) -> DecodeFn:
        return TORCH_PATHS[impl].build(**config)

    def density_sensitive(self, impl: str, config: Mapping[str, Any], dtype: torch.dtype) -> bool:
        path = TORCH_PATHS.get(impl)
        return path is not None and path.density_sensitive(dtype)

    # --- encode: sae_tune.encode's chunked torch code; the chunk size is the tuned parameter ----------
    encode_impls = (_encode.IMPL,)

    def encode_space(self, request: EncodeRequest) -> list[tuple[str, dict[str, Any]]]:
        return _encode.space(request)

    def encode_parse(self, impl: str, config: Mapping[str, Any]) -> dict[str, Any]:
        return _encode.parse(impl, config)

    def encode_label(self, impl: str, config: Mapping[str, Any]) -> str:
        return _encode.label(impl, config)

    def encode_gate(self, impl: str, config: Mapping[str, Any], request: EncodeRequest) -> str | None:
        return _encode.gate(impl, config, request)

    def encode(self, impl: str, config: Mapping[str, Any], problem: EncodeProblem) -> EncodeResult:
        return _encode.encode(impl, config, problem)
