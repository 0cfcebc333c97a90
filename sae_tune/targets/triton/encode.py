"""The Triton encode: a GEMM whose epilogue applies the activation and compacts the non-zeros.

``EncodeVariant`` is one validated point of the family (tile sizes, GROUP_M swizzle, slots per pair,
launch options); ``encode_space`` the candidates of a request; ``render_encode`` / ``load_encode_module``
render ``templates/encode.py.jinja`` through the same content-addressed, hash-checked artefact path as the
decode modules; ``encode_launch`` / ``finish_launch`` build the launches (shared with ``encode_compile``)
and ``run_encode`` runs them. Exactness for any L0 and the one host sync are described in ``run_encode``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from sae_tune import __version__
from sae_tune.artefacts import sha256_hex
from sae_tune.inputs import KERNEL_DTYPES, dtype_names
from sae_tune.targets.base import ConfigFieldError, EncodeProblem, EncodeRequest, EncodeResult
from sae_tune.targets.fields import is_pow2
from sae_tune.targets.templating import environment
from sae_tune.targets.triton import compile_facts
from sae_tune.targets.triton.launch import Launch, device_guard
from sae_tune.targets.triton.render import (
    TEMPLATE_DIR,
    Rendered,
    exec_rendered,
    template_hash,
    verified_file,
)
from sae_tune.targets.triton.support import interpreter_active, triton_unavailable_reason

ENCODE_TEMPLATE = "encode.py.jinja"
GRID_LIMIT = (1 << 31) - 1  # CUDA's bound on a grid's first dimension
ACTIVATIONS = ("relu", "jumprelu")  # TopK is refused by the gate: the library path runs it

# Inclusive bounds of every field, and whether it must be a power of two (tl.arange and tl.dot need it).
_FIELDS: dict[str, tuple[int, int, bool]] = {
    "block_m": (16, 256, True),
    "block_n": (16, 256, True),
    "block_k": (16, 128, True),
    "group_m": (1, 64, False),
    "slots": (1, 256, True),
    "num_stages": (1, 5, False),
    "num_warps": (1, 16, True),
}


@dataclass(frozen=True)
class EncodeVariant:
    """One point of the encode family.

    block_m x block_n  the output tile of one program (tokens x features); block_k the GEMM's K step.
    group_m            row tiles that walk the column tiles together (W_enc tiles stay in L2).
    slots              slots per (token, block_n tile) pair; a pair with more non-zeros is recomputed by
                       the finish kernel (exact, costs a second GEMM of that tile).
    num_stages / num_warps  launch options of both kernels (the same for both: see ``run_encode``).
    """

    block_m: int = 64
    block_n: int = 128
    block_k: int = 32
    group_m: int = 8
    slots: int = 16
    num_stages: int = 3
    num_warps: int = 8

    def __post_init__(self) -> None:
        for name, (lo, hi, pow2) in _FIELDS.items():
            value = getattr(self, name)
            if type(value) is not int:
                raise ConfigFieldError(name, f"EncodeVariant.{name} must be an int, got {value!r}")
            if not lo <= value <= hi:
                raise ConfigFieldError(name, f"EncodeVariant.{name} must be in [{lo}, {hi}], got {value}")
            if pow2 and not is_pow2(value):
                raise ConfigFieldError(name, f"EncodeVariant.{name} must be a power of two, got {value}")
        if self.slots > self.block_n:
            raise ConfigFieldError(
                "slots", f"EncodeVariant.slots={self.slots} exceeds block_n={self.block_n} (a pair's width)"
            )

    @property
    def name(self) -> str:
        """Short, stable, readable name (a cache and CLI identifier)."""
        return (
            f"enc-m{self.block_m}-n{self.block_n}-k{self.block_k}-g{self.group_m}-s{self.slots}"
            f"-st{self.num_stages}-w{self.num_warps}"
        )

    def template_params(self) -> dict[str, int]:
        """What the template sees; num_stages and num_warps are launch options, not source."""
        return {
            "block_m": self.block_m,
            "block_n": self.block_n,
            "block_k": self.block_k,
            "group_m": self.group_m,
            "slots": self.slots,
        }

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncodeVariant:
        """Build from an outside mapping; an unknown key is a ConfigFieldError naming it."""
        if not isinstance(data, Mapping):
            raise TypeError(f"an encode variant must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigFieldError(str(key), f"unknown encode variant field {key!r}")
        return cls(**dict(data))


# Elements of the output tile one thread holds (block_m * block_n / (32 * num_warps)): the epilogue keeps
# the activations, their ranks and 64-bit store addresses per element, so the space stays at or under 32
# (64 x 128 on 4 warps, 64 per thread, spills 520 bytes on sm_90; on 8 warps none: encode_compile).
TILE_ELEMS_PER_THREAD = 32

# A modest space: the default first, then tile shapes for few and many tokens, more or fewer slots.
_SPACE = (
    EncodeVariant(),
    EncodeVariant(slots=32),
    EncodeVariant(slots=8),
    EncodeVariant(block_m=128, block_n=64, block_k=32, num_warps=8),
    EncodeVariant(block_m=128, block_n=64, block_k=64, num_warps=8, num_stages=3),
    EncodeVariant(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3),
    EncodeVariant(block_m=64, block_n=64, block_k=32, num_warps=4, num_stages=4, group_m=4),
    EncodeVariant(block_m=32, block_n=128, block_k=64, num_warps=4),
    EncodeVariant(block_m=16, block_n=128, block_k=64, num_warps=4, num_stages=4),
    EncodeVariant(block_m=16, block_n=64, block_k=128, num_warps=2, num_stages=3, slots=8),
)


# fp32 runs on FFMA (IEEE, never tf32): K tiles of 64 and more spill on sm_80 (592 to 4,744 bytes,
# ``sae-tune compile-check --op encode --arch sm_80 --dtype float32``), so fp32 keeps BLOCK_K <= 32.
FP32_MAX_BLOCK_K = 32


def for_dtype(variant: EncodeVariant, dtype: torch.dtype) -> bool:
    """Whether ``variant`` is in the space for ``dtype`` (fp32: BLOCK_K <= FP32_MAX_BLOCK_K)."""
    return dtype != torch.float32 or variant.block_k <= FP32_MAX_BLOCK_K


def all_variants(dtype: torch.dtype) -> tuple[EncodeVariant, ...]:
    """Every variant of the encode space for ``dtype`` before shape and device filters (what
    ``compile-check --op encode`` compiles)."""
    return tuple(v for v in _SPACE if for_dtype(v, dtype))


def unsupported_reason(request: EncodeRequest) -> str | None:
    """None when the Triton encode can run ``request`` exactly, else why not."""
    if request.activation not in ACTIVATIONS:
        if request.activation == "topk":
            return "the Triton encode has no TopK epilogue yet; the library encode runs TopK SAEs"
        return f"unknown activation {request.activation!r}; the Triton encode runs relu and jumprelu"
    if request.dtype not in KERNEL_DTYPES:
        return f"the Triton encode takes {dtype_names(KERNEL_DTYPES)}, not {request.dtype}"
    return triton_unavailable_reason(request.device)


def encode_space(request: EncodeRequest, *, interpreter: bool = False) -> list[EncodeVariant]:
    """The candidates of ``request``, the default first: only on CUDA (where timings are speeds), or on
    CPU in Triton's interpreter when ``interpreter`` asks for it (tests). Tiles larger than the problem
    are left out (the default always stays), and so are variants that spill with the installed Triton on
    the device's architecture (``compile_facts``)."""
    if unsupported_reason(request) is not None:
        return []
    if request.device.type != "cuda" and not (interpreter and interpreter_active()):
        return []
    m_cap = max(16, 1 << max(request.n_tokens - 1, 0).bit_length())
    n_cap = max(16, 1 << max(request.F - 1, 0).bit_length())
    limit = shared_limit(request.device)
    return [
        v
        for i, v in enumerate(all_variants(request.dtype))
        if (i == 0 or (v.block_m <= m_cap and v.block_n <= n_cap))
        and (limit is None or shared_estimate(v, request.dtype) <= limit)
        and compile_facts.pruned_on(v.name, request.dtype, request.device) is None
    ]


def shared_estimate(variant: EncodeVariant, dtype: torch.dtype) -> int:
    """An upper estimate of either kernel's shared memory (bytes): num_stages copies of the x and W_enc
    tiles (sm_90's pipeline holds all of them, earlier GPUs one fewer) or the epilogue's conversion of the
    fp32 tile (8 bytes per element), whichever is larger; ``encode_compile`` reports the real number."""
    v = variant
    item = torch.empty((), dtype=dtype).element_size()
    return max(
        v.num_stages * (v.block_m * v.block_k + v.block_k * v.block_n) * item, v.block_m * v.block_n * 8
    )


def shared_limit(device: torch.device) -> int | None:
    """Shared memory one block may use on ``device`` (None off CUDA: the interpreter has no limit)."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


def shared_reason(variant: EncodeVariant, dtype: torch.dtype, device: torch.device) -> str | None:
    """None when the variant's tiles fit the device's shared memory (by ``shared_estimate``), else why."""
    limit = shared_limit(device)
    need = shared_estimate(variant, dtype)
    if limit is not None and need > limit:
        return (
            f"encode variant {variant.name} may need {need} bytes of shared memory in {dtype}, more than "
            f"{device} offers a block ({limit}); use smaller tiles or fewer stages"
        )
    return None


# --- render and load (the decode modules' artefact path: content address, hash check, private folder) ---
_env = environment(TEMPLATE_DIR)


def _digest(params: Mapping[str, int]) -> str:
    key = json.dumps(dict(params), sort_keys=True)
    return hashlib.sha256(f"{template_hash()}|encode|{key}|{__version__}".encode()).hexdigest()[:24]


@functools.cache
def rendered_encode(variant: EncodeVariant) -> Rendered:
    """The generated module of ``variant`` (re-validated: only known ints reach the template)."""
    if not isinstance(variant, EncodeVariant):
        raise TypeError(f"expected an EncodeVariant, got {type(variant).__name__}")
    params = EncodeVariant(**dataclasses.asdict(variant)).template_params()
    if any(type(v) is not int for v in params.values()):
        raise ValueError(f"template parameters must be ints, got {params}")
    source = _env.get_template(ENCODE_TEMPLATE).render(
        **params, version=__version__, template_hash=template_hash()
    )
    return Rendered(f"sae_tune_encode_{_digest(params)}", source, sha256_hex(source.encode()))


def render_encode(variant: EncodeVariant) -> str:
    """The generated module source of ``variant``, for people (``show-kernel``)."""
    return rendered_encode(variant).source


@functools.cache
def load_encode_module(variant: EncodeVariant) -> ModuleType:
    """Import the generated module of ``variant`` from its checked text (never re-read from disk).

    The file in the private kernel folder is (re)written when it does not hold exactly what the template
    renders (a warning names an edited or planted file); Triton reads the kernels' source through
    ``linecache``, which holds the checked text.
    """
    kernel = rendered_encode(variant)
    loaded = sys.modules.get(kernel.name)
    if loaded is not None and getattr(loaded, "__sae_tune_sha256__", None) == kernel.sha256:
        return loaded
    module = exec_rendered(kernel, verified_file(kernel, "encode module"))
    module.__sae_tune_sha256__ = kernel.sha256  # type: ignore[attr-defined]
    return module


# --- launches -----------------------------------------------------------------------------------------
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def n_tiles(B: int, F: int, variant: EncodeVariant) -> tuple[int, int]:
    """(row tiles, column tiles) of a (B, F) encode."""
    return _cdiv(B, variant.block_m), _cdiv(F, variant.block_n)


def grid_reason(B: int, F: int, variant: EncodeVariant) -> str | None:
    """None when a (B, F) encode's tiles fit one grid (and its slot offsets int64), else why not."""
    tiles_m, tiles_n = n_tiles(B, F, variant)
    if tiles_m * tiles_n > GRID_LIMIT:
        return (
            f"an encode of {B} tokens x {F} features needs {tiles_m * tiles_n} tiles of "
            f"{variant.block_m}x{variant.block_n}, more than a grid takes ({GRID_LIMIT}); use larger tiles "
            "or fewer tokens per call"
        )
    return None


def _grid(B: int, F: int, variant: EncodeVariant) -> tuple[int]:
    reason = grid_reason(B, F, variant)
    if reason is not None:
        raise ValueError(reason)
    tiles_m, tiles_n = n_tiles(B, F, variant)
    return (tiles_m * tiles_n,)


def _head(problem: EncodeProblem) -> tuple[Any, ...]:
    x, W, b, thr = problem.x, problem.W_enc, problem.b_enc, problem.threshold
    return (x, W, x if b is None else b, x if thr is None else thr)


def _tail(problem: EncodeProblem) -> tuple[Any, ...]:
    x, W, b, thr = problem.x, problem.W_enc, problem.b_enc, problem.threshold
    B, D = x.shape
    F = W.shape[1]
    return (
        B,
        F,
        D,
        x.stride(0),
        x.stride(1),
        W.stride(0),
        W.stride(1),
        0 if b is None else b.stride(0),
        0 if thr is None else thr.stride(0),
    )


def encode_launch(
    problem: EncodeProblem,
    variant: EncodeVariant,
    counts: torch.Tensor,
    slot_cols: torch.Tensor,
    slot_vals: torch.Tensor,
) -> Launch:
    """The first kernel: GEMM + activation into the pairs' slots and counts."""
    B, F = problem.x.shape[0], problem.W_enc.shape[1]
    return Launch(
        "encode_kernel",
        _grid(B, F, variant),
        (*_head(problem), counts, slot_cols, slot_vals, *_tail(problem)),
        _constexprs(problem),
        variant.num_warps,
        variant.num_stages,
    )


def finish_launch(
    problem: EncodeProblem,
    variant: EncodeVariant,
    counts: torch.Tensor,
    slot_cols: torch.Tensor,
    slot_vals: torch.Tensor,
    starts: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
) -> Launch:
    """The second kernel: slots into the CSR, over-full pairs recomputed. Same grid and options as the
    first, so a recomputed tile is the same compiled arithmetic."""
    B, F = problem.x.shape[0], problem.W_enc.shape[1]
    args = (*_head(problem), counts, slot_cols, slot_vals, starts, indices, values, *_tail(problem))
    return Launch(
        "finish_kernel",
        _grid(B, F, variant),
        args,
        _constexprs(problem),
        variant.num_warps,
        variant.num_stages,
    )


def _constexprs(problem: EncodeProblem) -> dict[str, bool]:
    """Bias, JumpReLU, and (Triton's interpreter only, whose dot reads bf16 operands as raw integer bits)
    bf16 dot operands widened to fp32 first: bf16 products are exact in fp32, so the same product."""
    upcast = problem.x.dtype == torch.bfloat16 and problem.x.device.type != "cuda" and interpreter_active()
    has = {"HAS_BIAS": problem.b_enc is not None, "JUMP": problem.threshold is not None}
    return {**has, "UPCAST_DOT": upcast}


def _run(variant: EncodeVariant, launch: Launch) -> None:
    kernel = getattr(load_encode_module(variant), launch.kernel)
    kernel[launch.grid](
        *launch.args, **launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages
    )


@dataclass(frozen=True)
class SlotStage:
    """What the first kernel leaves: per-pair counts (B x tiles_n, int32) and the pairs' slots."""

    counts: torch.Tensor
    slot_cols: torch.Tensor
    slot_vals: torch.Tensor


def check_problem(problem: EncodeProblem) -> None:
    """Refuse what the kernels cannot read, with a message naming it (a problem built by hand)."""
    x, W = problem.x, problem.W_enc
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton encode takes {dtype_names(KERNEL_DTYPES)}; x is {x.dtype}")
    if problem.k is not None:
        raise ValueError("the Triton encode has no TopK epilogue; the library encode runs TopK SAEs")
    if x.dim() != 2 or W.dim() != 2 or x.shape[1] != W.shape[0]:
        raise ValueError(f"x (B, D) and W_enc (D, F) do not match: {tuple(x.shape)}, {tuple(W.shape)}")
    for name, t in (("W_enc", W), ("b_enc", problem.b_enc), ("threshold", problem.threshold)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{name} is {t.dtype} on {t.device}; x is {x.dtype} on {x.device}")
    reason = triton_unavailable_reason(x.device)
    if reason is not None:
        raise RuntimeError(reason)


def encode_slots(problem: EncodeProblem, variant: EncodeVariant) -> SlotStage:
    """The first kernel only (no sync): counts and slots, for the CSR pass and for tests."""
    check_problem(problem)
    B, F = problem.x.shape[0], problem.W_enc.shape[1]
    pairs = B * n_tiles(B, F, variant)[1]
    dev = {"device": problem.x.device}
    with device_guard(problem.x.device):
        counts = torch.empty(pairs, dtype=torch.int32, **dev)
        slot_cols = torch.empty(pairs * variant.slots, dtype=torch.int32, **dev)
        slot_vals = torch.empty(pairs * variant.slots, dtype=problem.x.dtype, **dev)
        if pairs:
            _run(variant, encode_launch(problem, variant, counts, slot_cols, slot_vals))
    return SlotStage(counts, slot_cols, slot_vals)


def run_encode(problem: EncodeProblem, variant: EncodeVariant) -> EncodeResult:
    """(offsets, indices, values) of the problem's non-zeros: CSR, features ascending in each token.

    Exact for any L0: a pair's first ``slots`` non-zeros go through its slots; a pair with more is finished
    by the finish kernel, which recomputes that tile with the same jitted code, tile shape and launch
    options as the first kernel (the same arithmetic, so the same non-zeros in the same order) and writes
    the rest straight into the CSR, never outside the pair's counted range. No atomics: deterministic.

    Host sync: exactly one, ``int(ends[-1])`` below, the CSR's nnz that the output's allocation needs.
    """
    check_problem(problem)
    x = problem.x
    B, F = x.shape[0], problem.W_enc.shape[1]
    dev = {"device": x.device}
    if B == 0 or F == 0:
        return (
            torch.zeros(B + 1, dtype=torch.int64, **dev),
            torch.zeros(0, dtype=torch.int64, **dev),
            torch.zeros(0, dtype=x.dtype, **dev),
        )
    tiles_n = n_tiles(B, F, variant)[1]
    with device_guard(x.device):
        stage = encode_slots(problem, variant)
        ends = stage.counts.cumsum(0)  # int64
        starts = ends - stage.counts
        offsets = torch.cat([starts[::tiles_n], ends[-1:]])
        nnz = int(ends[-1])  # the one host sync: the CSR's size
        indices = torch.empty(nnz, dtype=torch.int64, **dev)
        values = torch.empty(nnz, dtype=x.dtype, **dev)
        if nnz:
            launch = finish_launch(
                problem, variant, stage.counts, stage.slot_cols, stage.slot_vals, starts, indices, values
            )
            _run(variant, launch)
    return offsets, indices, values


def representative_launches(
    variant: EncodeVariant,
    F: int,
    D: int,
    dtype: torch.dtype,
    B: int = 4096,
    activation: str = "jumprelu",
    with_bias: bool = True,
) -> list[Launch]:
    """Both launches of ``variant`` for a (B, D) x (D, F) encode on meta tensors: the arguments a real
    call passes, for ahead-of-time compilation with Triton's launch specialisation."""
    meta = {"device": "meta"}
    x = torch.empty((B, D), dtype=dtype, **meta)
    W = torch.empty((D, F), dtype=dtype, **meta)
    b = torch.empty((F,), dtype=dtype, **meta) if with_bias else None
    thr = torch.empty((F,), dtype=dtype, **meta) if activation == "jumprelu" else None
    problem = EncodeProblem(x, W, b, thr, None)
    pairs = B * n_tiles(B, F, variant)[1]
    counts = torch.empty(pairs, dtype=torch.int32, **meta)
    cols = torch.empty(pairs * variant.slots, dtype=torch.int32, **meta)
    vals = torch.empty(pairs * variant.slots, dtype=dtype, **meta)
    starts = torch.empty(pairs, dtype=torch.int64, **meta)
    indices = torch.empty(B * 64, dtype=torch.int64, **meta)
    values = torch.empty(B * 64, dtype=dtype, **meta)
    return [
        encode_launch(problem, variant, counts, cols, vals),
        finish_launch(problem, variant, counts, cols, vals, starts, indices, values),
    ]
