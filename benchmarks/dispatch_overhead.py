"""Dispatch after tuning, measured in one run: dense, the library paths, ``sae_tune.sparse_decode`` (the
dispatcher), the chosen implementation called directly, the dispatcher's overhead per call, and a SAELens
``JumpReLUSAE`` forward with and without sae-tune's patch.

    python benchmarks/dispatch_overhead.py                       # gemma-2b-l20, B=32, fp32, CPU
    python benchmarks/dispatch_overhead.py --trials 20 --csv out.csv --cache tuned.sqlite

Steps: tune the shape with ``sae_tune.autotune.search.Tuner`` into a fresh cache (or reuse ``--cache``
with ``--no-tune``), point the dispatcher at it, then time every path interleaved (round-robin, so drift
of a shared machine hits all alike) and report medians. Timings are wall-clock on this machine only.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

import sae_tune
from sae_tune.autotune.candidates import Candidate
from sae_tune.autotune.search import Tuner, quiet_optuna
from sae_tune.autotune.timing import time_interleaved
from sae_tune.autotune.workload import random_weights, synthetic_acts
from sae_tune.cache.store import Store
from sae_tune.device import describe_device
from sae_tune.dispatch import Dispatcher, reload, set_dispatcher
from sae_tune.specs import get_spec
from sae_tune.targets.library.paths import TORCH_PATHS


def stamp(spec_name: str, batch: int) -> dict[str, str]:
    info = describe_device("cpu")
    try:
        from importlib.metadata import version

        lens = version("sae-lens")
    except Exception:
        lens = "not installed"
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": f"cpu: {info.name}",
        "threads": str(torch.get_num_threads()),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
        "python": platform.python_version(),
        "torch": info.torch_version,
        "triton": str(info.triton_version),
        "sae-lens": lens,
        "sae-tune": sae_tune.__version__,
        "shape": f"{spec_name}, B={batch}, float32",
    }


def tune(spec, cache: Path, batch: int, trials: int) -> None:
    quiet_optuna()
    with Store(cache) as store:
        tuner = Tuner(spec, device="cpu", dtype=torch.float32, store=store, seed=0)
        started = time.perf_counter()
        result = tuner.tune_batch(batch, trials=trials)
    print(
        f"tuned in {time.perf_counter() - started:.0f} s: {result.best.label} {result.best_ms:.2f} ms, "
        f"dense {result.dense_ms:.2f} ms ({result.trials} trials, {result.failed} failed)",
        file=sys.stderr,
    )


def per_call_overhead(impl: str, config: dict, blocks: int = 40, calls: int = 50) -> dict[str, float]:
    """Microseconds per call of the same implementation, called directly and through ``sparse_decode``,
    on a small shape where the dispatcher's fixed cost is not lost in the noise of a long decode.

    One torch thread, alternating blocks of ``calls`` calls: the dispatcher's cost is Python on one core,
    and contention for the cores of a shared machine would otherwise swamp it. Reports medians and
    minima over the blocks (the minimum is the least disturbed run)."""
    from sae_tune.cache.store import CacheKey, Provenance, WinnerRecord
    from sae_tune.targets import templates_hash

    F, D, B = 2048, 64, 32
    W = torch.randn(F, D) / 8
    b = torch.randn(D)
    acts = synthetic_acts((F, 8), B, seed=3)
    key = CacheKey.for_device(
        describe_device("cpu"),
        template_hash=templates_hash(),
        dtype=torch.float32,
        F=F,
        D=D,
        batch_size=B,
        mean_l0=8,
    )
    record = WinnerRecord(key, impl, config, 1.0, None, Provenance.current())
    previous = set_dispatcher(Dispatcher(local_records=[record], shipped_records=[]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        direct = Candidate.of(impl, config).build()
        assert sae_tune.explain(acts, W, b).source == "cache"
        sae_tune.sparse_decode(acts, W, b)  # first use: verified against dense

        def block(fn: Callable) -> float:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(acts, W, b)
            return (time.perf_counter() - t0) / calls * 1e6

        samples: dict[str, list[float]] = {"direct": [], "dispatched": []}
        with torch.no_grad():
            for _ in range(blocks):
                samples["direct"].append(block(direct))
                samples["dispatched"].append(block(sae_tune.sparse_decode))
    finally:
        torch.set_num_threads(threads)
        set_dispatcher(previous)
    out = {}
    for name, values in samples.items():
        out[f"{name} median"] = statistics.median(values)
        out[f"{name} min"] = min(values)
    return out


def jumprelu_sae(F: int, D: int, l0: float):
    """A SAELens JumpReLUSAE with random weights and one threshold giving mean L0 ~``l0`` on N(0, 1) input."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=F))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, F, generator=gen) / math.sqrt(D))
        sae.W_dec.copy_(torch.randn(F, D, generator=gen) / math.sqrt(D))
        sae.b_dec.copy_(torch.randn(D, generator=gen) / 10)
        calib = torch.randn(64, D, generator=gen)
        pre = (sae.process_sae_in(calib) @ sae.W_enc + sae.b_enc).flatten()
        sae.threshold.fill_(pre.kthvalue(pre.numel() - int(l0 * 64)).values.item())
    return sae


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sae", default="gemma-2b-l20")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    parser.add_argument("--cache", type=Path, help="tuning cache to write (default: a fresh temporary file)")
    parser.add_argument("--no-tune", action="store_true", help="use --cache as it is")
    parser.add_argument("--csv", type=Path, help="also write the rows as CSV")
    args = parser.parse_args()

    spec, batch = get_spec(args.sae), args.batch_size
    meta = stamp(spec.name, batch)
    cache = args.cache or Path(tempfile.mkdtemp(prefix="sae-tune-bench-")) / "cache.sqlite"
    if not args.no_tune:
        tune(spec, cache, batch, args.trials)
    reload(cache)

    W, b = random_weights(spec.width, spec.d_model, dtype=torch.float32, device="cpu", seed=11)
    acts = synthetic_acts(spec, batch, seed=12)
    decision = sae_tune.explain(acts, W, b)
    chosen = Candidate.of(decision.implementation, dict(decision.config)).build()
    library = {
        name: path.build()
        for name, path in TORCH_PATHS.items()
        if not path.params and name != "dense" and path.supports(torch.float32, "cpu")
    }
    with torch.no_grad():
        sae_tune.sparse_decode(acts, W, b)  # first use verifies the choice against dense
        runs = {
            "dense (acts @ W_dec + b_dec)": lambda: acts @ W + b,
            **{f"library: {name}": (lambda fn=fn: fn(acts, W, b)) for name, fn in library.items()},
            f"chosen, called directly: {decision.label}": lambda: chosen(acts, W, b),
            "sae_tune.sparse_decode (dispatched)": lambda: sae_tune.sparse_decode(acts, W, b),
        }
        decode_ms = {name: t.ms for name, t in time_interleaved(runs, "cpu", rounds=args.rounds).items()}
    overhead = per_call_overhead(decision.implementation, dict(decision.config))

    sae = jumprelu_sae(spec.width, spec.d_model, spec.l0)
    x = torch.randn(batch, spec.d_model, generator=torch.Generator().manual_seed(6))

    def unpatched_forward() -> torch.Tensor:
        with sae_tune.unpatched():
            return sae(x)

    def unpatched_decode() -> torch.Tensor:
        with sae_tune.unpatched():
            return sae.decode(sae_acts)

    with torch.no_grad():
        sae_acts = sae.encode(x)
        sae_l0 = (sae_acts != 0).sum(-1).float().mean().item()
        sae_decision = sae_tune.explain(sae_acts, sae.W_dec, sae.b_dec)
        sae(x)  # first use verifies
        forward_runs = {
            "SAELens JumpReLUSAE forward, unpatched": unpatched_forward,
            "SAELens JumpReLUSAE forward, import sae_tune": lambda: sae(x),
            "SAELens JumpReLUSAE decode, unpatched": unpatched_decode,
            "SAELens JumpReLUSAE decode, import sae_tune": lambda: sae.decode(sae_acts),
        }
        forward_ms = {
            name: t.ms for name, t in time_interleaved(forward_runs, "cpu", rounds=args.rounds).items()
        }

    od = overhead
    dense = decode_ms["dense (acts @ W_dec + b_dec)"]
    rows = [(name, ms, dense / ms) for name, ms in decode_ms.items()]
    fwd_off = forward_ms["SAELens JumpReLUSAE forward, unpatched"]
    rows += [(name, ms, fwd_off / ms if "forward" in name else None) for name, ms in forward_ms.items()]

    lines = ["# sae-tune dispatch after tuning", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += [
        f"- dispatcher's decision: {decision}",
        f"- SAELens JumpReLUSAE: mean L0 {sae_l0:.1f}; decision: {sae_decision.label} "
        f"({sae_decision.source})",
        f"- {args.rounds} interleaved rounds, medians; tuning: {args.trials} trials into {cache}",
        "",
        "| what | median ms | speed-up |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {ms:.3f} | {'' if s is None else f'{s:.2f}x'} |" for name, ms, s in rows]
    best_lib = min((ms, name) for name, ms in decode_ms.items() if name.startswith("library"))
    dispatched = decode_ms["sae_tune.sparse_decode (dispatched)"]
    direct = decode_ms[f"chosen, called directly: {decision.label}"]
    lines += [
        "",
        f"- dispatched vs dense: {dense / dispatched:.2f}x faster; vs best library path ({best_lib[1]}): "
        f"{best_lib[0] / dispatched:.2f}x",
        f"- dispatched minus direct at this shape: {(dispatched - direct) * 1e3:+.0f} us (medians; "
        "run-to-run noise at this shape is larger)",
        "- dispatcher overhead per call, same implementation on F=2048 D=64 B=32, 1 thread, "
        f"40 alternating blocks of 50 calls: median {od['dispatched median'] - od['direct median']:+.1f} us "
        f"({od['direct median']:.1f} direct, {od['dispatched median']:.1f} dispatched), "
        f"min {od['dispatched min'] - od['direct min']:+.1f} us "
        f"({od['direct min']:.1f} direct, {od['dispatched min']:.1f} dispatched)",
    ]
    print("\n".join(lines))
    if args.csv:
        with args.csv.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["what", "median_ms", "speedup", *meta])
            for name, ms, s in rows:
                writer.writerow([name, f"{ms:.4f}", "" if s is None else f"{s:.3f}", *meta.values()])
            for name, us in overhead.items():
                label = f"overhead microbenchmark: {name} per call"
                writer.writerow([label, f"{us / 1e3:.6f}", "", *meta.values()])


if __name__ == "__main__":
    main()
