"""The CPU target's face in the target contract (``sae_tune.targets.base.Target``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from sae_tune.targets.base import CallFacts, DecodeFn, Gated, ModelProblem, SpaceRequest, Target
from sae_tune.targets.cpu import variant as cpu_variant
from sae_tune.targets.cpu.variant import CpuVariant

if TYPE_CHECKING:
    from sae_tune.inputs import DecodeInputs
    from sae_tune.targets.base import EncodeProblem, EncodeRequest, EncodeResult

NAME = "cpu"
ENCODE_IMPL = "cpu-encode"


def _openmp() -> bool:
    """Whether this machine's compiler builds the kernels with OpenMP (False without a compiler)."""
    from sae_tune.targets.cpu.build import compiler

    cc = compiler()
    return not isinstance(cc, str) and cc.openmp


class CpuTarget(Target):
    name = NAME
    impls = (NAME,)
    generated = True
    timed_kinds = ("cpu",)

    def available(self, device: torch.device) -> str | None:
        from sae_tune.targets.cpu import available

        return available(device)

    def build_note(self, device: torch.device) -> str | None:
        """How the C kernels build here when that limits them, for explain(): no compiler (the dispatcher
        then has the library paths only) or a serial build (no OpenMP: every kernel runs on one thread)."""
        from sae_tune.targets.cpu.build import SERIAL_NOTE, compiler

        if torch.device(device).type != "cpu":
            return None
        cc = compiler()
        if isinstance(cc, str):
            working = "no C compiler" if cc.startswith("no C compiler") else "no working C compiler"
            return f"{working}: library paths only"
        return None if cc.openmp else SERIAL_NOTE

    def parse(self, impl: str, config: Mapping[str, Any]) -> dict[str, Any]:
        return CpuVariant.from_dict(config).to_dict()

    def label(self, impl: str, config: Mapping[str, Any]) -> str:
        try:
            return f"cpu[{CpuVariant.from_dict(config).name}]"
        except (TypeError, ValueError):
            return f"cpu{dict(config)}"

    def space(self, request: SpaceRequest) -> list[tuple[str, dict[str, Any]]]:
        if not self.timed(request.device) or request.dtype not in self.dtypes():
            return []
        variants = cpu_variant.search_space(request.F, request.D, request.dtype)
        if not _openmp():  # a serial build runs one thread whatever a variant asks: race each kernel once
            variants = list(dict.fromkeys(dataclasses.replace(v, threads=1) for v in variants))
        return [(NAME, v.to_dict()) for v in variants]

    def default(self, F: int, D: int, dtype: torch.dtype) -> tuple[str, dict[str, Any]] | None:
        if dtype not in self.dtypes():
            return None
        return NAME, cpu_variant.default_variant(F, D, dtype).to_dict()

    def modelled(
        self, device: torch.device, dtype: torch.dtype, F: int, D: int
    ) -> list[tuple[str, dict[str, Any]]]:
        if not self.timed(device) or dtype not in self.dtypes():
            return []
        return [(NAME, cpu_variant.default_variant(F, D, dtype).to_dict())]

    def cost(self, impl: str, problem: ModelProblem, rates: Any) -> float:
        """One call; the activations streamed once, the fired rows gathered, the output written once
        (the bias is fused)."""
        p, s = problem, problem.itemsize
        moved = p.n_tokens * p.F * s + p.nnz * p.D * s + p.out_bytes
        return rates.op_overhead + moved / rates.bandwidth

    def warm_starts(self, request: SpaceRequest) -> list[dict[str, Any]]:
        default = self.default(request.F, request.D, request.dtype)
        if default is None:
            return []
        return [default[1] if _openmp() else {**default[1], "threads": 1}]  # as in space()

    def gate(self, impl: str, config: Mapping[str, Any], facts: CallFacts) -> Gated | str:
        reason = self.available(facts.device)
        if reason is not None:
            return reason
        if facts.dtype not in self.dtypes():
            return f"the C kernels do not take {facts.dtype}"
        try:
            return Gated(NAME, CpuVariant.from_dict(config).to_dict())
        except (TypeError, ValueError) as exc:
            return f"not a valid CPU variant: {exc}"

    def build(self, impl: str, config: Mapping[str, Any]) -> DecodeFn:
        """Compiles (or loads the verified object of) the variant now, so no timing pays for it."""
        from sae_tune.inputs import check_decode_inputs
        from sae_tune.targets.cpu.launch import run_checked

        variant = CpuVariant.from_dict(config)

        def decode(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None) -> torch.Tensor:
            inputs = check_decode_inputs(acts, W_dec, b_dec)
            out = run_checked(variant, inputs)
            return out.reshape(*inputs.lead_shape, inputs.D)

        return decode

    def precompile(self, impl: str, config: Mapping[str, Any], dtype: torch.dtype) -> None:
        from sae_tune.targets.cpu.launch import build

        build(CpuVariant.from_dict(config), (dtype, None, dtype))

    def build_checked(self, impl: str, config: Mapping[str, Any]) -> Callable[[DecodeInputs], torch.Tensor]:
        from sae_tune.targets.cpu.launch import run_checked

        variant = CpuVariant.from_dict(config)
        return lambda inputs: run_checked(variant, inputs)

    def render(self, impl: str, config: Mapping[str, Any], dtype: torch.dtype) -> str | None:
        from sae_tune.targets.cpu.render import render

        return render(CpuVariant.from_dict(config), (dtype, None, dtype))

    def source_hash(self) -> str:
        from sae_tune.targets.cpu.render import template_hash

        return template_hash()

    # -- encode: torch's GEMM per chunk of features, then the C threshold + compaction ------------------

    encode_impls = (ENCODE_IMPL,)

    def _encode_config(self, impl: str, config: Mapping[str, Any]) -> Any:
        from sae_tune.targets.cpu.encode import CpuEncodeConfig

        if impl != ENCODE_IMPL:
            raise ValueError(f"the CPU target has no encode impl {impl!r} (it has {ENCODE_IMPL!r})")
        return CpuEncodeConfig.from_dict(config)

    def encode_space(self, request: EncodeRequest) -> list[tuple[str, dict[str, Any]]]:
        from sae_tune.targets.cpu import encode as cpu_encode

        if cpu_encode.gate(request) is not None or not self.timed(request.device):
            return []
        return [(ENCODE_IMPL, c.to_dict()) for c in cpu_encode.space(request)]

    def encode_parse(self, impl: str, config: Mapping[str, Any]) -> dict[str, Any]:
        return self._encode_config(impl, config).to_dict()

    def encode_label(self, impl: str, config: Mapping[str, Any]) -> str:
        try:
            return f"cpu[{self._encode_config(impl, config).name}]"
        except (TypeError, ValueError):
            return f"{impl}{dict(config) if isinstance(config, Mapping) else config!r}"

    def encode_gate(self, impl: str, config: Mapping[str, Any], request: EncodeRequest) -> str | None:
        from sae_tune.targets.cpu import encode as cpu_encode

        try:
            self._encode_config(impl, config)
        except ValueError as exc:
            field = getattr(exc, "field", None)
            return f"not a valid {ENCODE_IMPL} config: {f'{field}: ' if field else ''}{exc}"
        reason = self.available(request.device)
        return reason if reason is not None else cpu_encode.gate(request)

    def encode(self, impl: str, config: Mapping[str, Any], problem: EncodeProblem) -> EncodeResult:
        from sae_tune.targets.cpu import encode as cpu_encode

        return cpu_encode.encode(self._encode_config(impl, config), problem)
