"""CPU kernel variants: one frozen, validated set of C template parameters.

A ``CpuVariant`` is the only thing that reaches the C templates. Every field is checked on construction
(exact type, allowed words, ranges, powers of two), so a value read from a cache row or a command line can
never put anything into generated C source that is not one of a few known numbers or words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sae_tune.targets.fields import check_fields

FAMILIES = ("fused", "twophase")
SCHEDULES = ("static", "dynamic", "guided")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Inclusive bounds of every integer field, and whether it must be a power of two.
_INT_FIELDS: dict[str, tuple[int, int, bool]] = {
    "token_tile": (1, 256, True),
    "d_tile": (16, 8192, True),
    "unroll": (1, 8, True),
    "prefetch": (0, 64, False),
    "scan_width": (8, 1024, True),
    "threads": (0, 1024, False),
}


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class CpuVariant:
    """One point of the C kernel family.

    family      "fused": each work unit scans its tokens' activations and adds every fired W_dec row
                straight into an fp32 tile; "twophase": all tokens' non-zeros are first compacted
                (in parallel, a light token's row split over threads), then gathered with prefetch.
    token_tile  tokens per work unit (they share the W_dec rows they both fire while in cache).
    d_tile      output columns per work unit: the fp32 accumulator tile; B=1 runs D/d_tile units.
    unroll      fired rows added per pass over the accumulator tile.
    prefetch    twophase only: fired entries ahead whose W_dec row slice is prefetched (0 = none).
    scan_width  activations OR-reduced per block of the non-zero scan; only non-zero blocks are walked.
    threads     OpenMP threads; 0 = all (torch.get_num_threads() at call time). Not part of the source.
    schedule    OpenMP schedule of the work units.
    """

    family: str = "twophase"
    token_tile: int = 1
    d_tile: int = 256
    unroll: int = 4
    prefetch: int = 8
    scan_width: int = 64
    threads: int = 0
    schedule: str = "static"

    def __post_init__(self) -> None:
        check_fields("CpuVariant", self, {"family": FAMILIES, "schedule": SCHEDULES}, _INT_FIELDS)
        if self.family == "fused" and self.prefetch != 0:
            raise ValueError("CpuVariant.prefetch applies to family='twophase' only; use 0 for fused")

    # --- identity -----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Short, stable, human-readable name (also a cache and CLI identifier)."""
        threads = "all" if self.threads == 0 else str(self.threads)
        pf = f"-p{self.prefetch}" if self.family == "twophase" else ""
        return (
            f"c-{self.family}-t{self.token_tile}-d{self.d_tile}-u{self.unroll}{pf}-s{self.scan_width}"
            f"-th{threads}-{self.schedule}"
        )

    @property
    def can_truncate(self) -> bool:
        """Never: every variant decodes every non-zero of every token."""
        return False

    @property
    def host_sync(self) -> bool:
        """Never: the call is synchronous C on the caller's thread; nothing waits on a device."""
        return False

    def template_params(self) -> dict[str, Any]:
        """What the templates see; ``threads`` is a runtime argument, not source."""
        return {
            "family": self.family,
            "token_tile": self.token_tile,
            "d_tile": self.d_tile,
            "unroll": self.unroll,
            "prefetch": self.prefetch,
            "scan_width": self.scan_width,
            "schedule": self.schedule,
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CpuVariant:
        """Build from an outside mapping; unknown keys are an error naming the key."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a CPU variant must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(f"unknown CPU variant field(s): {', '.join(unknown)}")
        return cls(**dict(data))


def _check_problem(F: int, D: int, dtype: torch.dtype) -> None:
    if type(F) is not int or type(D) is not int or F < 1 or D < 1:
        raise ValueError(f"F and D must be positive ints, got F={F!r}, D={D!r}")
    if dtype not in DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")


def _d_tiles(D: int) -> list[int]:
    """Accumulator tiles worth trying: a few powers of two up to the whole (padded) row."""
    cap = min(8192, max(16, _next_pow2(D)))
    return sorted({min(t, cap) for t in (128, 256, 512, cap)})


def search_space(F: int, D: int, dtype: torch.dtype) -> list[CpuVariant]:
    """The default space for an SAE of width F and d_model D (tiles capped by the problem size)."""
    _check_problem(F, D, dtype)
    space: list[CpuVariant] = []
    for d_tile in _d_tiles(D):
        for token_tile in (1, 4, 16):
            for unroll in (2, 4):
                for prefetch in (0, 8, 16):
                    for schedule in SCHEDULES:
                        space.append(
                            CpuVariant("twophase", token_tile, d_tile, unroll, prefetch, 64, 0, schedule)
                        )
    for d_tile in _d_tiles(D):
        for token_tile in (1, 4):
            for scan_width in (32, 128):
                for schedule in ("static", "dynamic"):
                    space.append(CpuVariant("fused", token_tile, d_tile, 4, 0, scan_width, 0, schedule))
    # one thread: wins when other work shares the cores, or for tiny problems where waking threads costs
    # (no barriers to wait at for a thread the OS has descheduled: on a 2-core machine shared with other
    # jobs, fork-join waits of whole time slices dominated every multi-threaded timing we took)
    for d_tile in sorted({_d_tiles(D)[1 if len(_d_tiles(D)) > 1 else 0], _d_tiles(D)[-1]}):
        for token_tile in (1, 4):
            space.append(CpuVariant("twophase", token_tile, d_tile, 4, 8, 64, 1, "static"))
    space.append(CpuVariant("fused", 1, _d_tiles(D)[-1], 4, 0, 64, 1, "static"))
    return space


def default_variant(F: int, D: int, dtype: torch.dtype) -> CpuVariant:
    """The variant fastest over B=1, 32 and 256 at F=65536, D=2304 in fp32 and bf16 (benchmarks/cpu_family.py
    on a 2-core AMD EPYC): two-phase, 4 tokens x 256 columns per unit, rows prefetched 8 ahead."""
    _check_problem(F, D, dtype)
    return CpuVariant("twophase", 4, min(256, max(16, _next_pow2(D))), 4, 8, 64, 0, "dynamic")
