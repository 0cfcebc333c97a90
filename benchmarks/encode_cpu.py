"""sparse_encode on CPU: today's torch threshold + compaction against the C target's kernels.

    python benchmarks/encode_cpu.py                              # gemma-2b-l20: D=2304, F=16384 and 65536
    python benchmarks/encode_cpu.py --F 65536 --rounds 7 --dtype bfloat16

A JumpReLU SAE with random weights and per-feature thresholds chosen so that a token fires about
``--l0`` features. Three candidates share one chunk size (sparse_encode's default for B):
  torch   ``sae_tune.sparse_encode(..., chunk=c)``: GEMM, then ``pre > thr``, ``nonzero``, gathers, and a
          stable argsort of all non-zeros by token;
  C       the CPU target's encode (``cpu-encode``): the same GEMM, then the C count / write / assemble;
  GEMM    the chunks' GEMMs alone (``x @ W_enc[:, chunk] + b_enc[chunk]``), the floor of both.
Both encodes are checked bit for bit against each other first. Timed interleaved (round-robin, median
over rounds), so the drift of a shared machine hits all alike. The compaction's share is
(encode - GEMM) / encode.

A second table times the compaction of one chunk alone (its pre-activations computed once): torch's ops
(``sae_tune.encode._threshold_chunk`` and the row/column split), the C scan in one pass (pairs written
into per-thread shares of the slots) and in two passes (count, then write at exact per-row offsets).
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import statistics
import time
from collections.abc import Callable

import torch

import sae_tune
from sae_tune.encode import _pre, _threshold_chunk, chunk_bounds
from sae_tune.targets.base import EncodeProblem
from sae_tune.targets.cpu import encode as cpu_encode
from sae_tune.targets.cpu.encode import default_chunk
from sae_tune.targets.cpu.target import ENCODE_IMPL, CpuTarget

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def problem(B: int, D: int, F: int, l0: float, dtype: torch.dtype, seed: int = 0) -> EncodeProblem:
    """Random SAE weights; per-feature thresholds (about 5% apart) giving a mean L0 near ``l0``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen)
    W = torch.randn(D, F, generator=gen) / D**0.5
    b = torch.randn(F, generator=gen) * 0.1
    sample = x[: min(B, 64)] @ W + b
    level = torch.quantile(sample.flatten()[:1_000_000], 1 - l0 / F).item()
    thr = level * (1 + 0.05 * torch.randn(F, generator=gen))
    return EncodeProblem(x.to(dtype), W.to(dtype), b.to(dtype), thr.to(dtype), None)


def candidates(target: CpuTarget, p: EncodeProblem, chunk: int) -> dict[str, Callable[[], object]]:
    """The three candidates at one chunk size: today's torch encode, the C encode, and the GEMMs alone."""
    bounds = chunk_bounds(p.W_enc.shape[1], min(chunk, p.W_enc.shape[1]))

    def torch_path() -> sae_tune.SparseActs:
        with torch.no_grad():
            return sae_tune.sparse_encode(p.x, p.W_enc, p.b_enc, threshold=p.threshold, chunk=chunk)

    def c_path() -> tuple[torch.Tensor, ...]:
        return target.encode(ENCODE_IMPL, {"chunk": chunk, "threads": 0}, p)

    def gemm_only() -> None:
        with torch.no_grad():
            for s, e in bounds:
                _pre(p.x, p.W_enc, p.b_enc, s, e)

    return {"torch": torch_path, "C": c_path, "GEMM": gemm_only}


def compaction_candidates(p: EncodeProblem, chunk: int) -> dict[str, Callable[[], object]]:
    """One chunk's threshold + compaction alone: torch's ops, and the C kernels in one and two passes."""
    n = min(chunk, p.W_enc.shape[1])
    with torch.no_grad():
        pre = _pre(p.x, p.W_enc, p.b_enc, 0, n)
    B = pre.shape[0]
    thr = p.threshold[:n]
    thr_pos = torch.clamp_min(thr, 0)
    thr32 = thr_pos.float().contiguous()
    scan, write, _ = (cpu_encode.build(pre.dtype).entries[name] for name in cpu_encode.SIGNATURES)
    threads = torch.get_num_threads()
    counts, starts = torch.empty(B, dtype=torch.int64), torch.empty(B, dtype=torch.int64)
    total = ctypes.c_int64(0)
    head = (B, n, 0, pre.data_ptr(), n, thr32.data_ptr(), counts.data_ptr(), starts.data_ptr())
    scan(*head, None, None, 0, ctypes.byref(total), threads)
    cap = 2 * total.value + 4096  # as the encode sizes later chunks: twice the density seen

    def torch_ops() -> None:
        pos, _ = _threshold_chunk(pre, thr, thr_pos)
        torch.div(pos, n, rounding_mode="floor"), pos % n

    def one_pass() -> None:
        idx, val = torch.empty(cap, dtype=torch.int64), torch.empty(cap, dtype=pre.dtype)
        if scan(*head, idx.data_ptr(), val.data_ptr(), cap, ctypes.byref(total), threads) != 0:
            raise SystemExit("the one-pass scan ran out of slots at twice the density")

    def two_passes() -> None:
        scan(*head, None, None, 0, ctypes.byref(total), threads)  # no slots: a count
        torch.cumsum(counts, 0, out=starts)
        starts.sub_(counts)
        idx, val = torch.empty(total.value, dtype=torch.int64), torch.empty(total.value, dtype=pre.dtype)
        write(*head[:6], starts.data_ptr(), idx.data_ptr(), val.data_ptr(), threads)

    return {"torch ops": torch_ops, "C one pass": one_pass, "C two passes": two_passes}


def timed(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, float]]:
    """(median, min) seconds per call of each function, round-robin over the functions."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def same(ref: sae_tune.SparseActs, out: tuple[torch.Tensor, ...]) -> bool:
    return (
        torch.equal(ref.offsets, out[0])
        and torch.equal(ref.indices, out[1])
        and torch.equal(ref.values.view(torch.uint8), out[2].view(torch.uint8))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--F", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--D", type=int, default=2304)
    parser.add_argument("--B", type=int, default=1024)
    parser.add_argument("--l0", type=float, default=80.0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--kernel-rounds", type=int, default=31)
    parser.add_argument("--chunk", type=int, default=0, help="features per GEMM (0: the default for B)")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    target = CpuTarget()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} torch threads; torch {torch.__version__}")
    print(f"B={args.B} D={args.D} {args.dtype}, JumpReLU; interleaved rounds, ms as median (min)\n")
    print("| F | chunk | L0 | torch | C | GEMM alone | C / torch | compaction share: torch | C |")
    print("|---|---|---|---|---|---|---|---|---|")
    kernels = []
    for F in args.F:
        p = problem(args.B, args.D, F, args.l0, dtype)
        chunk = args.chunk or default_chunk(args.B, F)
        fns = candidates(target, p, chunk)
        ref = fns["torch"]()
        assert isinstance(ref, sae_tune.SparseActs)
        if not same(ref, fns["C"]()):  # type: ignore[arg-type]
            raise SystemExit(f"F={F}: the C encode differs from sparse_encode; no timing")
        t = timed(fns, args.rounds)
        med = {name: v[0] for name, v in t.items()}
        share_t = (med["torch"] - med["GEMM"]) / med["torch"]
        share_c = (med["C"] - med["GEMM"]) / med["C"]
        ms = " | ".join(f"{t[name][0] * 1e3:.0f} ({t[name][1] * 1e3:.0f})" for name in ("torch", "C", "GEMM"))
        ratio = f"{med['C'] / med['torch']:.3f} ({t['C'][1] / t['torch'][1]:.3f})"
        print(f"| {F} | {chunk} | {ref.nnz / args.B:.0f} | {ms} | {ratio} | {share_t:.1%} | {share_c:.1%} |")
        kernels.append((F, chunk, timed(compaction_candidates(p, chunk), args.kernel_rounds)))
    print("\nOne chunk's threshold + compaction alone, ms as median (min):\n")
    print("| F | chunk | torch ops | C one pass | C two passes |")
    print("|---|---|---|---|---|")
    for F, chunk, t in kernels:
        cells = " | ".join(f"{v[0] * 1e3:.1f} ({v[1] * 1e3:.1f})" for v in t.values())
        print(f"| {F} | {chunk} | {cells} |")


if __name__ == "__main__":
    main()
