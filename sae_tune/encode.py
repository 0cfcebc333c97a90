"""``sparse_encode``: an SAE encoder that writes its activations straight into a ``SparseActs``.

SAELens (and every SAE library) computes the pre-activations ``x @ W_enc + b_enc`` as a dense (B, F)
tensor, applies the activation to get another, and only then can anything find the few features that
fired. Here the encoder runs over F in chunks: a library GEMM ``x @ W_enc[:, chunk] + b_enc[chunk]``,
then the activation and the compaction of that chunk's non-zeros. Extra memory is O(B x chunk + nnz).

The non-zeros are SAELens's, bit for bit, wherever the BLAS computes a column slice of the GEMM
``x @ W_enc[:, s:e]`` as the same numbers as those columns of the full ``x @ W_enc``: then the chunk's
pre-activations are SAELens's and the activation is SAELens's expression. BLAS libraries block a GEMM and
split it between threads by its shape, so this holds for some shapes and not others, even on one machine:
on this project's CPU (MKL, 2 threads) B=8, D=512, F=3000 in chunks of 256 keep it, B=6, D=512, F=625 does
not (MKL splits the 625 columns between the threads; a few columns of the 256-wide chunks round
otherwise), nor does B=8, D=512, F=3000 with ``MKL_CBWR=COMPATIBLE`` (the last 4 columns of the first
thread's 1500 take another kernel); an Intel machine's MKL differed likewise.
``gemm_columns_exact`` probes it per shape (once per process); ``sparse_encode(..., exact=True)`` runs
the whole row (SAELens's very GEMM, B x F memory) where the probe finds a difference. Without it, a
feature can differ from SAELens's only by the GEMM's rounding: its value by a few units in the last place
of ``|x| @ |W_enc| + |b_enc|``, and whether it fires only where its pre-activation lies that close to
max(threshold, 0) (TopK: to the k-th largest pre-activation of its token).
The activations:
- ReLU (standard SAE): ``relu(pre)``;
- JumpReLU: ``relu(pre) * (pre > threshold)``: a non-zero where pre > max(threshold, 0); NaN and
  infinite pre-activations keep SAELens's exact result (NaN where its product is NaN);
- TopK: ``relu`` of the k largest pre-activations of each token (a running top-(k+1) over the chunks).
  Which of several features tied at the k-th largest positive value (or of more than k NaN ones)
  ``torch.topk`` keeps depends on the whole row, so a token with such a tie gets its full row in a second
  pass and ``torch.topk`` on it (rare in float32; frequent in bfloat16, where such tokens cost F values
  each and a second GEMM pass; a token whose input holds a NaN has a row of NaNs).
"""

from __future__ import annotations

import math
import threading

import torch

from sae_tune.inputs import resolved
from sae_tune.sparse_acts import VALUE_DTYPES, SparseActs
from sae_tune.targets.base import EncodeProblem, EncodeRequest, EncodeResult

# Pre-activation elements per chunk for the default chunk size: 16M (64 MiB in float32); measured on this
# project's CPU at B=1024, F=65536, narrower chunks (2048-4096 features) made the GEMM up to 1.3x slower,
# 16384 ran at the full GEMM's speed. The chunk size is tuned per device, dtype, shape and batch bucket
# (``sae_tune.autotune.encode_search``); this default runs where nothing is tuned.
CHUNK_ELEMENTS = 1 << 24
MIN_CHUNK = 256


def chunk_bounds(F: int, chunk: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering F in chunks of ``chunk``; a tail narrower than ``MIN_CHUNK`` joins
    the chunk before it (narrow GEMMs take other BLAS kernels, which round differently)."""
    starts = list(range(0, F, chunk))
    if len(starts) > 1 and F - starts[-1] < MIN_CHUNK:
        starts.pop()
    return [(s, starts[i + 1] if i + 1 < len(starts) else F) for i, s in enumerate(starts)]


def default_chunk(n_tokens: int, F: int) -> int:
    """Features per chunk when none is given: a power of two keeping B x chunk near ``CHUNK_ELEMENTS``."""
    if F <= 0:
        return 1
    per_token = CHUNK_ELEMENTS // max(n_tokens, 1)
    chunk = 1 << max(per_token, 1).bit_length() - 1
    return max(1, min(F, max(MIN_CHUNK, chunk)))


def _check(
    x: object,
    W_enc: object,
    b_enc: object,
    threshold: object,
    k: object,
    chunk: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the inputs; return the threshold as an (F,) tensor (or None)."""
    for name, t in (("x", x), ("W_enc", W_enc), ("b_enc", b_enc)):
        if t is None and name == "b_enc":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout is not torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.dtype not in VALUE_DTYPES:
            raise TypeError(f"{name} must have a floating dtype, got {t.dtype}")
    assert isinstance(x, torch.Tensor) and isinstance(W_enc, torch.Tensor)
    if W_enc.dim() != 2:
        raise ValueError(f"W_enc must be 2-D (D, F), got shape {tuple(W_enc.shape)}")
    D, F = W_enc.shape
    if x.dim() < 1 or x.shape[-1] != D:
        raise ValueError(
            f"x must have shape (..., {D}) to match W_enc {tuple(W_enc.shape)}, got {tuple(x.shape)}"
        )
    tensors = {"x": x, "W_enc": W_enc}
    if b_enc is not None:
        assert isinstance(b_enc, torch.Tensor)
        if b_enc.shape != (F,):
            raise ValueError(f"b_enc must have shape ({F},) to match W_enc, got {tuple(b_enc.shape)}")
        tensors["b_enc"] = b_enc
    if threshold is not None and k is not None:
        raise ValueError("give threshold (JumpReLU) or k (TopK), not both")
    thr: torch.Tensor | None = None
    if threshold is not None:
        if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
            thr = torch.full((F,), float(threshold), dtype=x.dtype, device=x.device)
        elif isinstance(threshold, torch.Tensor) and threshold.layout is torch.strided:
            if threshold.shape not in ((F,), ()):
                raise ValueError(
                    f"threshold must have shape ({F},) or be a scalar, got {tuple(threshold.shape)}"
                )
            thr = threshold.expand(F)
            tensors["threshold"] = threshold
        else:
            raise TypeError(f"threshold must be a float or a torch.Tensor of shape ({F},), got {threshold!r}")
    if k is not None and (type(k) is not int or not 1 <= k <= max(F, 1)):
        raise ValueError(f"k must be an int in [1, {F}] (the number of features), got {k!r}")
    if chunk is not None and (type(chunk) is not int or chunk < MIN_CHUNK):
        raise ValueError(
            f"chunk must be an int >= {MIN_CHUNK} or None, got {chunk!r} (narrower GEMMs take other BLAS "
            "kernels, whose rounding would differ from the SAE's own encode)"
        )
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(
            "x, W_enc, b_enc and threshold must have one dtype (as SAELens casts the input to the SAE's "
            "dtype), got " + ", ".join(f"{n} {d}" for n, d in dtypes.items())
        )
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(
            "x, W_enc, b_enc and threshold must be on one device, got "
            + ", ".join(f"{n} on {d}" for n, d in devices.items())
        )
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors.values()):
        raise RuntimeError(
            "sparse_encode has no backward; call it under torch.no_grad() (or torch.inference_mode()), "
            "or use the SAE's dense encode where gradients are needed"
        )
    return x, thr


def _gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The one GEMM of the encode, SAELens's ``x @ W_enc`` (tests put a BLAS that rounds otherwise here)."""
    return torch.matmul(x, w)


_COLUMNS_EXACT: dict[tuple[object, ...], bool] = {}
_COLUMNS_LOCK = threading.Lock()


def gemm_input(x: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor:
    """``x`` (..., D) as ``torch.matmul(x, W_enc)`` (SAELens's ``sae_in @ W_enc``) multiplies it, so that the
    chunks take its path: torch folds the lead dimensions into one GEMM over B rows (copying x where they
    cannot be viewed so) when x has at most 2 dimensions, is empty, W_enc requires grad (an SAE's
    parameter, even under no_grad) or the fold needs no copy; otherwise it runs a batched GEMM over the
    last lead dimension, whose numbers differ. That case keeps x's shape (the GEMMs then run on it)."""
    if x.dim() <= 2 or W_enc.requires_grad or x.numel() == 0:
        return x.reshape(-1, x.shape[-1])
    size, stride = x.shape, x.stride()
    if all(stride[i] == stride[i + 1] * size[i + 1] for i in range(x.dim() - 2)):
        return x.reshape(-1, x.shape[-1])
    return x


def _like(t: torch.Tensor, gen: torch.Generator, scale: float) -> torch.Tensor:
    """Seeded random values laid out in memory as ``t`` (its shape and strides), in its dtype and device."""
    extent = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
    base = (torch.randn(extent, generator=gen) * scale).to(t.dtype).to(t.device)
    return base.as_strided(t.shape, t.stride())


def gemm_columns_exact(x: torch.Tensor, W_enc: torch.Tensor, chunk: int) -> bool:
    """Whether this process's BLAS computes ``x @ W_enc[:, s:e]``, for the chunks of ``chunk_bounds(F,
    chunk)``, as the same numbers as columns s:e of the full ``x @ W_enc``: the premise of bitwise parity
    with SAELens. BLAS libraries pick kernels and thread splits by shape, so it is probed on seeded random
    data laid out as ``x`` (..., D) (give ``gemm_input``'s) and ``W_enc`` (D, F) are (one full GEMM: B x F
    values) and remembered per process for their shapes, strides, dtype, device and torch's threads."""
    if not isinstance(x, torch.Tensor) or not isinstance(W_enc, torch.Tensor) or x.dim() < 1:
        raise TypeError("gemm_columns_exact takes x (..., D) and W_enc (D, F) tensors")
    if W_enc.dim() != 2 or x.shape[-1] != W_enc.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and W_enc {tuple(W_enc.shape)} do not chain (..., D) @ (D, F)")
    if type(chunk) is not int or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    D, F = W_enc.shape
    bounds = chunk_bounds(F, min(chunk, F)) if F else [(0, 0)]
    if len(bounds) == 1 or x.numel() == 0:
        return True  # one GEMM over the whole row: SAELens's own call
    layout = (tuple(x.shape), x.stride(), W_enc.stride())
    key = (W_enc.device, W_enc.dtype, layout, F, chunk, torch.get_num_threads(), _gemm)
    with _COLUMNS_LOCK:
        known = _COLUMNS_EXACT.get(key)
    if known is not None:
        return known
    gen = torch.Generator().manual_seed(0x5AE)
    with torch.no_grad():
        x, w = _like(x, gen, 1.0), _like(W_enc, gen, 1 / max(D, 1) ** 0.5)
        full = _gemm(x, w)
        exact = all(torch.equal(_gemm(x, w[:, s:e]), full[..., s:e]) for s, e in bounds)
        del full
    with _COLUMNS_LOCK:
        _COLUMNS_EXACT[key] = exact
    return exact


def forget_column_checks() -> None:
    """Forget this process's ``gemm_columns_exact`` answers (tests: after changing the GEMM)."""
    with _COLUMNS_LOCK:
        _COLUMNS_EXACT.clear()


def _pre(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None, s: int, e: int) -> torch.Tensor:
    """``x @ W_enc[:, s:e] + b_enc[s:e]``: the same numbers as those columns of the full expression where
    ``gemm_columns_exact`` holds."""
    pre = _gemm(x, W_enc[:, s:e]).view(-1, e - s)  # x (..., D): gemm_input's
    if b_enc is not None:
        pre.add_(b_enc[s:e])
    return pre


def _threshold_chunk(pre: torch.Tensor, thr: torch.Tensor | None, thr_pos: torch.Tensor | None):
    """Flat positions and values of the chunk's non-zeros (row-major), as SAELens's activation gives them."""
    flat = pre.view(-1)
    if bool(torch.isfinite(pre.sum())):
        # all finite: relu(pre) * (pre > thr) is non-zero exactly where pre > max(thr, 0), and equals pre
        mask = pre > thr_pos if thr_pos is not None else pre > 0
        pos = mask.view(-1).nonzero().squeeze(1)
        return pos, flat[pos]
    acts = torch.relu(pre)  # SAELens's expression, with its NaNs
    if thr is not None:
        acts.mul_(pre > thr)
    pos = (acts != 0).view(-1).nonzero().squeeze(1)
    return pos, acts.view(-1)[pos]


def _csr_from_rows(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n_tokens: int, order: bool):
    """CSR offsets and rows sorted by token (stable: features stay ascending within a token)."""
    if order:
        perm = torch.argsort(rows, stable=True)
        rows, cols, vals = rows[perm], cols[perm], vals[perm]
    counts = torch.bincount(rows, minlength=n_tokens)
    offsets = torch.zeros(n_tokens + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets, cols, vals


def _encode_threshold(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None, thr: torch.Tensor | None, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, F = math.prod(x.shape[:-1]), W_enc.shape[1]
    thr_pos = None if thr is None else torch.clamp_min(thr, 0)  # NaN stays NaN: never fires
    rows, cols, vals = [], [], []
    for s, e in chunk_bounds(F, chunk):
        pre = _pre(x, W_enc, b_enc, s, e)
        pos, v = _threshold_chunk(
            pre, None if thr is None else thr[s:e], None if thr_pos is None else thr_pos[s:e]
        )
        rows.append(torch.div(pos, e - s, rounding_mode="floor"))
        cols.append(pos % (e - s) + s)
        vals.append(v)
        del pre
    return _csr_from_rows(torch.cat(rows), torch.cat(cols), torch.cat(vals), B, order=len(rows) > 1)


def _encode_topk(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor | None, k: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, F = math.prod(x.shape[:-1]), W_enc.shape[1]
    keep_n = min(k + 1, F)  # one more than k: a tie at the k-th value shows as v[k-1] == v[k]
    best_v: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    bounds = chunk_bounds(F, chunk)
    for s, e in bounds:
        pre = _pre(x, W_enc, b_enc, s, e)
        if len(bounds) == 1:  # the whole row: the very call SAELens makes
            best_v, best_i = torch.topk(pre, k=k, dim=-1, sorted=False)
            break
        v, i = torch.topk(pre, k=min(keep_n, e - s), dim=-1, sorted=False)
        del pre
        i = i + s
        if best_v is not None and best_i is not None:
            v, i = torch.cat((best_v, v), dim=1), torch.cat((best_i, i), dim=1)
            if v.shape[1] > keep_n:
                v, j = torch.topk(v, k=keep_n, dim=-1, sorted=False)
                i = i.gather(1, j)
        best_v, best_i = v, i
    assert best_v is not None and best_i is not None
    if best_v.shape[1] > k:
        best_v, best_i = _resolve_ties(x, W_enc, b_enc, k, bounds, best_v, best_i)
    idx, perm = best_i.sort(dim=1)
    vals = best_v.gather(1, perm).relu()
    keep = vals != 0  # NaN is kept, as in SAELens's scatter of relu(values)
    counts = keep.sum(1)
    offsets = torch.zeros(B + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets, idx[keep], vals[keep]


def _resolve_ties(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None,
    k: int,
    bounds: list[tuple[int, int]],
    v: torch.Tensor,
    i: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of the k+1 candidates per token. Where the k-th and (k+1)-th largest pre-activations are
    equal and positive, or both NaN (``torch.topk`` ranks NaN above +inf, so a token with more than k NaN
    pre-activations, e.g. one whose input holds a NaN, keeps k of them), which tied feature ``torch.topk``
    keeps depends on the whole row: those tokens get their full rows of pre-activations (a second pass of
    chunks, the same numbers) and ``torch.topk`` on them, as SAELens runs it. Ties at values <= 0 do not
    matter (ReLU zeroes them)."""
    v, order = torch.sort(v, dim=1, descending=True)  # NaN first, as torch.topk ranks it
    i = i.gather(1, order)
    tied = ((v[:, k - 1] == v[:, k]) & (v[:, k] > 0)) | v[:, k].isnan()
    v, i = v[:, :k].contiguous(), i[:, :k].contiguous()
    rows = tied.nonzero().squeeze(1)
    if rows.numel():
        full = torch.empty(rows.numel(), W_enc.shape[1], dtype=x.dtype, device=x.device)
        for s, e in bounds:
            full[:, s:e] = _pre(x, W_enc, b_enc, s, e).index_select(0, rows)
        tv, ti = torch.topk(full, k=k, dim=-1, sorted=False)
        v[rows], i[rows] = tv, ti
    return v, i


def encode_chunked(problem: EncodeProblem, chunk: int) -> EncodeResult:
    """The (offsets, indices, values) of ``problem`` with ``chunk`` features per GEMM (today's torch code,
    the library target's encode): every chunk >= ``MIN_CHUNK`` gives the same non-zeros bit for bit where
    ``gemm_columns_exact`` holds. ``problem.x`` may also be ``gemm_input``'s (..., D) tensor (a batched
    GEMM, as torch runs SAELens's for such an x)."""
    x, W, b = problem.x, problem.W_enc, problem.b_enc
    size = min(chunk, W.shape[1])
    with torch.no_grad():
        if problem.k is not None:
            return _encode_topk(x, W, b, problem.k, size)
        return _encode_threshold(x, W, b, problem.threshold, size)


def activation_of(threshold: object, k: object) -> str:
    """The encode request's activation for ``sparse_encode``'s arguments."""
    return "topk" if k is not None else "jumprelu" if threshold is not None else "relu"


def sparse_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor | None = None,
    *,
    threshold: torch.Tensor | float | None = None,
    k: int | None = None,
    chunk: int | None = None,
    exact: bool = False,
) -> SparseActs:
    """SAE feature activations of ``x`` (..., D) as a ``SparseActs``, never a dense (B, F) tensor.

    ``threshold`` (F,) gives a JumpReLU SAE, ``k`` a TopK SAE, neither a ReLU (standard) SAE; the
    non-zeros are exactly those of SAELens's ``encode`` given the processed input (``sae_in``). ``chunk``
    is the number of features per GEMM, at least 256; without it the encode the tuner measured fastest for
    this device, dtype, shape and batch size runs (``sae_tune.dispatch.encode_choice``), else about 16M
    pre-activations per chunk. Extra memory is O(B x chunk + nnz). All tensors must share one dtype and
    device; there is no backward.

    The non-zeros are SAELens's bit for bit where the BLAS computes a column slice of the GEMM as those
    columns of the full GEMM (``gemm_columns_exact``); elsewhere a feature can differ only by the GEMM's
    rounding (see the module's docstring). ``exact=True`` makes them SAELens's on every BLAS: the first
    call of a shape probes the BLAS (one B x F GEMM on random data, remembered per process) and, where
    the columns differ, runs the whole row at once (SAELens's very GEMM: B x F memory); it runs the
    library encode, never a tuned one.
    """
    if type(exact) is not bool:
        raise TypeError(f"exact must be a bool, got {type(exact).__name__}")
    x, thr = _check(x, W_enc, b_enc, threshold, k, chunk)
    D, F = W_enc.shape
    lead = tuple(x.shape[:-1])
    B = math.prod(lead)
    flat = gemm_input(resolved(x), W_enc)  # (B, D), or (..., D) where SAELens's GEMM is a batched one
    W = resolved(W_enc)
    b = None if b_enc is None else resolved(b_enc)
    if B == 0 or F == 0:
        empty = torch.zeros(B + 1, dtype=torch.int64, device=x.device)
        none = torch.zeros(0, dtype=torch.int64, device=x.device)
        return SparseActs._trusted(empty, none, torch.zeros(0, dtype=x.dtype, device=x.device), F, lead, k)
    problem = EncodeProblem(flat, W, b, thr, k)
    with torch.no_grad():
        if exact:
            size = min(chunk or default_chunk(B, F), F)
            if not gemm_columns_exact(flat, W, size):
                size = F  # this BLAS rounds a column slice otherwise: SAELens's one GEMM over the row
            offsets, indices, values = encode_chunked(problem, size)
        elif chunk is not None or flat.stride(-1) != 1 or flat.dim() != 2:
            # An x whose rows are not in memory order (e.g. transposed) runs the torch code on it as it is:
            # the GEMM of a copy can round differently (float16), and the encode contract's impls take
            # contiguous rows (B, D). So such an x, and one whose GEMM torch batches, keeps the untuned
            # default chunk.
            offsets, indices, values = encode_chunked(problem, chunk or default_chunk(B, F))
        else:
            from sae_tune.dispatch.encode_choice import run_encode

            request = EncodeRequest(B, F, D, x.dtype, x.device, activation_of(thr, k), k)
            offsets, indices, values = run_encode(request, problem)
    return SparseActs._trusted(offsets, indices, values, F, lead, k)
