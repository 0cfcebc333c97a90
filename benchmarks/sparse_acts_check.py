"""What the re-check of a SparseActs costs its decode on CPU.

    python benchmarks/sparse_acts_check.py                  # gemma-2b-l20: F=65536, D=2304, L0 72, fp32
    python benchmarks/sparse_acts_check.py --B 32 --rounds 41

Every reader checks the CSR again (its tensors can be edited after construction without a trace); on CPU
that is one O(B + nnz) pass (``SparseActs.validate``) before ``F.embedding_bag`` reads through it. Three
timings, interleaved round-robin (median over rounds), so the drift of a shared machine hits all alike:
  checked    ``sae_tune.sparse_decode(sa, W_dec, b_dec)`` as shipped;
  unchecked  the same call with ``SparseActs.validate`` replaced by a no-op (the layout checks, from
             metadata only, still run);
  validate   ``sa.validate()`` alone (the difference of the first two is within the noise of a shared
             machine; this is the check's own cost).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch

import sae_tune
from sae_tune import SparseActs


def random_csr(B: int, F: int, l0: int, dtype: torch.dtype, seed: int = 0) -> SparseActs:
    """B tokens with exactly ``l0`` distinct features each, ascending, as sparse_encode writes them."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.rand(B, F, generator=gen).topk(l0, dim=1).indices.sort(dim=1).values.reshape(-1)
    values = (torch.rand(B * l0, generator=gen) + 0.1).to(dtype)
    offsets = torch.arange(0, B * l0 + 1, l0, dtype=torch.int64)
    return SparseActs(offsets, idx, values, F)


def median_ms(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--F", type=int, default=65536)
    parser.add_argument("--D", type=int, default=2304)
    parser.add_argument("--l0", type=int, default=72)
    parser.add_argument("--B", type=int, nargs="+", default=[32, 1024])
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    dtype = torch.float32
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(args.F, args.D, generator=gen, dtype=dtype) / 8
    b = torch.randn(args.D, generator=gen, dtype=dtype)
    print(
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}; F={args.F} D={args.D} L0={args.l0} fp32; median of {args.rounds} rounds"
    )
    print("| B | checked ms | unchecked ms | validate ms | validate / checked |")
    print("|---|---|---|---|---|")
    real_validate = SparseActs.validate
    for B in args.B:
        sa = random_csr(B, args.F, args.l0, dtype)

        def unchecked(sa: SparseActs = sa) -> torch.Tensor:
            SparseActs.validate = lambda self: self  # type: ignore[method-assign]
            try:
                return sae_tune.sparse_decode(sa, W, b)
            finally:
                SparseActs.validate = real_validate  # type: ignore[method-assign]

        assert torch.equal(unchecked(), sae_tune.sparse_decode(sa, W, b))
        ms = median_ms(
            {
                "checked": lambda sa=sa: sae_tune.sparse_decode(sa, W, b),
                "unchecked": unchecked,
                "validate": sa.validate,
            },
            args.rounds,
        )
        share = ms["validate"] / ms["checked"]
        print(f"| {B} | {ms['checked']:.3f} | {ms['unchecked']:.3f} | {ms['validate']:.3f} | {share:.2%} |")


if __name__ == "__main__":
    main()
