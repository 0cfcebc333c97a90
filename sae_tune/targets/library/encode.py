"""The library target's encode: ``sae_tune.encode``'s torch code (a GEMM per chunk of features, then the
activation and the compaction of the chunk's non-zeros), with the chunk size as its one tuned parameter.

Every chunk size gives the same non-zeros bit for bit where the BLAS computes a column slice of >= 256
features as the same numbers as the full GEMM's columns (``sae_tune.encode.gemm_columns_exact``; elsewhere
they agree to the GEMM's rounding), so a chunk size changes only speed and memory: B x chunk
pre-activations at a time. "row" is the whole row of F features at once: SAELens's dense encode followed
by a scan, bitwise on every BLAS.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sae_tune.sparse_acts import VALUE_DTYPES
from sae_tune.targets.base import (
    ENCODE_ACTIVATIONS,
    ConfigFieldError,
    EncodeProblem,
    EncodeRequest,
    EncodeResult,
)
from sae_tune.targets.fields import is_pow2

IMPL = "torch_chunked"
ROW = "row"
MIN_CHUNK = 256  # narrower GEMMs take other BLAS kernels, which round differently (sae_tune.encode)
MAX_CHUNK = 1 << 26  # the cache's widest F
# Chunk sizes raced around the default: from a quarter of it up to four times it (and the whole row).
SPREAD = 4
# The whole row is raced only while its pre-activations stay below this many elements (1 GiB in fp32):
# beyond that, dense encode costs the memory sparse encoding exists to save.
ROW_MAX_ELEMENTS = 1 << 28


@dataclass(frozen=True)
class ChunkConfig:
    """Features per GEMM: a power of two >= 256, or "row" (all F at once: dense encode + scan)."""

    chunk: int | str

    def __post_init__(self) -> None:
        value = self.chunk
        if type(value) is str:
            if value != ROW:
                shown = repr(value) if len(value) <= 40 else repr(value[:37]) + "..."
                raise ConfigFieldError(
                    "chunk", f'must be a power of two >= {MIN_CHUNK} or "row", got {shown}'
                )
            return
        if type(value) is not int:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise ConfigFieldError("chunk", f'must be an int or "row", got {type(value).__name__} {shown}')
        if not MIN_CHUNK <= value <= MAX_CHUNK:
            shown = str(value) if value.bit_length() <= 64 else f"an int of {value.bit_length()} bits"
            raise ConfigFieldError("chunk", f'must be in [{MIN_CHUNK}, {MAX_CHUNK}] or "row", got {shown}')
        if not is_pow2(value):
            raise ConfigFieldError("chunk", f"must be a power of two, got {value}")

    @classmethod
    def parse(cls, config: Mapping[str, Any]) -> ChunkConfig:
        unknown = sorted(str(k) for k in config if k != "chunk")
        if unknown:
            raise ConfigFieldError(unknown[0], f"unknown field for {IMPL} (takes only 'chunk')")
        if "chunk" not in config:
            raise ConfigFieldError("chunk", f"missing: {IMPL} needs a chunk size")
        return cls(config["chunk"])

    def size(self, F: int) -> int:
        """Features per GEMM for a width of F."""
        return F if self.chunk == ROW else min(int(self.chunk), F)


def _config(chunk: int, F: int) -> dict[str, Any]:
    return {"chunk": ROW if chunk >= F else chunk}


def parse(impl: str, config: Mapping[str, Any]) -> dict[str, Any]:
    if impl != IMPL:
        raise ValueError(f"unknown library encode impl {impl!r} (known: {IMPL})")
    return {"chunk": ChunkConfig.parse(config).chunk}


def label(impl: str, config: Mapping[str, Any]) -> str:
    chunk = ChunkConfig.parse(config).chunk
    return f"{impl}[row]" if chunk == ROW else f"{impl}[chunk={chunk}]"


def default_config(request: EncodeRequest) -> dict[str, Any]:
    """What ``sparse_encode`` runs untuned: about 16M pre-activations per chunk (``default_chunk``)."""
    from sae_tune.encode import default_chunk

    return _config(default_chunk(request.n_tokens, request.F), request.F)


def space(request: EncodeRequest) -> list[tuple[str, dict[str, Any]]]:
    """The default chunk first, then powers of two within a factor of 4 of it, then the whole row."""
    if gate(IMPL, {"chunk": ROW}, request) is not None:
        return []
    first = default_config(request)
    size = ChunkConfig(first["chunk"]).size(request.F)
    out = [first]
    chunk = MIN_CHUNK
    while chunk < request.F and chunk <= MAX_CHUNK:
        if size // SPREAD <= chunk <= size * SPREAD and {"chunk": chunk} not in out:
            out.append({"chunk": chunk})
        chunk *= 2
    whole = {"chunk": ROW}
    if whole not in out and request.n_tokens * request.F <= ROW_MAX_ELEMENTS:
        out.append(whole)
    return [(IMPL, config) for config in out]


def gate(impl: str, config: Mapping[str, Any], request: EncodeRequest) -> str | None:
    """Torch runs every chunk size of every float dtype on every device exactly: only a request that is
    not an encode at all is refused."""
    if impl != IMPL:
        return f"unknown library encode impl {impl!r}"
    if request.activation not in ENCODE_ACTIVATIONS:
        return f"unknown activation {request.activation!r} (known: {', '.join(ENCODE_ACTIVATIONS)})"
    if (request.k is not None) != (request.activation == "topk"):
        return f"k={request.k!r} does not fit activation {request.activation!r}"
    if request.dtype not in VALUE_DTYPES:
        return f"{request.dtype} is not a floating dtype"
    return None


def encode(impl: str, config: Mapping[str, Any], problem: EncodeProblem) -> EncodeResult:
    from sae_tune.encode import encode_chunked

    if impl != IMPL:
        raise ValueError(f"unknown library encode impl {impl!r} (known: {IMPL})")
    size = ChunkConfig.parse(config).size(problem.W_enc.shape[1])
    return encode_chunked(problem, size)
