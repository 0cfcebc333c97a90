"""Decode candidates built from stock torch ops, raced against the generated kernels.

They keep the tuner honest: dense ``acts @ W_dec`` is what the user had, and the library sparse paths
(CSR/COO sparse matmul, ``embedding_bag`` over the fired rows) are what a user could write in a few
lines. On CPU they are the whole race. Every path computes ``acts @ W_dec (+ b_dec)`` for acts of shape
(..., F), returns (..., D) in the dtype of the dense expression, and is exact (up to float summation
order). ``embedding_bag_topk`` gathers a fixed k slots per token: fast only when no token has more than
k non-zeros (a TopK SAE's promise), so it is marked ``can_truncate`` and gated on that promise; it
still checks the promise on every call and decodes a token above k exactly, because a promise can be
broken unseen (an edit through ``.data`` bypasses autograd's version counter).

Measured on this project's CPU (torch 2.13): ``torch.sparse.mm`` has no CSR kernel for float16 or
bfloat16 on CPU (MKL), so ``sparse_csr`` reports those dtypes unsupported instead of converting W_dec
(which would cost more than the dense product); COO sparse matmul and ``embedding_bag`` support every
float dtype.

Accumulation: a sum of many 16-bit terms rounded at every step drifts with the number of terms, so a
path whose error grows with the non-zeros per token could pass verification on a sparse batch and be
wrong on a denser one. ``embedding_bag`` accumulates fp16/bf16 in fp32 on CPU (measured: its error is
the dense product's at every L0); torch's COO ``sparse.mm`` does not (on CPU its bf16 error reaches
0.76 of the summed magnitudes at 4096 non-zeros per token), so ``sparse_coo`` multiplies 16-bit inputs
in fp32 over the fired rows only. A path whose accumulation is not known to be fp32 is marked
``density_sensitive`` for 16-bit dtypes: the dispatcher then trusts its verification only up to the
per-token L0 it was verified at.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from sae_tune.inputs import FLOAT_DTYPES, DecodeInputs, check_decode_inputs

HALF_DTYPES = (torch.float16, torch.bfloat16)

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class UnsupportedPathError(RuntimeError):
    """This path has no kernel for the given dtype or device; the tuner records a failed trial."""


# --- shared pieces --------------------------------------------------------------------------------------


def _finish(inputs: DecodeInputs, out: torch.Tensor) -> torch.Tensor:
    """Add the bias (promoting like ``out + b_dec``) and restore the leading dimensions of the input."""
    if inputs.b_dec is not None:
        out = out + inputs.b_dec
    return out.reshape(*inputs.lead_shape, inputs.D)


def _trivial(inputs: DecodeInputs) -> torch.Tensor | None:
    """The result when there is nothing to gather (no tokens or no features), else None."""
    if inputs.n_tokens and inputs.F:
        return None
    out = torch.zeros(inputs.n_tokens, inputs.D, dtype=inputs.W_dec.dtype, device=inputs.W_dec.device)
    return _finish(inputs, out)


def _named(fn: DecodeFn, name: str) -> DecodeFn:
    fn.__name__ = fn.__qualname__ = name
    return fn


# --- the paths ------------------------------------------------------------------------------------------


def dense(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """``acts @ W_dec + b_dec`` as written: the baseline every candidate must beat."""
    inputs = check_decode_inputs(acts, W_dec, b_dec)
    return _finish(inputs, inputs.acts @ inputs.W_dec)


def _csr(x: torch.Tensor) -> torch.Tensor:
    """``x.to_sparse_csr()`` without torch's one-time "CSR support is in beta" warning (it is noise
    to a user who never asked for CSR)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return x.to_sparse_csr()


def _sparse_mm(inputs: DecodeInputs, layout: str) -> torch.Tensor:
    x = inputs.acts
    # Checked up front (cached probe): torch skips the kernel for an all-zero input, so without this the
    # same path would work or fail depending on the data.
    if not _probe(layout, x.dtype, x.device):
        raise UnsupportedPathError(
            f"torch.sparse.mm has no {layout.upper()} kernel for {x.dtype} on {x.device.type} "
            f"in torch {torch.__version__}"
        )
    return torch.sparse.mm(_csr(x) if layout == "csr" else x.to_sparse(), inputs.W_dec)


def sparse_csr(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.sparse.mm`` on ``acts.to_sparse_csr()`` (MKL on CPU, cuSPARSE on CUDA)."""
    inputs = check_decode_inputs(acts, W_dec, b_dec)
    trivial = _trivial(inputs)
    return trivial if trivial is not None else _finish(inputs, _sparse_mm(inputs, "csr"))


def sparse_coo(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.sparse.mm`` on ``acts.to_sparse()`` (COO): the library sparse path that has half kernels.

    fp16/bf16 are multiplied in fp32 (``_coo_fp32``): torch's COO kernel accumulates in the input dtype,
    whose error grows with the non-zeros per token."""
    inputs = check_decode_inputs(acts, W_dec, b_dec)
    trivial = _trivial(inputs)
    if trivial is not None:
        return trivial
    if inputs.acts.dtype in HALF_DTYPES:
        return _finish(inputs, _coo_fp32(inputs))
    return _finish(inputs, _sparse_mm(inputs, "coo"))


def _coo_fp32(inputs: DecodeInputs) -> torch.Tensor:
    """COO ``sparse.mm`` in fp32 over the fired rows only (their fp32 copy costs unique-features x D, not
    F x D), rounded once to the input dtype: the accumulation ``embedding_bag`` and the kernels have."""
    x = inputs.acts
    if not _probe("coo", torch.float32, x.device):
        raise UnsupportedPathError(f"torch.sparse.mm has no COO kernel for float32 on {x.device.type}")
    coo = x.to_sparse()
    token, feature = coo.indices()
    fired, column = torch.unique(feature, sorted=True, return_inverse=True)
    rows = inputs.W_dec.index_select(0, fired).float()
    # (token, column) keeps to_sparse()'s sorted, duplicate-free order: the index map is monotone
    compact = torch.sparse_coo_tensor(
        torch.stack((token, column)),
        coo.values().float(),
        (x.shape[0], fired.numel()),
        is_coalesced=True,
        check_invariants=False,
    )
    return torch.sparse.mm(compact, rows).to(x.dtype)


def embedding_bag_csr(
    acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted sum of the fired W_dec rows per token: ``F.embedding_bag`` over a CSR view built by
    ``nonzero``. Exact for any L0; reads only B*L0 rows of W_dec."""
    inputs = check_decode_inputs(acts, W_dec, b_dec)
    trivial = _trivial(inputs)
    if trivial is not None:
        return trivial
    x = inputs.acts
    token, feature = x.nonzero().unbind(1)  # row-major order: tokens ascending
    counts = torch.bincount(token, minlength=inputs.n_tokens)
    offsets = torch.zeros(inputs.n_tokens + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    out = F.embedding_bag(
        feature,
        inputs.W_dec,
        offsets,
        mode="sum",
        per_sample_weights=x[token, feature],
        include_last_offset=True,
    )
    return _finish(inputs, out)


def embedding_bag_crow(
    acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.embedding_bag`` fed straight from ``to_sparse_csr()`` (crow_indices are the bag offsets)."""
    inputs = check_decode_inputs(acts, W_dec, b_dec)
    trivial = _trivial(inputs)
    if trivial is not None:
        return trivial
    csr = _csr(inputs.acts)
    out = F.embedding_bag(
        csr.col_indices(),
        inputs.W_dec,
        csr.crow_indices(),
        mode="sum",
        per_sample_weights=csr.values(),
        include_last_offset=True,
    )
    return _finish(inputs, out)


def _check_k(k: Any) -> int:
    if type(k) is not int or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return k


def embedding_bag_topk(k: int) -> DecodeFn:
    """Build the fixed-k path: ``topk`` of |acts| per token, then ``F.embedding_bag`` over the slots.

    It takes k + 1 slots: a token with at most k non-zeros has a zero weight in the extra slot, so
    the gathered sum is exact, and a token whose k + 1 slots all hold non-zeros broke the promise and is
    decoded again exactly (``embedding_bag_csr`` on those tokens). The check is computed from the slots
    the path already gathered; deciding whether any token broke it is one host sync (free on CPU).
    """
    k = _check_k(k)

    def run(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None) -> torch.Tensor:
        inputs = check_decode_inputs(acts, W_dec, b_dec)
        trivial = _trivial(inputs)
        if trivial is not None:
            return trivial
        x, W = inputs.acts, inputs.W_dec
        width = min(k + 1, inputs.F)
        slots = x.abs().topk(width, dim=1, sorted=False).indices
        weights = x.gather(1, slots)
        out = F.embedding_bag(slots, W, mode="sum", per_sample_weights=weights)
        if width > k:
            over = (weights != 0).all(1)  # k + 1 non-zeros found: this token has more than k
            if bool(over.any()):
                rows = over.nonzero().flatten()
                exact = embedding_bag_csr(x.index_select(0, rows), W)
                out = out.index_copy(0, rows, exact)
        return _finish(inputs, out)

    return _named(run, f"embedding_bag_topk[k={k}]")


def chunked(fn: DecodeFn, chunk: int) -> DecodeFn:
    """Run ``fn`` on at most ``chunk`` tokens at a time: bounds temporaries (nonzero, topk, CSR) and can
    keep the gathered rows in cache for large batches."""
    if type(chunk) is not int or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")

    def run(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None = None) -> torch.Tensor:
        inputs = check_decode_inputs(acts, W_dec, b_dec)
        x = inputs.acts
        if x.shape[0] <= chunk:
            out = fn(x, W_dec, b_dec)
        else:
            out = torch.cat([fn(x[i : i + chunk], W_dec, b_dec) for i in range(0, x.shape[0], chunk)])
        return out.reshape(*inputs.lead_shape, inputs.D)

    return _named(run, f"{getattr(fn, '__name__', 'decode')}[chunk={chunk}]")


# --- truncation checks ------------------------------------------------------------------------------------


def max_row_nnz(acts: torch.Tensor) -> int:
    """Largest number of non-zeros of one token in ``acts`` (..., F); 0 for no tokens. Syncs on CUDA."""
    if acts.numel() == 0:
        return 0
    return int(torch.count_nonzero(acts.reshape(-1, acts.shape[-1]), dim=1).max())


def would_truncate(acts: torch.Tensor, k: int) -> bool:
    """True if a token of this batch has more than k non-zeros (a cap of k would have to drop some)."""
    return max_row_nnz(acts) > _check_k(k)


# --- support probes ---------------------------------------------------------------------------------------


@functools.cache
def _probe(layout: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``torch.sparse.mm`` runs for this layout, dtype and device (tried once on a tiny input)."""
    try:
        x = torch.zeros(2, 4, dtype=dtype, device=device)
        x[0, 1] = 1
        sparse = _csr(x) if layout == "csr" else x.to_sparse()
        torch.sparse.mm(sparse, torch.ones(4, 3, dtype=dtype, device=device))
    except Exception:  # any failure (no kernel, no device) means "not supported here"
        return False
    return True


def _float_dtype(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype in FLOAT_DTYPES


def _csr_supported(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype in FLOAT_DTYPES and _probe("csr", dtype, device)


def _coo_supported(dtype: torch.dtype, device: torch.device) -> bool:
    return dtype in FLOAT_DTYPES and _probe("coo", dtype, device)


# --- registry ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchPath:
    """One torch-built decode candidate.

    factory       builds the decode function from ``params`` (a path without params is its own function).
    params        names of the build parameters the tuner must choose (e.g. ``("k",)``).
    can_truncate  True when the path may drop features (the tuner gates it like an unchecked variant).
    half_accumulation  True when the path may accumulate fp16/bf16 in that dtype (its error then grows
                  with the non-zeros per token: see ``density_sensitive``).
    """

    name: str
    factory: Callable[..., DecodeFn]
    params: tuple[str, ...] = ()
    can_truncate: bool = False
    summary: str = ""
    half_accumulation: bool = False
    _supports: Callable[[torch.dtype, torch.device], bool] = field(default=_float_dtype, repr=False)

    def supports(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> bool:
        """Whether this torch build can run the path for ``dtype`` on ``device`` (probed, cached)."""
        return self._supports(dtype, torch.device(device))

    def density_sensitive(self, dtype: torch.dtype) -> bool:
        """Whether a verification of this path on one batch says nothing about a denser one (its 16-bit
        accumulation drifts with the number of terms)."""
        return self.half_accumulation and dtype in HALF_DTYPES

    def build(self, *, chunk: int | None = None, **params: Any) -> DecodeFn:
        """The decode function for these parameters, optionally run ``chunk`` tokens at a time."""
        missing = sorted(set(self.params) - set(params))
        unknown = sorted(set(params) - set(self.params))
        if missing or unknown:
            raise ValueError(
                f"torch path {self.name!r} takes parameters {list(self.params)}; "
                f"missing {missing}, unknown {unknown}"
            )
        fn = self.factory(**params) if self.params else self.factory
        return chunked(fn, chunk) if chunk is not None else fn


TORCH_PATHS: dict[str, TorchPath] = {
    p.name: p
    for p in (
        TorchPath("dense", dense, summary="acts @ W_dec (BLAS): reads all of W_dec"),
        # cuSPARSE's accumulation dtype for half CSR is not checked here (CPU has no half CSR kernel)
        TorchPath(
            "sparse_csr",
            sparse_csr,
            summary="torch.sparse.mm on CSR",
            half_accumulation=True,
            _supports=_csr_supported,
        ),
        TorchPath("sparse_coo", sparse_coo, summary="torch.sparse.mm on COO", _supports=_coo_supported),
        TorchPath("embedding_bag_csr", embedding_bag_csr, summary="embedding_bag, bags from nonzero()"),
        TorchPath(
            "embedding_bag_crow", embedding_bag_crow, summary="embedding_bag, bags from to_sparse_csr()"
        ),
        TorchPath(
            "embedding_bag_topk",
            embedding_bag_topk,
            params=("k",),
            can_truncate=True,
            summary="topk(|acts|, k+1) + embedding_bag: fast if every token has <= k, exact re-decode if not",
        ),
    )
}
