"""Cold-cache timing on CPU: rewrite a buffer larger than the last-level cache before every timed call.

Without it the order of an interleaved round decides the result: a sparse path that runs right after
another one finds the same fired W_dec rows still cached and looks up to 2.5x faster than one that runs
after dense (measured on this project's machine, 480 MiB L3). Every call starting cold makes a row's
ratios independent of the order, and matches CUDA, where ``do_bench`` clears the L2 cache between runs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

MIN_FLUSH = 64 << 20
MAX_FLUSH = 1 << 30
UNKNOWN_CACHE_FLUSH = 256 << 20
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def last_level_cache_bytes(root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """Size of the highest-level CPU cache Linux reports, or None where it does not say."""
    best: tuple[int, int] | None = None
    for entry in sorted(root.glob("index*")):
        try:
            level = int((entry / "level").read_text().strip())
            text = (entry / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        unit = _UNITS.get(text[-1:], 1)
        digits = text[:-1] if text[-1:] in _UNITS else text
        if not digits.isdigit():
            continue
        size = int(digits) * unit
        if best is None or level > best[0]:
            best = (level, size)
    return None if best is None else best[1]


def default_flush_bytes() -> int:
    """Twice the last-level cache, within [64 MiB, 1 GiB]; 256 MiB where the cache size is unknown."""
    llc = last_level_cache_bytes()
    if llc is None:
        return UNKNOWN_CACHE_FLUSH
    return max(MIN_FLUSH, min(MAX_FLUSH, 2 * llc))


class CacheFlush:
    """Callable that reads and writes ``nbytes`` of memory (an in-place add: every line is loaded, so the
    buffer displaces the cache, which streaming stores of a plain fill might not). 0 bytes: a no-op."""

    def __init__(self, nbytes: int) -> None:
        if type(nbytes) is not int or nbytes < 0:
            raise ValueError(f"flush size must be a non-negative int of bytes, got {nbytes!r}")
        self.nbytes = nbytes
        self._buffer: torch.Tensor | None = None

    def __call__(self) -> None:
        if self.nbytes == 0:
            return
        if self._buffer is None:
            self._buffer = torch.zeros(self.nbytes // 4, dtype=torch.int32)
        self._buffer.add_(1)

    def cost_ms(self) -> float:
        """Milliseconds of one flush (sizes the timing rounds; never part of a measurement)."""
        self()
        t0 = time.perf_counter()
        self()
        return (time.perf_counter() - t0) * 1e3
