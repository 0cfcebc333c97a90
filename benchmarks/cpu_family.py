"""The C/OpenMP CPU kernel family against dense, the library sparse path and a naive fused C loop.

    python benchmarks/cpu_family.py                          # gemma-2b-l20 (F=65536, D=2304), fp32
    python benchmarks/cpu_family.py --dtype bfloat16 --batches 32 --rounds 7

The row "dispatched" is ``sae_tune.sparse_decode`` as a user calls it, choosing from the local cache (run
the README's main command first so that it has tuned entries for this shape).

For each batch size, every candidate is timed interleaved (round-robin over candidates, several calls
per round, median over rounds), so drift of a shared machine hits all alike. Each candidate is checked
against the fp64 product first; compile time is paid before any timing. Columns: milliseconds, speed-up
over the best library path (embedding_bag_csr and friends), and the share of the measured read
bandwidth that the candidate's minimal traffic reaches (activations read once + the fired W_dec rows,
repeats included + the output written), against ``sum()`` of a 256 MiB tensor.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time
from collections.abc import Callable

import torch

import sae_tune
from sae_tune.autotune.workload import random_weights, synthetic_acts
from sae_tune.cache.store import resolve_cache_path
from sae_tune.targets import cpu
from sae_tune.targets.cpu.build import build_source
from sae_tune.targets.library.paths import TORCH_PATHS

LIBRARY_PATHS = ("embedding_bag_csr", "embedding_bag_crow", "sparse_coo", "sparse_csr")

# One token per OpenMP iteration, every activation tested one by one, every fired row added straight
# into the output row: the simplest fused loop (fp32, contiguous), -O3 -march=native like the family.
NAIVE_SOURCE = r"""
#include <stdint.h>
#include <string.h>
int sae_tune_decode(int64_t B, int64_t F, int64_t D, const void *acts_v, int64_t ars, int64_t acs,
                    const void *W_v, int64_t wrs, int64_t wcs, const void *bias_v, int64_t bs, void *out_v,
                    int64_t ors, int32_t nthreads)
{
    const float *acts = acts_v, *W = W_v, *bias = bias_v;
    float *out = out_v;
    (void)acs; (void)wcs; (void)bs;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic)
    for (int64_t t = 0; t < B; t++) {
        float *o = out + t * ors;
        for (int64_t d = 0; d < D; d++) o[d] = bias ? bias[d] : 0.0f;
        for (int64_t f = 0; f < F; f++) {
            float a = acts[t * ars + f];
            if (a != 0.0f) {
                const float *w = W + f * wrs;
                for (int64_t d = 0; d < D; d++) o[d] += a * w[d];
            }
        }
    }
    return 0;
}
const char *sae_tune_kernel_name(void) { return "naive"; }
int sae_tune_openmp(void) { return 1; }
"""


def naive(acts: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    kernel = build_source(NAIVE_SOURCE)
    B, D = acts.shape[0], W.shape[1]
    out = torch.empty((B, D), dtype=torch.float32)
    kernel.fn(
        B,
        acts.shape[1],
        D,
        acts.data_ptr(),
        acts.stride(0),
        1,
        W.data_ptr(),
        W.stride(0),
        1,
        b.data_ptr() if b is not None else None,
        1,
        out.data_ptr(),
        D,
        torch.get_num_threads(),
    )
    return out


def _run_variant(variant, a, W, b, dtype):
    return cpu.run(variant, a, W, b, dtype)


def copy_gbps(mib: int = 256, reps: int = 7) -> float:
    """Read + write GB/s of ``dst.copy_(src)`` for ``mib`` MiB of float32 (pages touched first; median)."""
    src = torch.ones(mib * (1 << 20) // 4)
    dst = torch.zeros_like(src)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def read_gbps(mib: int = 256, reps: int = 7) -> float:
    """Read GB/s of ``src.sum()`` over ``mib`` MiB of float32 (every thread reads; median): the bound of a
    decode, which reads the activations and the fired rows and writes little."""
    src = torch.ones(mib * (1 << 20) // 4)
    src.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - t0)
    return src.nbytes / statistics.median(times) / 1e9


def time_interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, budget_s: float
) -> dict[str, tuple[float, float]]:
    """(median, min) over rounds of the ms per call of each fn; each round calls every fn ``reps`` times in
    turn. On a shared machine the minimum is the better estimate of the uncontended speed."""
    per_call = {}
    for name, fn in fns.items():  # warm up and size the inner loop
        fn()
        t0 = time.perf_counter()
        fn()
        per_call[name] = time.perf_counter() - t0
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            reps = max(1, min(50, int(budget_s / rounds / len(fns) / max(per_call[name], 1e-6))))
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            samples[name].append((time.perf_counter() - t0) / reps * 1e3)
    return {name: (statistics.median(s), min(s)) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--budget", type=float, default=6.0, help="seconds of timing per batch size")
    parser.add_argument("--width", type=int, default=65536)
    parser.add_argument("--d-model", type=int, default=2304)
    parser.add_argument("--l0", type=int, default=72)
    parser.add_argument("--variants", nargs="*", default=None, help="JSON CpuVariant dicts to add")
    parser.add_argument("--space", action="store_true", help="time the whole search space (slow)")
    parser.add_argument("--skip", nargs="*", default=[], help="paths not to time (e.g. dense: slow in fp16)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all)")
    parser.add_argument("--distinct", type=int, default=0, help="batches rotated (default: from --llc-mib)")
    parser.add_argument("--llc-mib", type=int, default=32, help="last-level cache size to defeat")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    F, D = args.width, args.d_model
    W, b = random_weights(F, D, dtype=dtype, device="cpu", seed=0)
    copy = copy_gbps()
    gbps = read_gbps()
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; read bandwidth {gbps:.1f} GB/s (sum of 256 MiB; the 'of read' "
        f"column), copy bandwidth {copy:.1f} GB/s (copy_ of 256 MiB, read + write)"
    )
    print(f"shape F={F} D={D} L0~{args.l0} {args.dtype}")
    dv = cpu.default_variant(F, D, dtype)
    family = {"default " + dv.name: dv}
    extra = [
        cpu.CpuVariant("twophase", 1, 128, 4, 8, 64, 0, "static"),
        cpu.CpuVariant("twophase", 4, 256, 4, 8, 64, 0, "dynamic"),
        cpu.CpuVariant("twophase", 1, 512, 4, 4, 128, 0, "static"),
        cpu.CpuVariant("fused", 1, 4096, 4, 0, 64, 0, "dynamic"),
        cpu.CpuVariant("fused", 4, 256, 4, 0, 128, 0, "static"),
    ]
    if args.space:
        extra = cpu.search_space(F, D, dtype)
    if args.variants:
        import json

        extra += [cpu.CpuVariant.from_dict(json.loads(text)) for text in args.variants]
    for v in extra:
        family.setdefault(v.name, v)
    for B in args.batches:
        _bench_batch(B, args, dtype, W, b, family, gbps)


def _bench_batch(B, args, dtype, W, b, family, gbps) -> None:
    """Time every path on ``B`` tokens, rotating over enough distinct batches that the fired W_dec rows of
    one call are not all still in the last-level cache from the previous call of the same path."""
    F, D = W.shape
    first = synthetic_acts((F, args.l0), B, dtype=dtype, seed=B)
    nnz = int((first != 0).sum())
    per_batch = first.numel() * first.element_size() + nnz * D * W.element_size()
    n = args.distinct or max(1, min(64, -(-args.llc_mib * 2 * (1 << 20) // max(per_batch, 1))))
    batches = [first] + [synthetic_acts((F, args.l0), B, dtype=dtype, seed=B * 1000 + i) for i in range(1, n)]
    nnz = sum(int((a != 0).sum()) for a in batches) / n
    out_size = torch.empty((), dtype=dtype).element_size()
    moved = first.numel() * first.element_size() + nnz * D * W.element_size() + B * D * out_size
    # the same with each distinct fired row counted once (a row fired by several tokens of a batch can be
    # served from cache after its first read): the least traffic from memory
    distinct = sum(int((a != 0).any(0).sum()) for a in batches) / n
    moved_once = moved - (nnz - distinct) * D * W.element_size()

    def rotating(fn: Callable[[torch.Tensor], object]) -> Callable[[], object]:
        state = {"i": 0}

        def call() -> object:
            state["i"] = (state["i"] + 1) % n
            return fn(batches[state["i"]])

        return call

    dense = TORCH_PATHS["dense"].build()
    paths: dict[str, Callable[[torch.Tensor], object]] = {"dense": lambda a: dense(a, W, b)}
    for name in LIBRARY_PATHS:
        if TORCH_PATHS[name].supports(dtype):
            paths[name] = (lambda fn: lambda a: fn(a, W, b))(TORCH_PATHS[name].build())
    if dtype == torch.float32:
        paths["naive C (fused, one token per task)"] = lambda a: naive(a, W, b)
    decision = sae_tune.explain(first, W, b)
    print(f"  dispatcher (cache {resolve_cache_path()}): {decision.label} from {decision.source}")
    paths["dispatched: sae_tune.sparse_decode"] = lambda a: sae_tune.sparse_decode(a, W, b)
    for name, v in family.items():
        cpu.build(v, cpu.kernel_dtypes(W, b))  # compile before timing
        paths[name] = functools.partial(_run_variant, v, W=W, b=b, dtype=dtype)
    ref = first.double() @ W.double() + b.double()
    scale = float((first.double().abs() @ W.double().abs()).max()) + 1 if B else 1.0
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype] * scale
    fns = {}
    for name in args.skip:
        paths.pop(name, None)
    for name, fn in paths.items():  # a wrong or failing path is never timed
        try:
            out = fn(first)
        except Exception as exc:  # noqa: BLE001 - reported, then left out
            print(f"  {name}: failed ({exc})")
            continue
        err = float((out.double() - ref).abs().max()) if B else 0.0
        if err > tol:
            print(f"  {name}: WRONG (max error {err:.3g}); not timed")
            continue
        fns[name] = rotating(fn)
    ms = time_interleaved(fns, args.rounds, args.budget)
    lib = min((ms[n][0] for n in LIBRARY_PATHS if n in ms), default=float("nan"))
    lib_min = min((ms[n][1] for n in LIBRARY_PATHS if n in ms), default=float("nan"))
    print(
        f"\nB={B}: mean nnz {nnz:.0f} (L0 {nnz / max(B, 1):.1f}) over {n} distinct batches, "
        f"minimal traffic {moved / 1e6:.1f} MB per call (rows as gathered; {moved_once / 1e6:.1f} MB "
        f"with each distinct row once: multiply 'of read' by {moved_once / moved:.2f} for that count)"
    )
    head = f"{'median ms':>9s} {'vs lib':>7s} {'of read':>7s}"
    print(f"  {'path':52s} {head} | {head.replace('median', '   min')}")
    for name, (t, t_min) in sorted(ms.items(), key=lambda kv: kv[1][0]):
        rate, rate_min = moved / (t / 1e3) / 1e9, moved / (t_min / 1e3) / 1e9
        median = f"{t:9.3f} {lib / t:6.2f}x {rate / gbps:7.0%}"
        print(f"  {name:52s} {median} | {t_min:9.3f} {lib_min / t_min:6.2f}x {rate_min / gbps:7.0%}")


if __name__ == "__main__":
    main()
