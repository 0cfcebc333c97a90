"""``sparse_decode`` from several Python threads at once, and in a child forked (``multiprocessing``'s
``fork``, Linux's default before Python 3.14) after the parent ran OpenMP kernels: right results, no hang.
Every wait has a timeout, so a hang fails the test instead of stopping the run."""

import dataclasses
import multiprocessing
import sys
import threading

import pytest
import torch
from conftest import assert_matches_dense, random_acts, random_weights, require

from sae_tune import explain, forksafe, sparse_decode
from sae_tune.cache.store import CacheKey, Provenance, WinnerRecord
from sae_tune.device import describe_device
from sae_tune.dispatch import Dispatcher, reload, set_dispatcher
from sae_tune.targets import by_name, templates_hash
from sae_tune.targets.cpu import launch
from sae_tune.targets.cpu.variant import default_variant

CPU = torch.device("cpu")
F, D, B = 2048, 64, 64
WAIT_S = 120  # generous for a loaded machine; a hang waits forever


@pytest.fixture(autouse=True)
def _isolated(isolated_dispatch):
    yield
    reload()


@pytest.fixture
def two_threads():
    """At least two OpenMP threads in this process (a pool the fork leaves behind), on any machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield
    torch.set_num_threads(before)


def cpu_available() -> bool:
    return by_name("cpu").available(CPU) is None


def _cpu_record(f: int, d: int, dtype: torch.dtype, threads: int) -> WinnerRecord:
    config = dataclasses.replace(default_variant(f, d, dtype), threads=threads).to_dict()
    name = str(dtype).removeprefix("torch.")
    key = CacheKey.for_device(
        describe_device(CPU), template_hash=templates_hash(), dtype=name, F=f, D=d, batch_size=B, mean_l0=8
    )
    return WinnerRecord(key, "cpu", config, 1.0, 10.0, Provenance.current())


def _use(*records: WinnerRecord) -> None:
    set_dispatcher(Dispatcher(local_records=list(records), shipped_records=[]))


def test_threads_decode_different_shapes_and_dtypes_at_once(tmp_path, monkeypatch):
    # fresh kernel folder and no loaded kernels: the threads' first calls build the C kernels concurrently
    monkeypatch.setenv("SAE_TUNE_KERNEL_DIR", str(tmp_path / "kernels"))
    launch.forget_built()
    # two threads per (shape, dtype): the same kernel built by two at once, and two plans made at once; the
    # C kernels as tuned winners, fp16 through the cost model
    cases = [(F, D, torch.float32), (F // 2, D // 2, torch.bfloat16), (F, D, torch.float16)] * 2
    if cpu_available():
        _use(*(_cpu_record(f, d, dtype, threads=0) for f, d, dtype in cases[:2]))
    errors: list[str] = []
    used: set[str] = set()
    start = threading.Barrier(len(cases))

    def work(i: int, f: int, d: int, dtype: torch.dtype) -> None:
        try:
            W, b = random_weights(f, d, dtype, seed=i % 4)
            start.wait(timeout=WAIT_S)
            for round_ in range(2):
                acts = random_acts(B // 2 + 8 * round_, f, 5 + round_, dtype, seed=10 * i + round_)
                assert_matches_dense(sparse_decode(acts, W, b), acts, W, b)
                used.add(explain(acts, W, b).implementation)
        except Exception as exc:  # reported by the main thread
            errors.append(f"case {i} ({f}, {d}, {dtype}): {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(i, *c), daemon=True) for i, c in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads), "a decoding thread hung"
    assert not errors, errors
    assert "cpu" in used or not cpu_available()


def _decode_in_child(conn, acts, W, b) -> None:
    out = sparse_decode(acts, W, b)
    conn.send((out.tolist(), str(explain(acts, W, b)), torch.get_num_threads(), forksafe.single_threaded()))
    conn.close()


@pytest.mark.skipif(sys.platform != "linux", reason="fork with GNU libgomp: Linux")
@pytest.mark.parametrize("winner", [None, 0, 2], ids=["model", "cpu-all-threads", "cpu-2-threads"])
def test_forked_child_after_openmp_decodes_without_hanging(two_threads, winner):
    if winner is not None:
        require(cpu_available(), "needs a C compiler for the cpu target (.ci/run's machine has gcc)")
        _use(_cpu_record(F, D, torch.float32, threads=winner))
    acts = random_acts(B, F, 9, torch.float32)
    W, b = random_weights(F, D, torch.float32)
    assert_matches_dense(sparse_decode(acts, W, b), acts, W, b)  # OpenMP threads run in the parent
    chosen = explain(acts, W, b).implementation
    assert chosen == "cpu" or winner is None
    torch.ones(512, 512) @ torch.ones(512, 512)  # and torch's own
    context = multiprocessing.get_context("fork")
    parent_end, child_end = context.Pipe(duplex=False)
    child = context.Process(target=_decode_in_child, args=(child_end, acts, W, b), daemon=True)
    child.start()
    child_end.close()
    try:
        assert parent_end.poll(WAIT_S), "the forked child hung (GNU libgomp after fork)"
        out, reason, child_threads, single = parent_end.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    assert_matches_dense(torch.tensor(out, dtype=torch.float32), acts, W, b)
    assert single and child_threads == 1
    assert "forked from a process with running OpenMP threads: one thread" in reason
    assert chosen in reason  # the same path, one thread
    assert torch.get_num_threads() >= 2 and not forksafe.single_threaded()  # the parent keeps its threads


def test_a_child_of_a_single_threaded_parent_keeps_its_threads(monkeypatch):
    """A parent with no thread pool (one OS thread when it forks) has nothing the child could wait for."""
    monkeypatch.setattr(forksafe, "_os_threads", lambda: 1)
    monkeypatch.setattr(forksafe, "_single", False)
    forksafe._before_fork()
    forksafe._after_fork_in_child()  # what the fork hook runs in the child
    assert not forksafe.single_threaded() and forksafe.threads(4) == 4 and forksafe.reason() is None
