"""The target contract: one face for every way sae-tune can run a decode (and, optionally, an encode).

A target owns one or more implementation names (what the cache stores as ``impl``) and turns a config
(a JSON object from the cache, an imported file or the tuner) into running code. The tuner, the cache's
validation, the dispatcher, ``show-kernel`` and ``bench`` loop over ``sae_tune.targets.TARGETS`` and call
only these members; nothing outside a target's own package names it as a special case.

A config reaches code only through ``parse``, which builds the target's frozen, validated variant type, so
a value read from a file can never put anything into a template that is not one of the target's known
words or numbers.

The encode members (``encode_impls`` ... ``encode``) are the same contract for ``sparse_encode``: their
implementation names are stored under the cache's encode ops, their configs reach code only through
``encode_parse``, and the defaults here say "no encode code", so a target without one needs nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sae_tune.dispatch.costmodel import Rates
    from sae_tune.inputs import DecodeInputs

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

#: an encode's result: CSR ``offsets`` int64 (B+1), ``indices`` int64 (nnz,) ascending within each token,
#: ``values`` (nnz,) in x's dtype: the non-zeros SAELens's ``encode`` gives, none dropped
EncodeResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

#: the encode activations a target may be asked for
ENCODE_ACTIVATIONS = ("relu", "jumprelu", "topk")


class ConfigFieldError(ValueError):
    """A config field a target refuses; ``field`` names it (the cache reports ``config.<field>``)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field = field


@dataclass(frozen=True)
class SpaceRequest:
    """What a tuning job asks a target for: its shape, dtype, device, batch bucket and overflow facts.

    ``topk_k`` is set for a TopK SAE (no token has more than k non-zeros); ``max_l0s`` are the high
    quantiles of the workload's per-token L0 (caps for fixed-slot variants).
    """

    F: int
    D: int
    dtype: torch.dtype
    device: torch.device
    batch_bucket: int
    max_l0s: tuple[int, ...] = ()
    topk_k: int | None = None


@dataclass(frozen=True)
class CallFacts:
    """What one call allows: its device and dtype, and the caller's promise about per-token L0."""

    device: torch.device
    dtype: torch.dtype
    k: int | None = None
    allow_truncation: bool = False

    def bounded_by(self, cap: int) -> bool:
        """True when no token of this call can have more than ``cap`` non-zeros (or truncation is allowed)."""
        return self.allow_truncation or (self.k is not None and self.k <= cap)


@dataclass(frozen=True)
class Gated:
    """A config as it may run for a call (perhaps made safer), with a note for ``explain()``."""

    impl: str
    config: dict[str, Any]
    note: str = ""


@dataclass(frozen=True)
class ModelProblem:
    """What the cost model prices: one decode of ``n_tokens`` tokens at a mean L0."""

    n_tokens: int
    F: int
    D: int
    mean_l0: float
    itemsize: int
    has_bias: bool = True

    @property
    def nnz(self) -> float:
        return self.n_tokens * self.mean_l0

    @property
    def out_bytes(self) -> int:
        return self.n_tokens * self.D * self.itemsize


@dataclass(frozen=True)
class EncodeRequest:
    """What a tuning job or one call asks an encode for: the shape, dtype, device and activation.

    Candidates and gates depend on these facts only (never on the tensors), so a request is a cache key's
    worth of information: ``n_tokens`` is B (rows of x after flattening), ``activation`` is "relu"
    (standard SAE), "jumprelu" or "topk", and ``k`` is set iff the activation is "topk".
    """

    n_tokens: int
    F: int
    D: int
    dtype: torch.dtype
    device: torch.device
    activation: str
    k: int | None = None


@dataclass(frozen=True)
class EncodeProblem:
    """One validated encode, resolved (no neg/conj bits), every tensor of one dtype and on one device:
    ``x`` (B, D) with contiguous rows, ``W_enc`` (D, F), ``b_enc`` (F,) or None, ``threshold`` (F,) for a
    JumpReLU SAE (else None) and ``k`` for a TopK SAE (else None). Impls may trust all of this."""

    x: torch.Tensor
    W_enc: torch.Tensor
    b_enc: torch.Tensor | None
    threshold: torch.Tensor | None
    k: int | None


class Target(ABC):
    """One way to run a decode. Subclasses live in ``sae_tune/targets/<name>/``."""

    #: the target's name, as the CLI and the docs say it
    name: str
    #: implementation names this target stores in the cache
    impls: tuple[str, ...]
    #: True when the target renders source code from templates (``render`` returns text)
    generated: bool = False
    #: device types on which its timings are speeds (Triton on CPU runs in an interpreter: not one)
    timed_kinds: tuple[str, ...] = ("cpu", "cuda")

    def owns(self, impl: str) -> bool:
        return impl in self.impls

    @abstractmethod
    def available(self, device: torch.device) -> str | None:
        """None when the target can run on ``device``, else a sentence saying why not."""

    def build_note(self, device: torch.device) -> str | None:
        """A short note on how this target builds on ``device`` when it runs limited there (e.g. "serial
        build (no OpenMP): 1 thread"), for ``explain()``; None when it builds fully or has no build."""
        return None

    def timed(self, device: torch.device) -> bool:
        """Whether this target can be timed on ``device`` here, as a speed."""
        return device.type in self.timed_kinds and self.available(device) is None

    def dtypes(self) -> tuple[torch.dtype, ...]:
        """Input dtypes the target's code takes."""
        return (torch.float32, torch.float16, torch.bfloat16)

    @abstractmethod
    def parse(self, impl: str, config: Mapping[str, Any]) -> dict[str, Any]:
        """The canonical config of ``impl`` (through the typed variant); TypeError/ValueError if invalid."""

    @abstractmethod
    def label(self, impl: str, config: Mapping[str, Any]) -> str:
        """A short readable name of one config."""

    @abstractmethod
    def space(self, request: SpaceRequest) -> list[tuple[str, dict[str, Any]]]:
        """The default candidates of a tuning job, as (impl, config) pairs; empty where it cannot run."""

    def baselines(self, dtype: torch.dtype, device: torch.device) -> list[str]:
        """Implementations always timed at their defaults as references (the library paths)."""
        return []

    def warm_starts(self, request: SpaceRequest) -> list[dict[str, Any]]:
        """Configs the tuner tries first (the target's default variant)."""
        return []

    def default(self, F: int, D: int, dtype: torch.dtype) -> tuple[str, dict[str, Any]] | None:
        """The config an untuned shape runs (cost model, warm starts), or None."""
        return None

    def modelled(
        self, device: torch.device, dtype: torch.dtype, F: int, D: int
    ) -> list[tuple[str, dict[str, Any]]]:
        """The configs the cost model may choose for an untuned shape (priced by ``cost``)."""
        return []

    def cost(self, impl: str, problem: ModelProblem, rates: Rates) -> float:
        """Predicted seconds of one decode by ``impl`` (bytes over bandwidth plus per-op overhead)."""
        raise ValueError(f"the cost model has no formula for {impl!r}")

    @abstractmethod
    def gate(self, impl: str, config: Mapping[str, Any], facts: CallFacts) -> Gated | str:
        """The config as it may run for this call, or the reason it may not run."""

    @abstractmethod
    def build(self, impl: str, config: Mapping[str, Any]) -> DecodeFn:
        """A callable ``(acts (..., F), W_dec, b_dec) -> (..., D)`` in the dense expression's dtype."""

    def density_sensitive(self, impl: str, config: Mapping[str, Any], dtype: torch.dtype) -> bool:
        """True when the code's rounding error grows with the non-zeros per token (it accumulates in a
        16-bit dtype): a verification then holds only up to the per-token L0 it was made at."""
        return False

    def build_checked(self, impl: str, config: Mapping[str, Any]) -> Callable[[DecodeInputs], torch.Tensor]:
        """The decode as a function of inputs that ``check_decode_inputs`` already validated (the
        dispatcher's hot path), returning (tokens, D); a target may skip re-checking what that covers."""
        fn = self.build(impl, config)
        return lambda inputs: fn(inputs.acts, inputs.W_dec, inputs.b_dec)

    def precompile(self, impl: str, config: Mapping[str, Any], dtype: torch.dtype) -> None:
        """Build the code of one config for ``dtype`` now (``compile-check``); raises on a build error.
        Library paths have nothing to build."""
        return None

    def render(self, impl: str, config: Mapping[str, Any], dtype: torch.dtype) -> str | None:
        """The source a person can read, for generated targets; None for library paths."""
        return None

    def stale(self, key: Any, ident: Any) -> list[str]:
        """What differs between the software a record (cache ``key``) was measured with and this
        process's (``ident``), as far as this target's code is concerned."""
        from sae_tune.targets import templates_hash

        if self.generated and key.template_hash != templates_hash():
            return ["older kernel templates"]
        return []

    def source_hash(self) -> str:
        """A hash of the target's templates (part of every cache key); empty for library paths."""
        return ""

    # -- encode (sparse_encode): optional; a target with no encode code keeps these defaults ----------

    #: implementation names this target stores in the cache for the encode ops
    encode_impls: tuple[str, ...] = ()

    def owns_encode(self, impl: str) -> bool:
        return impl in self.encode_impls

    def encode_space(self, request: EncodeRequest) -> list[tuple[str, dict[str, Any]]]:
        """The encode candidates for ``request`` as (impl, config) pairs; the first is this target's
        default for it; empty where the target cannot run it (the default: no encode code)."""
        return []

    def encode_parse(self, impl: str, config: Mapping[str, Any]) -> dict[str, Any]:
        """The canonical config of encode ``impl`` through the target's frozen typed variant;
        ``ConfigFieldError(field, reason)`` when a field is invalid (the cache names ``config.<field>``)."""
        raise ValueError(f"target {getattr(self, 'name', type(self).__name__)!r} has no encode impl {impl!r}")

    def encode_label(self, impl: str, config: Mapping[str, Any]) -> str:
        """A short readable name of one encode config (for ``explain`` and tables)."""
        canon = self.encode_parse(impl, config)
        return impl + "".join(f" {k}={v}" for k, v in canon.items())

    def encode_gate(self, impl: str, config: Mapping[str, Any], request: EncodeRequest) -> str | None:
        """None when this config can run ``request`` exactly (the same non-zeros, none dropped), else the
        reason it may not. The default refuses: a target says what it can run."""
        return f"target {getattr(self, 'name', type(self).__name__)!r} has no encode code"

    def encode(self, impl: str, config: Mapping[str, Any], problem: EncodeProblem) -> EncodeResult:
        """Run one encode: the (offsets, indices, values) of the problem's non-zeros."""
        raise ValueError(f"target {getattr(self, 'name', type(self).__name__)!r} has no encode impl {impl!r}")
