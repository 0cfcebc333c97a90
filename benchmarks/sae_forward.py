"""SAELens JumpReLU forward: unpatched, decode-only patched, sparse end to end: time and extra peak memory.

Paths (one SAE, one input per batch size, fp32, CPU):
- ``unpatched``: SAELens's own forward (``with sae_tune.unpatched()``);
- ``decode-only``: SAELens's forward with only the decoder matmul routed through sae-tune's dispatcher
  (what ``import sae_tune`` did before sparse end to end; today it is what a forward with an activation
  hook gets);
- ``sparse``: ``sae(x)`` after ``import sae_tune``: ``sparse_encode`` -> ``SparseActs`` -> decode.

Time: all paths interleaved in one process (``--rounds`` rounds after one warm-up call each), medians.
Extra peak memory: one fresh process per (path, batch size): after the SAE and the input are built the
resident-set high-water mark is reset (``/proc/self/clear_refs``), one forward runs, and the extra peak is
VmHWM minus the resident size before the call. All under ``torch.no_grad()``.

    python benchmarks/sae_forward.py                                       # gemma-2b-l20, B in 32 1024 4096
    python benchmarks/sae_forward.py --width 262144 --batch-sizes 4096 --memory-only --paths sparse
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

PATHS = ("unpatched", "decode-only", "sparse")


def build(width: int, d_model: int, l0: float, batch: int, seed: int = 5):
    """A SAELens JumpReLUSAE with random weights whose threshold fires ~``l0`` features per N(0, 1) token,
    and an input batch. Weights are filled in place, so building leaves no temporaries behind."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_model, d_sae=width))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.normal_(generator=gen).div_(math.sqrt(d_model))
        sae.W_dec.normal_(generator=gen).div_(math.sqrt(d_model))
        sae.b_dec.normal_(generator=gen).div_(10)
        calib = torch.randn(64, d_model, generator=gen)
        pre = (sae.process_sae_in(calib) @ sae.W_enc + sae.b_enc).flatten()
        sae.threshold.fill_(pre.kthvalue(pre.numel() - int(l0 * 64)).values.item())
        del pre
    for p in sae.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, d_model, generator=torch.Generator().manual_seed(6))
    return sae, x


def runner(path: str, sae, x) -> Callable[[], object]:
    import sae_tune

    if path == "unpatched":

        def run() -> object:
            with sae_tune.unpatched():
                return sae(x)

        return run
    if path == "decode-only":
        original = type(sae).forward.__sae_tune_original__  # SAE.forward, decoder matmul routed
        return lambda: original(sae, x)
    return lambda: sae(x)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(args: argparse.Namespace, path: str, batch: int) -> dict[str, float]:
    """In this (fresh) process: extra peak resident memory of one forward, in MB."""
    import torch

    sae, x = build(args.width, args.d_model, args.l0, batch)
    fn = runner(path, sae, x)
    with torch.no_grad():
        if path == "decode-only":
            fn()  # the dispatcher verifies its choice on first use (an fp64 product): not part of a forward
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
        before = _status_kib("VmRSS")
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM")
    return {"extra_peak_mb": (peak - before) / 1024, "rss_before_mb": before / 1024, "seconds": seconds}


def memory_in_subprocess(args: argparse.Namespace, path: str, batch: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--_memory", path, "--_batch", str(batch), "--width", str(args.width)]
    cmd += ["--d-model", str(args.d_model), "--l0", str(args.l0)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:] or ["failed"]}  # type: ignore[dict-item]
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_time(args: argparse.Namespace, batch: int, paths: list[str]) -> dict[str, object]:
    import torch

    sae, x = build(args.width, args.d_model, args.l0, batch)
    runs = {p: runner(p, sae, x) for p in paths}
    times: dict[str, list[float]] = {p: [] for p in paths}
    with torch.no_grad():
        outs = {p: fn() for p, fn in runs.items()}  # warm-up (and the dispatcher's first-use check)
        l0 = (sae.encode(x) != 0).sum(-1).float().mean().item()
        rounds = args.rounds if batch <= 1024 else max(2, args.rounds // 2)
        for _ in range(rounds):
            for p, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[p].append(time.perf_counter() - start)
    ref = outs.get("unpatched")
    out: dict[str, object] = {"l0": l0, "rounds": rounds}
    for p in paths:
        out[f"{p} s"] = statistics.median(times[p])
        if ref is not None:
            out[f"{p} max|diff|/max|out|"] = ((outs[p] - ref).abs().max() / ref.abs().max()).item()
    return out


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=65536)
    parser.add_argument("--d-model", type=int, default=2304)
    parser.add_argument("--l0", type=float, default=72.0)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1024, 4096])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds (halved above B=1024)")
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--time-only", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--_memory", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--_batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault(
        "SAE_TUNE_CACHE", str(Path(tempfile.mkdtemp(prefix="sae-tune-bench-")) / "c.sqlite")
    )

    if args._memory:
        print(json.dumps(measure_memory(args, args._memory, args._batch)))
        return

    import torch

    print(
        f"# SAE forward, JumpReLU F={args.width} D={args.d_model} L0~{args.l0:g}, fp32, CPU\n"
        f"# {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), "
        f"{time.strftime('%Y-%m-%d')}\n# {' '.join(sys.argv)}",
        flush=True,
    )
    results: dict[str, object] = {"cpu": cpu_model(), "args": vars(args), "rows": {}}
    for batch in args.batch_sizes:
        row: dict[str, object] = {}
        if not args.time_only:
            for p in args.paths:
                row[f"{p} memory"] = memory_in_subprocess(args, p, batch)
                print(f"B={batch} {p} memory: {row[f'{p} memory']}", flush=True)
        if not args.memory_only:
            row.update(measure_time(args, batch, args.paths))
            print(
                f"B={batch} time: {json.dumps({k: v for k, v in row.items() if 'memory' not in k})}",
                flush=True,
            )
        results["rows"][batch] = row  # type: ignore[index]
    print(
        "\n| B | path | median s | vs unpatched | extra peak MB | vs unpatched |"
        "\n|---|---|---:|---:|---:|---:|"
    )
    for batch, row in results["rows"].items():  # type: ignore[union-attr]
        base_t = row.get("unpatched s")
        base_m = row.get("unpatched memory", {}).get("extra_peak_mb")
        for p in args.paths:
            t = row.get(f"{p} s")
            m = row.get(f"{p} memory", {}).get("extra_peak_mb")
            cells = [
                f"{t:.3f}" if t is not None else "-",
                f"{t / base_t:.2f}x" if t is not None and base_t else "-",
                f"{m:.0f}" if m is not None else "-",
                f"{m / base_m:.2f}x" if m is not None and base_m else "-",
            ]
            print(f"| {batch} | {p} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
