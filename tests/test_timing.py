import time

import pytest

from sae_tune.autotune.timing import Timing, time_cpu, time_cuda, time_interleaved


def test_time_cpu_takes_the_median_after_warmup():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002 if len(calls) > 2 else 0.05)  # slow warm-up runs are not counted

    t = time_cpu(fn, warmup=2, repeat=5)
    assert len(calls) == 7 and len(t.samples) == 5
    assert t.ms > 1.5 and t.ms < 20


def test_time_cpu_stops_early_when_one_run_is_slow():
    t = time_cpu(lambda: time.sleep(0.03), warmup=0, repeat=100, budget_s=0.1)
    assert 3 <= len(t.samples) < 100


def test_interleaved_orders_two_functions_by_their_cost():
    timings = time_interleaved(
        {"fast": lambda: time.sleep(0.001), "slow": lambda: time.sleep(0.01)}, "cpu", rounds=5
    )
    assert timings["fast"].ms < timings["slow"].ms
    assert all(len(t.samples) == 5 for t in timings.values())


def test_spread():
    assert Timing(1.0, (1.0, 1.0, 1.0, 1.0)).spread == 0.0
    assert Timing(2.0, (1.0, 2.0, 2.0, 3.0, 9.0)).spread > 0


def test_spread_of_few_samples_is_measured_not_zero():
    """Two or three samples (a slow candidate on CPU) still say how noisy they were."""
    assert Timing(2.0, (1.0, 2.0, 3.0)).spread == pytest.approx(0.5)
    assert Timing(2.0, (1.0, 3.0)).spread == pytest.approx(0.5)
    assert Timing(2.0, (2.0,)).spread == 0.0


def test_time_cuda_keeps_every_do_bench_sample(monkeypatch):
    testing = pytest.importorskip("triton.testing")
    calls = []

    def do_bench(fn, *, warmup, rep, return_mode):
        calls.append(return_mode)
        return [1.0, 1.0, 1.2, 3.0, 1.1]

    monkeypatch.setattr(testing, "do_bench", do_bench)
    t = time_cuda(lambda: None)
    assert calls == ["all"] and t.ms == 1.1 and len(t.samples) == 5 and t.spread > 0
