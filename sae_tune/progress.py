"""Progress of long steps on stderr, so that no command sits silent for minutes.

On a terminal it is a tqdm bar; anywhere else (a pipe, a log file, CI) a plain line at most every
``SAE_TUNE_PROGRESS_INTERVAL`` seconds (default 5) with done/total, the time elapsed and an estimate of the
time left, and a closing line for a step that took that long. It writes to stderr only, so stdout (tables,
JSON) stays exactly what it was. It imports nothing heavy: tqdm only when a bar is shown.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

T = TypeVar("T")

INTERVAL_ENV = "SAE_TUNE_PROGRESS_INTERVAL"
DEFAULT_INTERVAL = 5.0


class ProgressSettingError(ValueError):
    """SAE_TUNE_PROGRESS_INTERVAL is not a number of seconds (the command line shows it as one line)."""


def progress_interval() -> float:
    """Seconds between two progress lines off a terminal: ``SAE_TUNE_PROGRESS_INTERVAL`` or 5; 0 prints
    every step (tests use it)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ProgressSettingError(
            f"{INTERVAL_ENV}={raw!r}: give the seconds between progress lines, a number >= 0 such as 5"
        )
    return value


def duration(seconds: float) -> str:
    """A short human duration: 12.3 s, 4 min 05 s, 1 h 02 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(round(seconds))
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # a closed or unusual stream is not a terminal
        return False


class Progress:
    """One long step of ``total`` units (None: unknown) named ``desc``; ``update`` after each unit.

    ``stream`` defaults to the current sys.stderr, ``interval`` to ``progress_interval()``, ``tty`` to
    whether the stream is a terminal; ``clock`` is injectable for tests; ``enabled=False`` shows nothing
    (a library call whose caller did not ask for progress). Use it as a context manager (or
    call ``close``): the closing line says how far it got and how long it took."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        *,
        unit: str = "step",
        stream: TextIO | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
        enabled: bool = True,
    ) -> None:
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
            raise ValueError(f"total must be None or an int >= 0, not {total!r}")
        if interval is None:
            interval = progress_interval() if enabled else DEFAULT_INTERVAL
        elif isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval >= 0:
            raise ValueError(f"interval must be a number of seconds >= 0, not {interval!r}")
        elif math.isinf(interval):
            raise ValueError(f"interval must be finite, not {interval!r}")
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.interval, self.clock = float(interval), clock
        self.enabled = enabled
        self.tty = enabled and (_is_tty(self.stream) if tty is None else tty)
        self.started = self.last = clock()
        self.done = 0
        self.note = ""
        self.printed = False
        self.closed = False
        self._bar: Any = None
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream, leave=False)

    def update(self, n: int = 1, note: str | None = None) -> None:
        """``n`` more units done; ``note`` (such as the best time so far) is shown with the count."""
        self.done += n
        if note is not None:
            self.note = note
        if self._bar is not None:
            self._bar.update(n)
            if note is not None:
                self._bar.set_postfix_str(note)
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._write(self.line(now))

    def describe(self, desc: str) -> None:
        """Rename the step (a phase of it); the bar shows it, the next line names it."""
        self.desc = desc
        if self._bar is not None:
            self._bar.set_description_str(desc)

    def line(self, now: float) -> str:
        """The progress line at time ``now``: done/total, elapsed and the estimated time left."""
        elapsed = now - self.started
        if self.total is None:
            count = f"{self.done} {self.unit}s"
            eta = ""
        else:
            count = f"{self.done}/{self.total} {self.unit}s"
            if self.done and self.done < self.total:
                eta = f", about {duration(elapsed / self.done * (self.total - self.done))} left"
            elif self.done >= self.total:
                eta = ", 0.0 s left"
            else:
                eta = ", time left unknown"
        note = f" ({self.note})" if self.note else ""
        return f"{self.desc}: {count}, {duration(elapsed)} elapsed{eta}{note}"

    def close(self) -> None:
        """End the step: the closing line (off a terminal, when the step lasted an interval or printed)."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.close()
            return
        now = self.clock()
        if not (self.printed or now - self.started >= self.interval):
            return  # a quick step stays quiet
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        verb = "stopped at" if self.total is not None and self.done < self.total else "done,"
        note = f" ({self.note})" if self.note else ""
        self._write(f"{self.desc}: {verb} {count} {self.unit}s in {duration(now - self.started)}{note}")

    def _write(self, text: str) -> None:
        if not self.enabled:
            return
        self.printed = True
        try:
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not stop the work it reports on
            pass

    def wrap(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, counting each one done when the next is asked for; closes at the end."""
        try:
            for item in items:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], desc: str, *, unit: str = "step", **options: Any) -> Iterator[T]:
    """``items`` with progress: ``Progress(len(items), desc, unit=unit, **options).wrap(items)``."""
    items = list(items)
    return Progress(len(items), desc, unit=unit, **options).wrap(items)
