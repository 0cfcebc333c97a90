"""One thread in a child forked from a process whose OpenMP threads were running.

GNU libgomp (torch's CPU wheels bundle it; the generated C kernels link it) is not fork-safe: a child
forked after the parent ran a parallel region inherits a thread pool whose threads do not exist in the
child, and its first parallel region waits for them forever. ``multiprocessing`` forks by default on Linux
before Python 3.14, so a worker that decodes would hang in torch's own ops as well as in the C kernels.

``os.register_at_fork`` marks such a child: if the parent had more than one OS thread when it forked (a
live OpenMP pool has some; a parent that never ran a parallel region has one thread and its children may
use all cores), the child sets torch to one thread, as torch's DataLoader does in its workers, and
``threads()`` makes the C kernels run one thread whatever their variant asks. ``reason()`` says so for
``explain``. ``import sae_tune`` registers the hook (this module imports nothing heavy), so a parent that
only imported the package and later forks is covered too.
"""

from __future__ import annotations

import os
import sys

_parent_threads = 1
_single = False


def _os_threads() -> int:
    """OS threads of this process (Linux); 1 where that cannot be read (no GNU libgomp hang to fear)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _before_fork() -> None:
    global _parent_threads
    _parent_threads = _os_threads()


def _after_fork_in_child() -> None:
    global _single
    if _parent_threads > 1:
        _single = True
        torch = sys.modules.get("torch")  # not imported: no torch thread pool to fear
        if torch is not None:
            torch.set_num_threads(1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def single_threaded() -> bool:
    """True in a child forked from a process with running threads: OpenMP must stay at one thread."""
    return _single


def threads(requested: int) -> int:
    """The thread count a C kernel may use: ``requested``, or 1 in such a forked child."""
    return 1 if _single else requested


def reason() -> str | None:
    """Why this process runs one thread, for ``explain``; None when it does not."""
    if not _single:
        return None
    return (
        "forked from a process with running OpenMP threads: one thread (GNU libgomp cannot start a "
        "parallel region after fork)"
    )
