"""SAELens JumpReLU forward: unpatched, decode-only, sparse end to end: time and extra peak memory.

The measurement is ``sae-tune bench``'s SAE forward table (``sae_tune/bench/forward.py``; ``sae-tune bench
--table sae_forward`` runs it at the bench's shapes); this script runs it at any one shape. It uses a
throw-away tuning cache unless ``SAE_TUNE_CACHE`` is set, so the dispatcher decides from its cost model.

    python benchmarks/sae_forward.py                                        # gemma-2b-l20, B in 32 1024 4096
    python benchmarks/sae_forward.py --width 262144 --l0 121 --batch-sizes 4096 --memory-only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--width", type=int, default=65536, help="F, features")
    parser.add_argument("--d-model", type=int, default=2304, help="D")
    parser.add_argument("--l0", type=int, default=72, help="features fired per token (about)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 1024, 4096])
    parser.add_argument("--rounds", type=int, default=5, help="most interleaved timing rounds (at least 3)")
    parser.add_argument("--memory-only", action="store_true", help="extra peak memory only, not timed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, help="also write bench.md and bench.csv into this folder")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault(
        "SAE_TUNE_CACHE", str(Path(tempfile.mkdtemp(prefix="sae-tune-bench-")) / "c.sqlite")
    )
    from sae_tune.bench import FULL, run_bench, write_outputs
    from sae_tune.bench.config import ForwardCase
    from sae_tune.bench.forward import FORWARD
    from sae_tune.bench.report import forward_section, header
    from sae_tune.specs import SpecError, spec_from_shape

    try:
        spec = spec_from_shape(args.width, args.d_model, args.l0)
        case = ForwardCase(
            f"F={spec.width} D={spec.d_model} L0={spec.l0}",
            spec,
            tuple(args.batch_sizes),
            timed=not args.memory_only,
        )
        config = replace(FULL, forward_cases=(case,), rounds=args.rounds, name="sae_forward")
    except (SpecError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_bench(config, args.device, tables=(FORWARD,), log=lambda m: print(m, file=sys.stderr))
    print(f"{header(result)}\n\n{forward_section(result)}")
    if args.out is not None:
        write_outputs(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
