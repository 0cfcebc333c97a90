"""The Triton target: GPU kernels rendered from Jinja templates (``templates/``), one module per variant.

``variant.py`` holds the typed variant and its default space, ``render.py`` renders and loads the
modules, ``launch.py`` builds the sparse view and launches the decode, ``support.py`` says whether Triton
can run, ``compile_check.py`` compiles variants ahead of time for real GPUs. On CPU tensors the kernels
run only in Triton's interpreter (tests); such timings are never speed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from sae_tune.targets.base import (
    CallFacts,
    DecodeFn,
    EncodeProblem,
    EncodeRequest,
    EncodeResult,
    Gated,
    ModelProblem,
    SpaceRequest,
    Target,
)
from sae_tune.targets.triton.compile_facts import pruned_on
from sae_tune.targets.triton.support import triton_unavailable_reason
from sae_tune.targets.triton.variant import Variant

NAME = "triton"
MODEL_OPS = 3  # the default (chunked) pipeline: fill, decode, reduce; no host sync (docs/triton-model.md)
ENCODE_IMPL = "triton-encode"


class TritonTarget(Target):
    name = NAME
    impls = (NAME,)
    generated = True
    timed_kinds = ("cuda",)

    def available(self, device: torch.device) -> str | None:
        return triton_unavailable_reason(device)

    def parse(self, impl: str, config: Mapping[str, Any]) -> dict[str, Any]:
        return Variant.from_dict(config).to_dict()

    def label(self, impl: str, config: Mapping[str, Any]) -> str:
        try:
            return f"triton[{Variant.from_dict(config).name}]"
        except (TypeError, ValueError):
            return f"triton{dict(config)}"

    def space(self, request: SpaceRequest) -> list[tuple[str, dict[str, Any]]]:
        """The default variants, only where they run for real (CUDA): chunked, ``fallback`` and exact
        allocation for any L0; ``validate`` and ``unchecked`` only where no token can exceed max_l0 (TopK,
        k <= cap)."""
        if not self.timed(request.device) or request.dtype not in self.dtypes():
            return []
        k = request.topk_k
        caps = tuple(sorted(set(request.max_l0s) | ({k} if k else set())))
        space = Variant.search_space(request.F, request.D, request.dtype, max_l0s=caps, allow_unchecked=True)
        return [
            (NAME, v.to_dict())
            for v in space
            if overflow_impossible_or_handled(v, k)
            and pruned_on(v.name, request.dtype, request.device) is None  # spills with this Triton here
        ]

    def default(self, F: int, D: int, dtype: torch.dtype) -> tuple[str, dict[str, Any]] | None:
        return NAME, Variant().to_dict()

    def warm_starts(self, request: SpaceRequest) -> list[dict[str, Any]]:
        """Configs tried first: the default (chunked), and fixed slots with fallback at the largest cap."""
        cap = max(request.max_l0s) if request.max_l0s else Variant(alloc="fixed").max_l0
        return [Variant().to_dict(), Variant(alloc="fixed", overflow="fallback", max_l0=cap).to_dict()]

    def modelled(
        self, device: torch.device, dtype: torch.dtype, F: int, D: int
    ) -> list[tuple[str, dict[str, Any]]]:
        if not self.timed(device) or dtype not in self.dtypes():
            return []
        return [(NAME, Variant().to_dict())]

    def cost(self, impl: str, problem: ModelProblem, rates: Any) -> float:
        """The default variant: one pass over the activations, its slots, the fired rows, the units'
        fp32 partial sums (written and read) and the output."""
        from sae_tune.targets.triton.launch import n_chunks, n_units

        p, s, v = problem, problem.itemsize, Variant()
        slots = p.n_tokens * n_chunks(p.F, v) * v.chunk_slots * (4 + s)
        units = n_units(p.F, v)
        partials = 0 if units == 1 else 2 * p.n_tokens * units * p.D * 4
        moved = p.n_tokens * p.F * s + slots + p.nnz * p.D * s + partials + p.out_bytes
        return MODEL_OPS * rates.op_overhead + moved / rates.bandwidth

    def gate(self, impl: str, config: Mapping[str, Any], facts: CallFacts) -> Gated | str:
        reason = self.available(facts.device)
        if reason is not None:
            return reason
        if facts.dtype not in self.dtypes():
            return f"the generated kernels do not take {facts.dtype}"
        try:
            variant = Variant.from_dict(config)
        except (TypeError, ValueError) as exc:
            return f"not a valid variant: {exc}"
        policy = variant.overflow
        if variant.alloc == "fixed" and (
            policy == "validate" or (policy == "unchecked" and not facts.allow_truncation)
        ):
            safe = dataclasses.replace(variant, overflow="fallback")
            note = (
                f"; runs with overflow=fallback (tuned as {policy}) so tokens above max_l0={variant.max_l0} "
                "stay exact"
            )
            return Gated(NAME, safe.to_dict(), note)
        return Gated(NAME, variant.to_dict())

    def build(self, impl: str, config: Mapping[str, Any]) -> DecodeFn:
        """Runs the variant as given: ``gate`` has already made a truncating one safe or refused it."""
        from sae_tune.inputs import check_decode_inputs
        from sae_tune.targets.triton.launch import run_variant

        variant = Variant.from_dict(config)

        def run(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None) -> torch.Tensor:
            inputs = check_decode_inputs(acts, W_dec, b_dec)
            out = run_variant(inputs, variant, allow_truncation=variant.can_truncate)
            return out.reshape(*inputs.lead_shape, inputs.D)

        return run

    def render(self, impl: str, config: Mapping[str, Any], dtype: torch.dtype) -> str | None:
        from sae_tune.targets.triton.render import render

        return render(Variant.from_dict(config))

    def stale(self, key: Any, ident: Any) -> list[str]:
        out = [f"triton {key.triton_version}"] if key.triton_version != ident.triton_version else []
        return out + super().stale(key, ident)

    def source_hash(self) -> str:
        from sae_tune.targets.triton.render import template_hash

        return template_hash()

    # --- encode: a GEMM whose epilogue thresholds and compacts (encode.py, templates/encode.py.jinja) ---
    encode_impls = (ENCODE_IMPL,)

    def _encode_impl(self, impl: str) -> None:
        if impl != ENCODE_IMPL:
            raise ValueError(f"target {NAME!r} has no encode impl {impl!r}; it has {ENCODE_IMPL!r}")

    def encode_space(self, request: EncodeRequest) -> list[tuple[str, dict[str, Any]]]:
        """The encode candidates, the default first; only on CUDA (relu and jumprelu; TopK is refused)."""
        from sae_tune.targets.triton.encode import encode_space

        return [(ENCODE_IMPL, v.to_dict()) for v in encode_space(request)]

    def encode_parse(self, impl: str, config: Mapping[str, Any]) -> dict[str, Any]:
        from sae_tune.targets.triton.encode import EncodeVariant

        self._encode_impl(impl)
        return EncodeVariant.from_dict(config).to_dict()

    def encode_label(self, impl: str, config: Mapping[str, Any]) -> str:
        from sae_tune.targets.triton.encode import EncodeVariant

        try:
            return f"{ENCODE_IMPL}[{EncodeVariant.from_dict(config).name}]"
        except (TypeError, ValueError):
            return f"{ENCODE_IMPL}{dict(config)}"

    def encode_gate(self, impl: str, config: Mapping[str, Any], request: EncodeRequest) -> str | None:
        """None when the variant runs ``request`` exactly; TopK, other dtypes, no CUDA (outside the
        interpreter), grids past CUDA's limit and tiles past the GPU's shared memory are refused."""
        from sae_tune.targets.triton.encode import (
            EncodeVariant,
            grid_reason,
            shared_reason,
            unsupported_reason,
        )

        if impl != ENCODE_IMPL:
            return f"target {NAME!r} has no encode impl {impl!r}"
        try:
            variant = EncodeVariant.from_dict(config)
        except (TypeError, ValueError) as exc:
            return f"not a valid encode variant: {exc}"
        return (
            unsupported_reason(request)
            or grid_reason(request.n_tokens, request.F, variant)
            or shared_reason(variant, request.dtype, request.device)
        )

    def encode(self, impl: str, config: Mapping[str, Any], problem: EncodeProblem) -> EncodeResult:
        """Run one encode (one host sync: the CSR's size; see ``encode.run_encode``)."""
        from sae_tune.targets.triton.encode import EncodeVariant, run_encode

        self._encode_impl(impl)
        return run_encode(problem, EncodeVariant.from_dict(config))


def overflow_impossible_or_handled(variant: Variant, topk_k: int | None) -> bool:
    """May the tuner pick this variant? Chunked, ``fallback`` and exact allocation handle any L0; ``validate``
    (raises) and ``unchecked`` (truncates) only where no token can exceed max_l0: TopK with k <= max_l0."""
    if variant.alloc != "fixed" or variant.overflow == "fallback":
        return True
    return topk_k is not None and topk_k <= variant.max_l0
