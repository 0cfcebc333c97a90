"""Decode workloads for tuning: seeded synthetic activations with a realistic L0 spread, or real ones.

Which decode path wins depends on more than the mean L0: fixed-slot kernels pay for the heaviest
tokens of a batch, gathers pay for how many distinct W_dec rows a batch touches. A workload where every
token fires exactly the mean L0 of uniformly random features would favour the wrong candidates, so the
synthetic model here reproduces the three properties that matter (see ``synthetic_acts``), and
``calibrate_l0`` measures the same statistics on real activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_tune.specs import SAESpec

# Spread of the per-token L0 (sigma of the underlying normal); 0.5 puts p99 near 2.8x the mean and the
# heaviest tokens of a few thousand near 5x.
L0_SIGMA = 0.5
# Exponent of the Zipf law of feature firing frequencies (1.0: the r-th most frequent feature is drawn
# 1/r as often as the most frequent).
ZIPF_EXPONENT = 1.0
# Spread of per-feature JumpReLU thresholds (lognormal around 1.0).
THRESHOLD_SIGMA = 0.5

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Rows generated at once are limited so the random keys stay near 64 MiB of float32.
_CHUNK_ELEMS = 1 << 24


class WorkloadError(ValueError):
    """Activations that cannot be generated, loaded or calibrated; the message names the file or field."""


def _shape_of(spec_or_shape: SAESpec | tuple[int, int]) -> tuple[int, int, str]:
    """(width, l0, arch) from a spec or a ``(width, l0)`` pair."""
    if isinstance(spec_or_shape, SAESpec):
        return spec_or_shape.width, spec_or_shape.l0, spec_or_shape.arch
    if (
        isinstance(spec_or_shape, tuple)
        and len(spec_or_shape) == 2
        and all(type(v) is int for v in spec_or_shape)
    ):
        width, l0 = spec_or_shape
        if width < 1 or not 1 <= l0 <= width:
            raise WorkloadError(
                f"shape (width, l0) needs width >= 1 and 1 <= l0 <= width, got {spec_or_shape}"
            )
        return width, l0, "jumprelu"
    raise WorkloadError(f"expected an SAESpec or a (width, l0) tuple of ints, got {spec_or_shape!r}")


def token_l0s(
    n_tokens: int, mean_l0: int, width: int, *, sigma: float, generator: torch.Generator
) -> torch.Tensor:
    """Per-token non-zero counts: lognormal with mean ``mean_l0`` before rounding, clipped to [1, width]."""
    z = torch.randn(n_tokens, generator=generator, dtype=torch.float64)
    counts = torch.round(mean_l0 * torch.exp(sigma * z - sigma * sigma / 2))
    return counts.clamp_(1, width).to(torch.int64)


def _gumbel_topk(log_weight: torch.Tensor, rows: int, slots: int, g: torch.Generator) -> torch.Tensor:
    """``slots`` distinct features per row, a weighted draw without replacement (Gumbel-top-k)."""
    u = torch.rand(rows, log_weight.numel(), generator=g).clamp_(min=1e-30)
    return (log_weight - torch.log(-torch.log(u))).topk(slots, dim=1).indices


def _first_unique_draws(cdf: torch.Tensor, counts: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Per row, the first ``count`` distinct features of i.i.d. weighted draws, padded to max(counts).

    Keeping the first distinct values of draws with replacement is the same law as drawing without
    replacement (and as Gumbel-top-k), at a cost of O(L0) per token instead of O(F). Rows whose draws
    held too few distinct features are drawn again with twice as many; after that the caller falls back
    to Gumbel-top-k for them (returned rows with -1 entries).
    """
    rows, slots = counts.numel(), int(counts.max())
    out = torch.full((rows, slots + 1), -1, dtype=torch.int64)  # last column takes the discarded draws
    todo = torch.arange(rows)
    draws_per_row = 2 * slots + 16
    width = cdf.numel()
    while todo.numel() and draws_per_row <= 4 * width:
        u = torch.rand(todo.numel(), draws_per_row, generator=g, dtype=torch.float64) * cdf[-1]
        draws = torch.searchsorted(cdf, u).clamp_(max=width - 1)
        ordered, order = draws.sort(dim=1, stable=True)
        new = torch.ones_like(ordered, dtype=torch.bool)
        new[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        first = torch.zeros_like(new).scatter_(1, order, new)  # first occurrence, in draw order
        rank = first.cumsum(1)
        need = counts[todo]
        done = rank[:, -1] >= need
        keep = first & (rank <= need.unsqueeze(1)) & done.unsqueeze(1)
        column = torch.where(keep, rank - 1, torch.full_like(rank, slots))
        out[todo] = out[todo].scatter_(1, column, draws)
        todo = todo[~done]
        draws_per_row *= 2
    return out[:, :slots]


def synthetic_acts(
    spec_or_shape: SAESpec | tuple[int, int],
    batch_size: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    sigma: float = L0_SIGMA,
    zipf_exponent: float = ZIPF_EXPONENT,
) -> torch.Tensor:
    """Seeded SAE feature activations of shape (batch_size, width), the same for the same arguments.

    The model (all draws from one CPU generator seeded with ``seed``, then moved to ``device``):

    - per-token L0: ``round(L0 * exp(sigma * z - sigma^2 / 2))`` with z ~ N(0, 1), clipped to [1, F], so
      the mean stays near the SAE's L0 while some tokens fire several times as many features (p99 ~2.8x
      the mean at sigma=0.5). TopK SAEs fire exactly k per token.
    - which features: drawn without replacement with probability proportional to ``1 / rank^s`` (Zipf,
      s = ``zipf_exponent``), the ranks assigned to feature ids by a seeded permutation, so a few features
      fire in most tokens and most fire rarely, scattered over W_dec like real dense features.
    - values: positive. JumpReLU: ``theta_f * (1 + E)`` with a per-feature threshold theta_f ~
      LogNormal(0, 0.5) and E ~ Exp(1), i.e. a jump at the threshold and an exponential tail. ReLU and
      TopK: ``theta_f * (0.01 + E)``. Values are kept far from the dtype's underflow, so the number of
      non-zeros is exactly the drawn L0 in every float dtype.
    """
    width, l0, arch = _shape_of(spec_or_shape)
    if type(batch_size) is not int or batch_size < 0:
        raise WorkloadError(f"batch_size must be a non-negative int, got {batch_size!r}")
    if dtype not in FLOAT_DTYPES:
        raise WorkloadError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
    if type(seed) is not int:
        raise WorkloadError(f"seed must be an int, got {seed!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise WorkloadError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if not (math.isfinite(zipf_exponent) and zipf_exponent >= 0):
        raise WorkloadError(f"zipf_exponent must be a finite number >= 0, got {zipf_exponent!r}")

    g = torch.Generator(device="cpu").manual_seed(seed)
    ranks = torch.empty(width, dtype=torch.float64)
    ranks[torch.randperm(width, generator=g)] = torch.arange(1, width + 1, dtype=torch.float64)
    log_weight = -zipf_exponent * torch.log(ranks)
    cdf = torch.exp(log_weight).cumsum(0)
    theta = torch.exp(THRESHOLD_SIGMA * torch.randn(width, generator=g)).clamp_(0.05, 20.0)
    floor = 1.0 if arch == "jumprelu" else 0.01
    if arch == "topk":
        counts = torch.full((batch_size,), l0, dtype=torch.int64)
    else:
        counts = token_l0s(batch_size, l0, width, sigma=sigma, generator=g)

    out = torch.zeros(batch_size, width, dtype=dtype)
    if batch_size == 0:
        return out.to(device)
    slots = int(counts.max())
    idx = _first_unique_draws(cdf, counts, g)
    valid = torch.arange(slots) < counts.unsqueeze(1)
    failed = ((idx < 0) & valid).any(dim=1).nonzero().flatten()
    chunk = max(1, _CHUNK_ELEMS // width)
    for start in range(0, failed.numel(), chunk):  # rare: rows whose draws kept repeating hot features
        part = failed[start : start + chunk]
        idx[part] = _gumbel_topk(log_weight.float(), part.numel(), slots, g)
    tail = -torch.log(torch.rand(batch_size, slots, generator=g).clamp_(min=1e-30))
    token = torch.arange(batch_size).unsqueeze(1).expand(-1, slots)
    feature = idx[valid]
    out[token[valid], feature] = (theta[feature] * (floor + tail[valid])).to(dtype)
    return out.to(device)


# --- real activations -------------------------------------------------------------------------------


def _pick_tensor(obj: Any, path: Path, key: str | None) -> torch.Tensor:
    """The activation tensor of a loaded object: a tensor, or one entry of a mapping of tensors."""
    if isinstance(obj, torch.Tensor):
        if key is not None:
            raise WorkloadError(f"{path}: holds a single tensor, not a mapping; leave key unset")
        return obj
    if isinstance(obj, dict):
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if key is not None:
            if key not in tensors:
                raise WorkloadError(f"{path}: no tensor named {key!r}; it has {sorted(tensors) or 'none'}")
            return tensors[key]
        if len(tensors) == 1:
            return next(iter(tensors.values()))
        names = ", ".join(sorted(tensors)) or "none"
        raise WorkloadError(f"{path}: holds {len(tensors)} tensors ({names}); choose one with key=")
    raise WorkloadError(f"{path}: expected a tensor or a mapping of tensors, got {type(obj).__name__}")


def _read(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling refusals and corrupt files come as many types
            raise WorkloadError(
                f"{path}: cannot be read as tensors with torch.load(weights_only=True): {e}"
            ) from e
    if suffix == ".npy":
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)
        except Exception as e:
            raise WorkloadError(
                f"{path}: cannot be read as a .npy array (pickled arrays are refused): {e}"
            ) from e
        if array.dtype.kind != "f":
            raise WorkloadError(f"{path}: activations must be floating point, got numpy dtype {array.dtype}")
        return torch.from_numpy(array)
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise WorkloadError(
                f"{path}: reading .safetensors needs the 'safetensors' package (pip install safetensors)"
            ) from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:
            raise WorkloadError(f"{path}: not a valid safetensors file: {e}") from e
    raise WorkloadError(f"{path}: unsupported file type {suffix!r}; use .pt, .npy or .safetensors")


def load_acts(path: str | Path, *, key: str | None = None, width: int | None = None) -> torch.Tensor:
    """Load real feature activations as a (tokens, F) CPU tensor, refusing anything that is not one.

    Accepts .pt/.pth (``torch.load(weights_only=True)``; no arbitrary objects), .npy (no pickles) and
    .safetensors. A file holding several tensors needs ``key``. N-D activations (batch, seq, F) are
    flattened to tokens; sparse tensors are densified. ``width``, if given, must match F.
    """
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"{path}: no such file")
    acts = _pick_tensor(_read(path), path, key)
    if acts.layout != torch.strided:
        acts = acts.to_dense()
    if acts.dtype not in FLOAT_DTYPES:
        raise WorkloadError(
            f"{path}: activations must be float16, bfloat16, float32 or float64, got {acts.dtype}"
        )
    if acts.dim() < 2:
        raise WorkloadError(
            f"{path}: activations must be (tokens, F) or (..., F), got shape {tuple(acts.shape)}"
        )
    if acts.shape[-1] < 1:
        raise WorkloadError(f"{path}: activations have no features (shape {tuple(acts.shape)})")
    if width is not None and acts.shape[-1] != width:
        raise WorkloadError(f"{path}: activations have {acts.shape[-1]} features, the SAE has {width}")
    acts = acts.reshape(-1, acts.shape[-1])
    if not bool(torch.isfinite(acts).all()):
        bad = int((~torch.isfinite(acts)).sum())
        raise WorkloadError(f"{path}: {bad} activation value(s) are NaN or infinite")
    return acts.contiguous()


def random_weights(
    width: int, d_model: int, *, dtype: torch.dtype, device: torch.device | str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded W_dec (rows of norm ~1, like trained decoders) and b_dec; timings do not depend on values."""
    gen = torch.Generator().manual_seed(seed + 1)
    W = torch.randn(width, d_model, generator=gen, dtype=torch.float32).div_(math.sqrt(d_model))
    b = torch.randn(d_model, generator=gen, dtype=torch.float32).div_(10)
    return W.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype)


# --- calibration ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class L0Stats:
    """Per-token non-zero counts of a set of activations. Quantiles are observed counts (no interpolation)."""

    mean: float
    median: int
    p90: int
    p99: int
    p999: int
    max: int
    n_tokens: int = 0


def _observed_quantile(sorted_counts: torch.Tensor, q: float) -> int:
    """The smallest observed count with at least a fraction q of tokens at or below it."""
    n = sorted_counts.numel()
    return int(sorted_counts[min(n - 1, max(0, math.ceil(q * n) - 1))])


def calibrate_l0(acts: torch.Tensor) -> L0Stats:
    """Statistics of per-token L0 of ``acts`` (..., F), for choosing fixed-slot caps (``max_l0``)."""
    if not isinstance(acts, torch.Tensor):
        raise WorkloadError(f"acts must be a torch.Tensor, got {type(acts).__name__}")
    if acts.dim() < 2:
        raise WorkloadError(f"acts must be (tokens, F) or (..., F), got shape {tuple(acts.shape)}")
    counts = torch.count_nonzero(acts.reshape(-1, acts.shape[-1]), dim=1)
    if counts.numel() == 0:
        raise WorkloadError("cannot calibrate L0 on zero tokens")
    counts = counts.cpu().sort().values
    return L0Stats(
        mean=float(counts.double().mean()),
        median=_observed_quantile(counts, 0.5),
        p90=_observed_quantile(counts, 0.9),
        p99=_observed_quantile(counts, 0.99),
        p999=_observed_quantile(counts, 0.999),
        max=int(counts[-1]),
        n_tokens=counts.numel(),
    )


def max_l0_candidates(
    stats: L0Stats, *, multiple: int = 16, pow2: bool = False, limit: int | None = None
) -> tuple[int, ...]:
    """Slot caps to try for fixed allocation: p99, p99.9 and the max, rounded up, deduplicated, sorted.

    Rounding is to a multiple of ``multiple`` (a whole number of BLOCK_L steps), or to a power of two
    with ``pow2``. ``limit`` (e.g. the SAE width) caps every candidate.
    """
    if type(multiple) is not int or multiple < 1:
        raise WorkloadError(f"multiple must be a positive int, got {multiple!r}")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise WorkloadError(f"limit must be a positive int or None, got {limit!r}")
    caps = set()
    for q in (stats.p99, stats.p999, stats.max):
        q = max(1, q)
        cap = 1 << (q - 1).bit_length() if pow2 else -(-q // multiple) * multiple
        caps.add(min(cap, limit) if limit is not None else cap)
    return tuple(sorted(caps))
