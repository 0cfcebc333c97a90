"""The CPU target's sparse encode: a library GEMM per chunk of features, then the C threshold + compaction.

Per chunk the pre-activations come from exactly the torch expression ``sae_tune.sparse_encode`` uses
(``x @ W_enc[:, s:e] + b_enc[s:e]``, the same numbers), so the non-zeros are the same bit for bit as the
library encode's at that chunk size (and SAELens's where ``sae_tune.encode.gemm_columns_exact`` holds). The C
kernels (templates/compact.c.jinja) then read the chunk once: per row, the count of fired features and
their (feature, value) pairs into slots sized from the density seen so far (a chunk that needs more slots
is written again at exact offsets); after the last chunk each row's segments are concatenated chunk by
chunk into the CSR. No (B, chunk) boolean mask, no ``nonzero``, no sort of all the non-zeros. A chunk
holding a NaN or infinite pre-activation is reported by the C scan and takes SAELens's own expression in
torch instead (``sae_tune.encode._threshold_chunk``), so even its NaN products are today's.

``CpuEncodeConfig`` is the only thing a cached config reaches; it is validated field by field
(``ConfigFieldError`` names the field).
"""

from __future__ import annotations

import ctypes
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sae_tune import forksafe
from sae_tune.targets.base import ConfigFieldError
from sae_tune.targets.cpu.build import CpuKernel, Signature, build_source
from sae_tune.targets.cpu.render import render_encode
from sae_tune.targets.fields import is_pow2

if TYPE_CHECKING:
    from sae_tune.targets.base import EncodeProblem, EncodeRequest, EncodeResult

IMPL = "cpu-encode"
ACTIVATIONS = ("relu", "jumprelu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_CHUNK = 256  # as sae_tune.encode: narrower GEMMs take other BLAS kernels, which round differently
MAX_CHUNK = 1 << 24
MAX_THREADS = 1024

_I64, _PTR, _I32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32
SIGNATURES: dict[str, Signature] = {
    "sae_tune_encode_scan": (
        (_I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _I32),
        _I32,
    ),
    "sae_tune_encode_write": ((_I64, _I64, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _I32), None),
    "sae_tune_encode_assemble": ((_I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I32), None),
}
# the scan's return codes (compact.c.jinja)
_WRITTEN, _NONFINITE, _TOO_FEW_SLOTS = 0, 1, 2
# slots of the first chunk's scan, as a fraction of its B x n pre-activations; later chunks get twice the
# density seen so far (a chunk that needs more takes a second, exact pass: never a dropped feature)
_FIRST_DENSITY = 1 / 16
_MIN_SLOTS = 4096


@dataclass(frozen=True)
class CpuEncodeConfig:
    """One configuration of the CPU encode.

    chunk    features per GEMM (a power of two >= 256; min(chunk, F) is used): extra memory is about
             B x chunk pre-activations; narrow chunks slow the GEMM, wide ones leave the cache.
    threads  OpenMP threads of the C kernels; 0 = all (torch.get_num_threads() at call time). The GEMM
             runs on torch's threads either way.
    """

    chunk: int = 16384
    threads: int = 0

    def __post_init__(self) -> None:
        if type(self.chunk) is not int or not MIN_CHUNK <= self.chunk <= MAX_CHUNK or not is_pow2(self.chunk):
            raise ConfigFieldError(
                "chunk", f"must be a power of two in [{MIN_CHUNK}, {MAX_CHUNK}], got {self.chunk!r}"
            )
        if type(self.threads) is not int or not 0 <= self.threads <= MAX_THREADS:
            raise ConfigFieldError("threads", f"must be an int in [0, {MAX_THREADS}], got {self.threads!r}")

    @property
    def name(self) -> str:
        return f"c-encode-c{self.chunk}-th{'all' if self.threads == 0 else self.threads}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CpuEncodeConfig:
        """Build from an outside mapping; an unknown key is a ConfigFieldError naming it."""
        if not isinstance(data, Mapping):
            raise ConfigFieldError("config", f"must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise ConfigFieldError(str(key), f"unknown field of {IMPL} (takes {sorted(known)})")
        return cls(**dict(data))


def default_chunk(n_tokens: int, F: int) -> int:
    """sparse_encode's default chunk as a power of two (B x chunk near 16M pre-activations), at most F's
    next power of two."""
    from sae_tune.encode import CHUNK_ELEMENTS

    per_token = max(CHUNK_ELEMENTS // max(n_tokens, 1), 1)
    chunk = max(MIN_CHUNK, 1 << per_token.bit_length() - 1)
    return min(chunk, max(MIN_CHUNK, 1 << max(F - 1, 1).bit_length()), MAX_CHUNK)


def space(request: EncodeRequest) -> list[CpuEncodeConfig]:
    """The default first, then a chunk half and twice as wide and a quarter as wide (distinct for F)."""
    first = default_chunk(request.n_tokens, request.F)
    cap = default_chunk(1, request.F)  # F's next power of two (wider chunks run the same single GEMM)
    chunks: list[int] = []
    for c in (first, first // 2, first * 2, first // 4):
        c = min(c, cap)
        if MIN_CHUNK <= c <= MAX_CHUNK and c not in chunks:
            chunks.append(c)
    return [CpuEncodeConfig(c) for c in chunks]


def gate(request: EncodeRequest) -> str | None:
    """None when the C encode runs ``request`` exactly, else why not (the config is checked by parse)."""
    if request.activation not in ACTIVATIONS:
        return f"{IMPL} runs ReLU and JumpReLU SAEs, not {request.activation!r}"
    if request.dtype not in DTYPES:
        return f"{IMPL} takes float32, float16 or bfloat16, not {request.dtype}"
    if request.device.type != "cpu":
        return f"{IMPL} runs on CPU tensors, not on {request.device}"
    return None


_built: dict[torch.dtype, CpuKernel] = {}


def build(dtype: torch.dtype) -> CpuKernel:
    """The loaded encode kernels for ``dtype``: compiled (or verified from disk) on first use, then kept."""
    kernel = _built.get(dtype)
    if kernel is None:
        kernel = _built[dtype] = build_source(render_encode(dtype), SIGNATURES)
    return kernel


def forget_built() -> None:
    """Forget this process's loaded encode kernels (tests: the next build goes back to the disk)."""
    _built.clear()


def _check(problem: EncodeProblem) -> None:
    if problem.k is not None:
        raise ValueError(f"{IMPL} runs ReLU and JumpReLU SAEs; a TopK SAE (k={problem.k}) needs another impl")
    x, W = problem.x, problem.W_enc
    if x.dtype not in DTYPES:
        raise TypeError(f"{IMPL} takes float32, float16 or bfloat16, not {x.dtype}")
    tensors = (("x", x), ("W_enc", W), ("b_enc", problem.b_enc), ("threshold", problem.threshold))
    for name, t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu":
            raise ValueError(f"{IMPL} runs on CPU tensors; {name} is on {t.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{IMPL}: {name} is {t.dtype} but x is {x.dtype} (one dtype for all)")
    if x.dim() != 2 or W.dim() != 2 or x.shape[1] != W.shape[0]:
        raise ValueError(f"{IMPL} needs x (B, D) and W_enc (D, F), got {tuple(x.shape)} and {tuple(W.shape)}")


def encode(config: CpuEncodeConfig, problem: EncodeProblem) -> EncodeResult:
    """(offsets int64 (B+1), indices int64 (nnz,), values (nnz,)): exactly ``sae_tune.sparse_encode``'s
    result for the same chunk size."""
    from sae_tune.encode import _pre, _threshold_chunk, chunk_bounds

    _check(problem)
    x, W, b, thr = problem.x, problem.W_enc, problem.b_enc, problem.threshold
    (B, _), F = x.shape, W.shape[1]
    if B == 0 or F == 0:
        return (
            torch.zeros(B + 1, dtype=torch.int64),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, dtype=x.dtype),
        )
    kernel = build(x.dtype)
    scan, write, assemble = (kernel.entries[n] for n in SIGNATURES)
    threads = forksafe.threads(config.threads or torch.get_num_threads())
    with torch.no_grad():  # as sparse_encode: clamped in the dtype (a NaN never fires), exact in fp32
        thr_pos = None if thr is None else torch.clamp_min(thr, 0)
        thr32 = None if thr_pos is None else thr_pos.float().contiguous()
    bounds = chunk_bounds(F, min(config.chunk, F))
    counts = torch.empty(len(bounds), B, dtype=torch.int64)
    starts = torch.empty(len(bounds), B, dtype=torch.int64)
    total = ctypes.c_int64(0)
    lists: list[tuple[torch.Tensor, torch.Tensor]] = []
    density, seen = _FIRST_DENSITY, 0
    with torch.no_grad():
        for c, (s, e) in enumerate(bounds):
            n = e - s
            pre = _pre(x, W, b, s, e).contiguous()
            thr_ptr = None if thr32 is None else thr32.data_ptr() + s * 4
            cap = min(B * n, max(_MIN_SLOTS, int(2 * density * B * n)))
            idx = torch.empty(cap, dtype=torch.int64)
            val = torch.empty(cap, dtype=x.dtype)
            cnt, first = counts[c].data_ptr(), starts[c].data_ptr()
            args = (B, n, s, pre.data_ptr(), n, thr_ptr, cnt, first)
            status = scan(*args, idx.data_ptr(), val.data_ptr(), cap, ctypes.byref(total), threads)
            if status == _NONFINITE:  # SAELens's expression, exactly as sparse_encode runs it
                pos, vals = _threshold_chunk(
                    pre, None if thr is None else thr[s:e], None if thr_pos is None else thr_pos[s:e]
                )
                counts[c] = torch.bincount(torch.div(pos, n, rounding_mode="floor"), minlength=B)
                starts[c] = torch.cumsum(counts[c], 0) - counts[c]
                idx, val = pos % n + s, vals.contiguous()
            elif status == _TOO_FEW_SLOTS:  # the counts are right: a second pass writes at exact offsets
                torch.cumsum(counts[c], 0, out=starts[c])
                starts[c] -= counts[c]
                idx = torch.empty(total.value, dtype=torch.int64)
                val = torch.empty(total.value, dtype=x.dtype)
                write(*args[:6], first, idx.data_ptr(), val.data_ptr(), threads)
            elif status != _WRITTEN:
                raise RuntimeError(f"{IMPL}: the C scan returned an unknown status {status}")
            lists.append((idx, val))
            seen += B * n
            density = float(counts[: c + 1].sum()) / seen
            del pre
    nnz = int(counts.sum())
    offsets = torch.empty(B + 1, dtype=torch.int64)
    indices = torch.empty(nnz, dtype=torch.int64)
    values = torch.empty(nnz, dtype=x.dtype)
    idx_ptrs = torch.tensor([idx.data_ptr() for idx, _ in lists], dtype=torch.int64)
    val_ptrs = torch.tensor([val.data_ptr() for _, val in lists], dtype=torch.int64)
    assemble(
        B,
        len(lists),
        counts.data_ptr(),
        starts.data_ptr(),
        idx_ptrs.data_ptr(),
        val_ptrs.data_ptr(),
        offsets.data_ptr(),
        indices.data_ptr(),
        values.data_ptr(),
        threads,
    )
    return offsets, indices, values
