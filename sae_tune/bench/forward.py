"""Table 8, the SAE forward: a SAELens JumpReLU SAE's whole forward, not just its decoder.

Modes (one SAE and one input per batch size, under ``torch.no_grad()``):
- ``unpatched``: SAELens's own forward (``with sae_tune.unpatched()``);
- ``decode-only``: SAELens's forward with only the decoder matmul routed through sae-tune's dispatcher
  (SAELens's dense encode; what a forward with an activation hook gets);
- ``sparse``: ``sae(x)`` after ``import sae_tune``: ``sparse_encode`` -> ``SparseActs`` -> decode, never a
  dense (tokens x features) tensor. A row says so, instead of a number, when the patched forward would not
  take that path.

Each mode runs once and its output is checked against the exact (fp64) decode of SAELens's own activations
(its encode of the whole batch; of chunks of tokens where the unpatched forward does not fit), within the
dtype's tolerance; a wrong or failing mode is reported and neither measured nor timed. Then one forward of
each mode measures its extra peak memory (``bench.memory.peak_bytes``: torch's allocator, CPU or CUDA), and
the modes are timed interleaved by the bench's timer (medians). The unpatched and decode-only forwards hold
four dense (B, F) tensors at once; where the free memory cannot hold them they are not run (the row says
how much they would need).

The SAE is built offline from a config (no hub): random weights, a threshold that lets about the spec's L0
features fire per N(0, 1) token, no input normalisation and no error term.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_tune.autotune.verify import Reference, check
from sae_tune.bench.config import ForwardCase
from sae_tune.bench.measure import ERROR, UNAVAILABLE, WRONG, Measurement, error_text, guard
from sae_tune.bench.memory import peak_bytes
from sae_tune.bench.problem import sparse_reference
from sae_tune.specs import SAESpec

if TYPE_CHECKING:
    from sae_tune.bench.tables import BenchContext

FORWARD = "sae_forward"
UNPATCHED, DECODE_ONLY, SPARSE = "unpatched", "decode-only", "sparse"
MODES = (UNPATCHED, DECODE_ONLY, SPARSE)
DOES_NOT_FIT = "does not fit"
# (tokens x F) elements of one chunk of the reference's dense encode: 64 MiB in float32
REFERENCE_ELEMENTS = 1 << 24
MIN_REFERENCE_ROWS = 64
# a dense forward runs only if its modelled extra memory is under this share of the free memory (the rest
# is headroom for what the model leaves out and for other processes)
FIT_SHARE = 0.8
CALIBRATION_TOKENS = 64


# --- the SAE and its input ------------------------------------------------------------------------------


def build_sae(spec: SAESpec, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """A SAELens ``JumpReLUSAE`` of ``spec``'s shape with seeded random weights, filled in place (building
    leaves no temporaries behind), and one threshold for all features that fires about ``spec.l0`` of
    them per N(0, 1) token."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    D, F = spec.d_model, spec.width
    cfg = JumpReLUSAEConfig(d_in=D, d_sae=F, dtype=str(dtype).removeprefix("torch."), device=str(device))
    sae = JumpReLUSAE(cfg)
    for p in sae.parameters():
        p.requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.normal_(generator=gen).div_(math.sqrt(D))
        sae.W_dec.normal_(generator=gen).div_(math.sqrt(D))
        sae.b_dec.normal_(generator=gen).div_(10)
        calib = torch.randn(CALIBRATION_TOKENS, D, generator=gen, device=device, dtype=dtype)
        pre = (sae.process_sae_in(calib) @ sae.W_enc + sae.b_enc).flatten().float()
        fired = min(pre.numel() - 1, round(spec.l0 * CALIBRATION_TOKENS))
        sae.threshold.fill_(pre.kthvalue(pre.numel() - fired).values.item())
    return sae


def make_input(
    spec: SAESpec, batch: int, device: torch.device, dtype: torch.dtype, seed: int
) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    return torch.randn(batch, spec.d_model, generator=gen, device=device, dtype=dtype)


def token_chunks(n_tokens: int, width: int) -> list[tuple[int, int]]:
    """Row blocks of the reference: about ``REFERENCE_ELEMENTS`` (tokens x F) each, none narrower than
    ``MIN_REFERENCE_ROWS`` (a short tail joins the block before it)."""
    step = max(MIN_REFERENCE_ROWS, REFERENCE_ELEMENTS // max(width, 1))
    starts = list(range(0, n_tokens, step))
    if len(starts) > 1 and n_tokens - starts[-1] < MIN_REFERENCE_ROWS:
        starts.pop()
    return [(s, starts[i + 1] if i + 1 < len(starts) else n_tokens) for i, s in enumerate(starts)]


def forward_reference(sae: Any, x: torch.Tensor, *, whole: bool = True) -> tuple[Reference, torch.Tensor]:
    """The exact (fp64) ``acts @ W_dec + b_dec`` of SAELens's own ``encode`` of ``x``, and each token's
    L0; the forward's exact result for the SAEs ``build_sae`` makes (no output normalisation, no error
    term). The fp64 decode runs over blocks of tokens.

    ``whole``: encode the batch in one call, exactly as the forward does (B x F memory). Else encode the
    blocks one by one (O(block x F) memory), for where the dense forward does not fit: on this project's
    CPU a GEMM over a block of >= 8 rows gives the same numbers as over the whole batch (checked), so the
    non-zeros are the forward's; a BLAS that rounds a block differently could move a feature across its
    threshold, and the check would then report the mode as wrong (a false alarm, never a hidden error).
    """
    dense = sae.encode(x) if whole else None
    values, scales, l0s = [], [], []
    for start, end in token_chunks(x.shape[0], sae.W_enc.shape[1]):
        acts = dense[start:end] if dense is not None else sae.encode(x[start:end])
        ref = sparse_reference(acts, sae.W_dec, sae.b_dec)
        values.append(ref.value)
        scales.append(ref.scale)
        l0s.append((acts != 0).sum(1))
        del acts
    del dense
    return Reference(torch.cat(values), torch.cat(scales)), torch.cat(l0s)


# --- the modes ------------------------------------------------------------------------------------------


def mode_runner(mode: str, sae: Any, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """One forward of ``sae`` on ``x`` in ``mode`` (sae-tune's SAELens patch must be active)."""
    import sae_tune
    from sae_tune.integrations.saelens import ORIGINAL

    if mode == UNPATCHED:

        def run() -> torch.Tensor:
            with sae_tune.unpatched():
                return sae(x)

        return run
    if mode == DECODE_ONLY:
        original = getattr(type(sae).forward, ORIGINAL)  # SAE.forward; its decode is the routed one
        return lambda: original(sae, x)
    if mode == SPARSE:
        return lambda: sae(x)
    raise ValueError(f"unknown SAE forward mode {mode!r}; expected one of {', '.join(MODES)}")


def mode_unavailable(mode: str, sae: Any, x: torch.Tensor) -> str | None:
    """Why ``mode`` cannot be measured as named (None when it can)."""
    from sae_tune.integrations import saelens, saelens_sparse

    if mode == UNPATCHED:
        return None
    if not saelens.is_patched(type(sae)) or not hasattr(type(sae).forward, saelens.ORIGINAL):
        return f"sae-tune's SAELens patch is not active on {type(sae).__name__}"
    if mode == SPARSE:
        reason = saelens_sparse.dense_reason(sae, x)
        if reason is not None:
            return f"the patched forward would run dense here: {reason}"
    return None


def dense_forward_bytes(batch: int, width: int, d_model: int, element_size: int) -> int:
    """Model of the extra peak of SAELens's JumpReLU forward: ``hidden_pre``, its ReLU, the float mask and
    their product are alive at once (four (B, F) tensors), plus (B, D) input, reconstruction and output."""
    return 4 * batch * width * element_size + 3 * batch * d_model * element_size


def free_bytes(device: torch.device, meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Memory a forward may still allocate: CUDA's free memory, Linux's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def fit_reason(
    spec: SAESpec, batch: int, device: torch.device, dtype: torch.dtype, free: int | None = None
) -> str | None:
    """Why a dense (unpatched or decode-only) forward must not run here: it would not fit in memory (on a
    CPU it would not fail cleanly: the kernel's out-of-memory killer ends the process). None if it fits
    or the free memory is unknown."""
    need = dense_forward_bytes(batch, spec.width, spec.d_model, torch.empty((), dtype=dtype).element_size())
    free = free_bytes(device) if free is None else free
    if free is None or need <= FIT_SHARE * free:
        return None
    return (
        f"{DOES_NOT_FIT}: SAELens's dense encode needs about {need / 1e9:.1f} GB (four (B, F) tensors), "
        f"{free / 1e9:.1f} GB free"
    )


# --- the table ------------------------------------------------------------------------------------------


def _base(case: ForwardCase, batch: int, l0: torch.Tensor | None) -> Measurement:
    spec = case.spec
    return Measurement(
        table=FORWARD,
        path="",
        metric="ms",
        value=None,
        unit="ms",
        shape=case.label,
        batch=batch,
        width=spec.width,
        d_model=spec.d_model,
        l0=spec.l0,
        l0_mean=None if l0 is None else round(l0.double().mean().item(), 2),
        l0_max=None if l0 is None else int(l0.max()),
    )


def _rows(template: Measurement, timed: bool) -> list[Measurement]:
    """The time row (if timed) and the memory row of a mode that was not measured."""
    memory = replace(template, metric="peak_bytes", unit="bytes")
    return [template, memory] if timed else [memory]


def measure_batch(ctx: BenchContext, case: ForwardCase, sae: Any, batch: int) -> list[Measurement]:
    """Check, measure the extra peak memory of, and (if the case is timed) time every mode at ``batch``."""
    device, dtype = ctx.device, ctx.dtype
    x = make_input(case.spec, batch, device, dtype, ctx.config.seed)
    dense_fit = fit_reason(case.spec, batch, device, dtype)
    reference, l0 = forward_reference(sae, x, whole=dense_fit is None)
    base = _base(case, batch, l0)
    done: dict[str, Measurement] = {}  # checked and measured: the memory row
    refused: dict[str, Measurement] = {}  # not available, failed or wrong
    runs: dict[str, Callable[[], object]] = {}
    round_ms = 0.0
    unpatched_out: torch.Tensor | None = None
    for mode in MODES:
        row = replace(base, path=mode)
        reason = mode_unavailable(mode, sae, x)
        if reason is None and mode != SPARSE:
            reason = dense_fit
        if reason is not None:
            refused[mode] = replace(row, status=UNAVAILABLE, note=reason)
            continue
        fn = mode_runner(mode, sae, x)
        try:
            out = fn()  # first call: fills caches, the dispatcher verifies its choice; checked, not measured
        except Exception as exc:  # out of memory, a missing kernel: reported, not raised
            refused[mode] = replace(row, status=ERROR, note=error_text(exc))
            continue
        diff = None
        if mode == UNPATCHED:
            unpatched_out = out
        if unpatched_out is not None and isinstance(out, torch.Tensor) and out.shape == unpatched_out.shape:
            diff = float((out.double() - unpatched_out.double()).abs().max()) if out.numel() else 0.0
        verdict = check(out, reference, dtype)
        del out
        if not verdict.ok:
            refused[mode] = replace(row, status=WRONG, max_abs_diff=diff, note=verdict.reason)
            continue
        try:
            started = time.perf_counter()
            nbytes, method = peak_bytes(fn, device)
            round_ms += (time.perf_counter() - started) * 1e3
        except Exception as exc:
            refused[mode] = replace(row, status=ERROR, note=f"while measuring memory: {error_text(exc)}")
            continue
        done[mode] = replace(
            row, metric="peak_bytes", unit="bytes", value=float(nbytes), max_abs_diff=diff, note=method
        )
        runs[mode] = fn
    del unpatched_out
    timings: dict[str, Any] = {}
    failures: dict[str, str] = {}
    if case.timed and runs:
        guarded = {mode: guard(mode, fn, failures) for mode, fn in runs.items()}
        timings = ctx.timer(guarded, round_ms)
    rows: list[Measurement] = []
    base_ms = timings[UNPATCHED].ms if UNPATCHED in timings and UNPATCHED not in failures else None
    base_peak = done[UNPATCHED].value if UNPATCHED in done else None
    for mode in MODES:
        if mode in refused:
            rows += _rows(refused[mode], case.timed)
            continue
        memory = done[mode]
        memory = replace(memory, of_baseline=memory.value / base_peak if base_peak else None)
        if case.timed:
            timed = replace(memory, metric="ms", unit="ms", value=None, of_baseline=None, note="")
            if mode in failures:
                timed = replace(timed, status=ERROR, note=f"failed while timed: {failures[mode]}")
            else:
                ms = timings[mode].ms
                ratio = ms / base_ms if base_ms else None
                timed = replace(timed, value=ms, of_baseline=ratio, spread=round(timings[mode].spread, 3))
            rows.append(timed)
        rows.append(memory)
    return rows


def sae_forward(ctx: BenchContext) -> list[Measurement]:
    """Table 8: every mode at every batch of every forward case."""
    try:
        import sae_lens  # noqa: F401
    except ImportError as exc:
        note = f"sae_lens cannot be imported ({exc}); install sae-lens for this table"
        return [
            row
            for case in ctx.config.forward_cases
            for batch in case.batches
            for mode in MODES
            for row in _rows(
                replace(_base(case, batch, None), path=mode, status=UNAVAILABLE, note=note), case.timed
            )
        ]
    import sae_tune

    rows: list[Measurement] = []
    with sae_tune.patched(), torch.no_grad():
        for case in ctx.config.forward_cases:
            spec = case.spec
            ctx.log(f"  {FORWARD}: {case.label} (F={spec.width}, D={spec.d_model}, L0={spec.l0})")
            try:
                sae = build_sae(spec, ctx.device, ctx.dtype, ctx.config.seed)
            except Exception as exc:
                note = f"building the SAE failed: {error_text(exc)}"
                for batch in case.batches:
                    for mode in MODES:
                        row = replace(_base(case, batch, None), path=mode, status=ERROR, note=note)
                        rows += _rows(row, case.timed)
                continue
            for batch in case.batches:
                ctx.log(f"  {FORWARD}: {case.label} B={batch}")
                rows += measure_batch(ctx, case, sae, batch)
            del sae
    return rows


__all__ = [
    "DECODE_ONLY",
    "FORWARD",
    "MODES",
    "SPARSE",
    "UNPATCHED",
    "build_sae",
    "fit_reason",
    "forward_reference",
    "measure_batch",
    "mode_runner",
    "sae_forward",
]
