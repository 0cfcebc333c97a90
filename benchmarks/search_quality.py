"""How close the Optuna search gets to the exhaustive best, and how fast, on this machine's CPU space.

For each shape and batch size: every candidate of the tuner's space (library paths and the C variants)
is verified and timed once (the exhaustive table), then the tuner's own search (same sampler, same warm
starts, same define-by-run parameters) is replayed against that table with several seeds at 10, 20 and
40 trials. Replaying recorded timings (as Kernel Tuner's cache files allow) compares every search with
the same measurements, so the comparison is not noise between two timing runs.

    python benchmarks/search_quality.py --out benchmarks/results/search_quality_cpu.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna
import torch

from sae_tune.autotune.candidates import Candidate, search_space
from sae_tune.autotune.search import (
    SUGGESTIONS_PER_TRIAL,
    CandidateFailed,
    Tuner,
    make_sampler,
    params_of,
    quiet_optuna,
    suggest,
)
from sae_tune.cache.store import Store
from sae_tune.device import describe_device
from sae_tune.specs import get_spec, spec_from_shape

SHAPES = {
    "gemma-2b-l20": lambda: get_spec("gemma-2b-l20"),
    "16k x 768, L0 64": lambda: spec_from_shape(16384, 768, 64),
}


def exhaustive(tuner: Tuner, batch: int) -> tuple[dict[Candidate, float], int]:
    """Every candidate's verified median time (failed ones left out) and the space's size."""
    work = tuner.workload(batch)
    key = tuner.key(batch, tuner.l0.mean)
    space = search_space(tuner.spec, key.batch_bucket, tuner.dtype, tuner.device, tuner.max_l0s)
    table: dict[Candidate, float] = {}
    for impl, configs in space.configs.items():
        for config in configs:
            cand = Candidate.of(impl, config)
            try:
                table[cand] = tuner.measure(cand, work).ms
            except CandidateFailed as exc:
                print(f"  failed: {cand.label}: {exc}")
    return table, space.size()


def replay(
    tuner: Tuner, batch: int, table: dict[Candidate, float], trials: int, seed: int
) -> tuple[float, int]:
    """Best time the search finds measuring ``trials`` distinct candidates (as the tuner counts them),
    and how many it measured."""
    key = tuner.key(batch, tuner.l0.mean)
    space = search_space(tuner.spec, key.batch_bucket, tuner.dtype, tuner.device, tuner.max_l0s)
    study = optuna.create_study(direction="minimize", sampler=make_sampler(seed, trials))
    for cand in space.warm_starts():
        study.enqueue_trial(params_of(cand, space), skip_if_exists=True)
    seen: set[Candidate] = set()

    def objective(trial: optuna.Trial) -> float:
        cand = suggest(trial, space)
        seen.add(cand)
        if cand not in table:
            raise CandidateFailed(f"{cand.label} failed")
        return table[cand]

    def stop(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if len(seen) >= trials:  # as the tuner counts: distinct candidates measured
            study.stop()

    n = trials * SUGGESTIONS_PER_TRIAL
    study.optimize(objective, n_trials=n, catch=(CandidateFailed,), callbacks=[stop])
    best = min((table[c] for c in seen), default=float("inf"))
    return best, len(seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--trials", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--shape", choices=list(SHAPES), nargs="+", default=list(SHAPES))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    quiet_optuna()
    lines = [
        f"Search quality on {describe_device(torch.device('cpu')).name} (fp32, torch {torch.__version__}), "
        f"{args.seeds} seeds per row; ratio = best found / exhaustive best (1.00 is the best).",
        "",
        "| shape | B | space | exhaustive best | trials | % of space | median ratio | worst ratio | "
        "seeds within 5% |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "cache.sqlite") as store:
        for shape in args.shape:
            tuner = Tuner(SHAPES[shape](), store=store, device="cpu")
            for batch in args.batch:
                print(f"{shape} B={batch}: timing the whole space ...", flush=True)
                table, size = exhaustive(tuner, batch)
                best_cand = min(table, key=table.__getitem__)
                best = table[best_cand]
                print(f"  best {best_cand.label} {best:.3f} ms ({len(table)} of {size} ran)", flush=True)
                for trials in args.trials:
                    found = [replay(tuner, batch, table, trials, seed)[0] for seed in range(args.seeds)]
                    ratios = [f / best for f in found]
                    within = sum(r <= 1.05 for r in ratios)
                    lines.append(
                        f"| {shape} | {batch} | {size} | {best_cand.label} {best:.3f} ms | {trials} | "
                        f"{100 * trials / size:.0f}% | {statistics.median(ratios):.3f} | {max(ratios):.3f} | "
                        f"{within}/{len(ratios)} |"
                    )
    lines += ["", f"Total {time.perf_counter() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
