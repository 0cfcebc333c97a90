"""Kernel variants: one frozen, validated set of template parameters.

A ``Variant`` is the only thing that reaches a template. Every field is checked on construction (type,
allowed values, powers of two where Triton needs them), so a value read from a config file, a cache row or
a command line can never put anything into generated source that is not one of a few known numbers or
words.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from sae_tune.targets.fields import check_fields

ALLOCS = ("chunked", "exact", "fixed")
OVERFLOWS = ("validate", "fallback", "unchecked")
# Fields that apply to one allocation only; elsewhere they must keep their default.
_ALLOC_FIELDS = {"fixed": ("overflow", "max_l0"), "chunked": ("chunk_slots", "unit_chunks")}

# Inclusive bounds of every integer field; power-of-two fields are marked.
_INT_FIELDS: dict[str, tuple[int, int, bool]] = {
    "max_l0": (1, 1 << 20, False),
    "block_f": (256, 8192, True),
    "block_d": (16, 2048, True),
    "block_l": (1, 64, True),
    "num_warps": (1, 16, True),
    "num_warps_build": (1, 16, True),
    "num_stages": (1, 4, False),
    "chunk_slots": (1, 64, True),
    "unit_chunks": (1, 1024, True),
}

# Elements of the gathered BLOCK_L x BLOCK_D tile one thread may hold: the decode keeps the tile and a
# 2-D accumulator of the same shape, so the default space stays under it (compile-check proves it builds
# without spills).
TILE_ELEMS_PER_THREAD = 32
# Chunked heads of the default space: (block_f, chunk_slots, unit_chunks).
CHUNKED_HEADS = ((1024, 8, 8), (1024, 16, 4), (4096, 16, 2))


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@dataclass(frozen=True)
class Variant:
    """One point of the kernel family.

    alloc     "chunked" (default): each BLOCK_F chunk of a token owns chunk_slots slots, filled in
              feature order without atomics; an over-full chunk is decoded by a walk of that chunk
              only; no host sync, exact for any L0, deterministic. "exact": count, cumsum, fill (one
              host sync for the size); "fixed": B x max_l0 slots.
    overflow  fixed only. "validate": sync and raise if a token has more than max_l0 non-zeros;
              "fallback": no sync, over-full tokens are decoded from their dense row on the device;
              "unchecked": truncates, runs only when the caller allows truncation.
    max_l0    fixed only: slots per token.
    chunk_slots  chunked only: slots per BLOCK_F chunk of a token.
    unit_chunks  chunked only: chunks per decode work unit; a token is cdiv(F, block_f * unit_chunks)
              units whose fp32 partial sums are reduced in unit order (one unit: no partials).
    block_f   features per program when building the sparse view.
    block_d   output columns per decode program.
    block_l   non-zeros gathered per decode step (1 = scalar loop).
    num_warps / num_warps_build / num_stages  launch options of the decode and build kernels.

    The default decode tile (8 x 256, 2 warps) puts both warps along D: in fp32 each thread owns one
    128-bit vector of every row of the tile, so Triton's layout gives each thread all 8 slot indices and
    values contiguously (two 128-bit loads each instead of 8 scalar ones) and the final reduction stays in
    the thread (no barrier, no shared memory). compile-check's ``ldg_narrow`` counts what stays scalar.
    """

    alloc: str = "chunked"
    overflow: str = "fallback"
    max_l0: int = 128
    block_f: int = 1024
    block_d: int = 256
    block_l: int = 8
    num_warps: int = 2  # with block_d 256: every warp along D, so a thread holds all BLOCK_L rows (below)
    num_warps_build: int = 4
    num_stages: int = 2
    chunk_slots: int = 8
    unit_chunks: int = 8

    def __post_init__(self) -> None:
        check_fields("Variant", self, {"alloc": ALLOCS, "overflow": OVERFLOWS}, _INT_FIELDS)
        defaults = Variant.__dataclass_fields__
        for alloc, names in _ALLOC_FIELDS.items():
            if self.alloc == alloc:
                continue
            for name in names:
                if getattr(self, name) != defaults[name].default:
                    raise ValueError(
                        f"Variant.{name} applies to alloc={alloc!r} only; leave it unset for {self.alloc}"
                    )

    # --- identity -----------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """Short, stable, human-readable name (also a cache and CLI identifier)."""
        if self.alloc == "exact":
            head = "exact"
        elif self.alloc == "chunked":
            head = f"chunked-c{self.chunk_slots}-u{self.unit_chunks}"
        else:
            head = f"fixed-{self.overflow}-m{self.max_l0}"
        return (
            f"{head}-f{self.block_f}-d{self.block_d}-l{self.block_l}"
            f"-w{self.num_warps}-wb{self.num_warps_build}-s{self.num_stages}"
        )

    @property
    def can_truncate(self) -> bool:
        """True when this variant may silently drop features of a token with more than max_l0."""
        return self.alloc == "fixed" and self.overflow == "unchecked"

    @property
    def host_sync(self) -> bool:
        """True when a call waits for the device (exact: the CSR size; validate: the largest count).

        A variant without one can be captured in a CUDA graph and never stalls the host.
        """
        return self.alloc == "exact" or (self.alloc == "fixed" and self.overflow == "validate")

    @property
    def fallback_rows(self) -> int:
        """Rows per step of the dense-row walk of over-full tokens (fallback policy)."""
        return max(1, min(32, 2048 // self.block_d))

    def template_params(self) -> dict[str, Any]:
        """What the templates see. max_l0 and launch options are runtime values, not source."""
        return {
            "alloc": self.alloc,
            "fallback": self.alloc == "fixed" and self.overflow == "fallback",
            "block_f": self.block_f,
            "block_d": self.block_d,
            "block_l": self.block_l,
            "fallback_slice": min(self.block_f, 1024),
            "fallback_rows": self.fallback_rows,
            "chunk_slots": self.chunk_slots,
            "unit_chunks": self.unit_chunks,
            "unroll": self.alloc == "chunked" and self.chunk_slots * self.unit_chunks <= 16 * self.block_l,
        }

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for alloc, names in _ALLOC_FIELDS.items():
            if self.alloc != alloc:
                for name in names:
                    del data[name]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Variant:
        """Build from an outside mapping; unknown keys are an error naming the key."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a variant must be a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValueError(f"unknown variant field(s): {', '.join(unknown)}")
        return cls(**dict(data))

    # --- search space -------------------------------------------------------------------------------
    @staticmethod
    def search_space(
        F: int,
        D: int,
        dtype: torch.dtype = torch.float32,
        *,
        max_l0s: Iterable[int] = (64, 128, 256),
        allow_unchecked: bool = False,
    ) -> list[Variant]:
        """The default space for an SAE of width F and d_model D.

        Block sizes are capped by the problem size, and tiles that would not fit one thread's registers
        are left out. ``unchecked`` appears only when the caller allows truncation. Chunked variants
        gather 8 to 32 slots per step (their slots include empty ones); the others 1 to 16 non-zeros.
        """
        if F < 1 or D < 1:
            raise ValueError(f"F and D must be positive, got F={F}, D={D}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        f_cap, d_cap = max(256, next_pow2(F)), max(32, next_pow2(D))
        block_fs = sorted({min(bf, f_cap) for bf in (1024, 4096)})

        def decode(block_ls: tuple[int, ...], min_per_thread: int = 1) -> list[tuple[int, int, int]]:
            return [
                (bd, bl, w)
                for bd in (64, 128, 256, 512)
                if bd <= d_cap
                for bl in block_ls
                for w in (2, 4, 8)
                # every thread owns a column of the tile: 8 warps on 128 columns spill (compile-check)
                if bd >= 32 * w and min_per_thread * 32 * w <= bl * bd <= TILE_ELEMS_PER_THREAD * 32 * w
            ]

        chunked = sorted({(min(bf, f_cap), slots, units) for bf, slots, units in CHUNKED_HEADS})
        space = [
            Variant(block_f=bf, chunk_slots=slots, unit_chunks=units, block_d=bd, block_l=bl, num_warps=w)
            for bf, slots, units in chunked
            for bd, bl, w in decode((8, 16, 32), min_per_thread=4)  # a 128-bit fp32 vector per thread
            # 8 warps gathering 32 x 256 tiles spill 8 bytes on sm_80 (compile-check of the whole space)
            if not (w == 8 and bl == 32)
        ]
        heads: list[dict[str, Any]] = [{"alloc": "exact"}]
        overflows = ("validate", "fallback") + (("unchecked",) if allow_unchecked else ())
        for m in sorted(set(max_l0s)):
            heads += [{"alloc": "fixed", "overflow": o, "max_l0": m} for o in overflows]
        return space + [
            Variant(**head, block_f=bf, block_d=bd, block_l=bl, num_warps=w)
            for head in heads
            for bf in block_fs
            for bd, bl, w in decode((1, 4, 16))
        ]
