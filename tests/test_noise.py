"""Noise is never stored as truth: a noisy timing is re-measured (bounded), kept flagged when it stays
noisy, shown flagged, and replaced by the next quiet measurement of its key without --retune; a busy
machine is reported once. Every timing here is injected, so nothing depends on this machine's real load."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_key, random_acts, random_weights

from sae_tune import explain
from sae_tune.autotune import search, timing
from sae_tune.autotune.search import Tuner, quiet_optuna
from sae_tune.autotune.timing import NOISY_RETRIES, Timing, busy_reason
from sae_tune.bench.measure import Measurement
from sae_tune.bench.report import markdown
from sae_tune.bench.runner import BenchResult, Stamp
from sae_tune.cache.store import NOISY_SPREAD, CacheKey, Store, format_ms
from sae_tune.cli.main import main
from sae_tune.cli.tune import format_table
from sae_tune.device import describe_device
from sae_tune.dispatch import reload
from sae_tune.specs import spec_from_shape
from sae_tune.targets import templates_hash

SPEC = spec_from_shape(1024, 32, 8)
ACTS = random_acts(16, 1024, 8, torch.float32)  # calibrates the tuner at once (no synthetic sample)
quiet_optuna()


def tuner(store: Store, **kw) -> Tuner:
    return Tuner(SPEC, store=store, acts=ACTS, **kw)


def noisy(ms: float) -> Timing:
    """Samples from a tenth to ten times the median: a spread of about 990%."""
    return Timing(ms, (ms / 10, ms / 10, ms, ms * 10, ms * 10))


def quiet(ms: float) -> Timing:
    return Timing(ms, (ms * 0.99, ms, ms, ms, ms * 1.01))


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "cache.sqlite") as s:
        yield s


@pytest.fixture(autouse=True)
def quiet_load(monkeypatch):
    """The machine's real load average must not decide any test here."""
    monkeypatch.setattr(timing, "load_average", lambda: 0.0)


def test_the_injected_timings_are_what_they_claim():
    assert noisy(1.0).noisy and noisy(1.0).spread > 9 and not quiet(1.0).noisy
    assert not Timing(1.0, (1.0,)).noisy  # a single sample shows no spread: unknown, not noisy
    assert not Timing(2.0, (1.0, 2.0, 3.0)).noisy  # spread exactly NOISY_SPREAD: the edge is quiet
    assert Timing(2.0, (1.0, 2.0, 3.0)).spread == NOISY_SPREAD


# --- the store --------------------------------------------------------------------------------------


def test_a_noisy_winner_gives_way_to_a_slower_quiet_one(store):
    key = make_key()
    assert store.set_winner_if_faster(key, "sparse_csr", {}, 0.558, 522.0, spread=70.09)
    assert store.winner(key).noisy and format_ms(0.558, 70.09) == "0.558 ms ±7009% (noisy)"
    # a quiet measurement replaces it although it is ten times slower: the noisy time was not a speed
    assert store.set_winner_if_faster(key, "dense", {}, 5.0, 522.0, spread=0.03)
    assert (store.winner(key).impl, store.winner(key).noisy) == ("dense", False)
    # a noisy measurement never replaces a quiet winner, however fast it looks
    assert not store.set_winner_if_faster(key, "sparse_coo", {}, 0.1, 522.0, spread=3.0)
    # between quiet ones, and between noisy ones, the faster wins as before
    assert store.set_winner_if_faster(key, "sparse_coo", {}, 4.0, 522.0, spread=0.1)
    assert not store.set_winner_if_faster(key, "sparse_csr", {}, 4.5, 522.0, spread=0.1)
    other = make_key(batch_bucket=64)
    assert store.set_winner_if_faster(other, "sparse_csr", {}, 2.0, 9.0, spread=2.0)
    assert not store.set_winner_if_faster(other, "dense", {}, 3.0, 9.0, spread=2.0)
    assert store.set_winner_if_faster(other, "dense", {}, 1.0, 9.0, spread=2.0)


def test_cache_show_says_noisy_for_a_noisy_winner(tmp_path):
    path = tmp_path / "c.sqlite"
    with Store(path) as s:
        s.set_winner_if_faster(make_key(), "sparse_csr", {}, 0.558, 522.0, spread=70.09)
        s.set_winner_if_faster(make_key(batch_bucket=64), "dense", {}, 2.0, 4.0, spread=0.02)
    shown = CliRunner().invoke(main, ["cache", "show", "--cache", str(path)])
    assert shown.exit_code == 0, shown.output
    noisy_line = next(line for line in shown.output.splitlines() if "sparse_csr" in line)
    assert "±7009% (noisy)" in noisy_line and "935.48x (noisy)" in noisy_line
    quiet_line = next(line for line in shown.output.splitlines() if "2.000 ms" in line)
    assert "noisy" not in quiet_line
    as_json = json.loads(CliRunner().invoke(main, ["cache", "show", "--cache", str(path), "--json"]).output)
    assert sorted(w["noisy"] for w in as_json["winners_list"]) == [False, True]


def test_explain_says_noisy_for_a_noisy_winner(isolated_dispatch, tmp_path):
    F, D = 512, 48
    key = CacheKey.for_device(
        describe_device(torch.device("cpu")),
        template_hash=templates_hash(),
        dtype="float32",
        F=F,
        D=D,
        batch_size=8,
        mean_l0=8,
    )
    with Store(tmp_path / "cache.sqlite") as s:
        s.set_winner_if_faster(key, "sparse_coo", {}, 0.558, 522.0, spread=70.09)
    reload()
    W, b = random_weights(F, D, torch.float32)
    decision = explain(random_acts(8, F, 6, torch.float32), W, b)
    assert decision.source == "cache" and "0.558 ms ±7009% (noisy)" in decision.reason


# --- re-measuring ------------------------------------------------------------------------------------


def test_a_noisy_candidate_is_re_measured_and_the_quietest_kept(store, monkeypatch):
    given = [noisy(1.0), quiet(3.0), noisy(0.5)]
    monkeypatch.setattr(search, "time_fn", lambda fn, device: given.pop(0))
    t = tuner(store)
    got = t.measure(search.Candidate.of("dense", {}), t.workload(4))
    assert got == quiet(3.0) and len(given) == 1  # stopped at the first quiet round


def test_re_measuring_is_bounded_and_keeps_the_quietest_noisy_one(store, monkeypatch):
    given = [noisy(1.0), Timing(2.0, (1.0, 2.0, 2.0, 4.0, 5.0)), noisy(0.5), quiet(9.0)]
    monkeypatch.setattr(search, "time_fn", lambda fn, device: given.pop(0))
    t = tuner(store)
    got = t.measure(search.Candidate.of("dense", {}), t.workload(4))
    assert len(given) == 4 - (1 + NOISY_RETRIES) and got.ms == 2.0 and got.noisy  # least noisy of three


def _inject(monkeypatch, make, scale: float) -> list[int]:
    """Every timing of the tuner is ``make(ms)``: dense at 100 ms x scale, every other path faster by a
    fixed amount per label; returns a list counting the final re-timing runs."""
    finals: list[int] = []

    def ms_of(label: str) -> float:
        return scale * (100.0 if label == "dense" else 1.0 + len(label) / 100)

    def interleaved(fns, device, rounds=7):
        finals.append(1)
        return {label: make(ms_of(label)) for label in fns}

    monkeypatch.setattr(search, "time_fn", lambda fn, device: make(scale))
    monkeypatch.setattr(search, "time_interleaved", interleaved)
    return finals


def test_a_noisy_winner_is_stored_flagged_then_replaced_by_a_slower_quiet_one(store, monkeypatch):
    finals = _inject(monkeypatch, noisy, 1.0)
    said: list[str] = []
    first = tuner(store, notice=said.append).tune_batch(8, trials=2)
    assert len(finals) == 1 + NOISY_RETRIES  # the final re-timing was repeated while noisy, then kept
    assert first.noisy and first.to_json()["noisy"] and first.best_spread > NOISY_SPREAD
    stored = store.winner(first.key)
    assert stored.noisy and stored.ms == first.best_ms
    table = format_table([first])
    row = table.splitlines()[-1]
    assert f"~{first.speedup:.2f}x" in row and "±" in row
    # the next run, quiet and ten times slower, replaces the flagged winner without --retune
    finals = _inject(monkeypatch, quiet, 10.0)
    again = tuner(store).tune_batch(8, trials=2)
    assert len(finals) == 1 and not again.noisy and "noisy" not in format_table([again])
    replaced = store.winner(first.key)
    assert not replaced.noisy and replaced.ms == again.best_ms > stored.ms


def test_a_busy_machine_is_reported_once(store, monkeypatch):
    _inject(monkeypatch, quiet, 1.0)
    monkeypatch.setattr(timing, "load_average", lambda: 31.0)
    monkeypatch.setattr(timing, "usable_cpus", lambda: 2)
    said: list[str] = []
    t = tuner(store, notice=said.append)
    t.tune_batch(8, trials=2)
    t.tune_batch(64, trials=2)
    assert len(said) == 1 and "looks busy (load average 31.0 on 2 CPUs)" in said[0]


def test_noisy_baselines_make_the_machine_look_busy_and_a_quiet_one_is_not_reported(store, monkeypatch):
    _inject(monkeypatch, quiet, 1.0)
    said: list[str] = []
    tuner(store, notice=said.append).tune_batch(8, trials=2)
    assert said == []
    _inject(monkeypatch, noisy, 1.0)
    tuner(store, notice=said.append).tune_batch(8, trials=2)
    assert len(said) == 1 and "the baselines' timings spread" in said[0]


def test_busy_reason_reads_the_load_average_against_the_cpus(monkeypatch):
    monkeypatch.setattr(timing, "usable_cpus", lambda: 4)
    monkeypatch.setattr(timing, "load_average", lambda: 5.9)
    assert busy_reason([quiet(1.0)]) is None
    monkeypatch.setattr(timing, "load_average", lambda: 6.0)
    assert "load average 6.0 on 4 CPUs" in busy_reason([])
    monkeypatch.setattr(timing, "load_average", lambda: None)  # no load average (Windows)
    assert busy_reason([quiet(1.0), noisy(1.0), noisy(2.0)]).startswith("the baselines' timings spread")


def test_bench_tables_flag_noisy_times_and_their_ratios():
    from test_bench import TINY

    stamp = Stamp("cpu", "cpu-x", "", "x", 2, "2.13.0", "-", "0", "float32", "2026-01-01", "tiny", 0)
    rows = (
        Measurement("summary", "dense", "ms", 10.0, "ms", vs_dense=1.0, spread=0.02),
        Measurement("summary", "sparse_csr", "ms", 0.558, "ms", vs_dense=17.92, spread=70.09),
        Measurement("summary", "sparse_coo", "ms", 2.0, "ms", vs_dense=5.0, spread=0.1),
    )
    md = markdown(BenchResult(rows, stamp, TINY, False, "", 1.0))
    lines = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
    assert "0.558 (noisy)" in lines["| sparse_csr"] and "17.92x (noisy)" in lines["| sparse_csr"]
    assert "noisy" not in lines["| dense"] + lines["| sparse_coo"]
    assert "- (noisy): the interquartile range" in md
    quiet = markdown(BenchResult(rows[::2], stamp, TINY, False, "", 1.0))
    assert "noisy" not in quiet


def test_a_noisy_encode_winner_says_so_and_gives_way_to_a_slower_quiet_one(store, monkeypatch):
    from sae_tune.autotune import encode_search
    from sae_tune.cli.tune import format_encode_table

    real_race = encode_search.race

    def race(make, scale):
        def fake(request, problem, *, budget_s=None, progress=iter):
            timings, failures, finalists = real_race(request, problem, budget_s=0.0, progress=progress)
            return {c: make(scale * (1 + i)) for i, c in enumerate(timings)}, failures, finalists

        return fake

    W = encode_search.random_w_enc(256, 16, dtype=torch.float32, device=torch.device("cpu"), seed=0)
    args = dict(batch_size=8, activation="relu", k=None, l0=8.0, info=describe_device(torch.device("cpu")))
    monkeypatch.setattr(encode_search, "race", race(noisy, 1.0))
    first = encode_search.tune_encode(store, W, **args)
    assert first.noisy and store.winner(first.key).noisy
    encode_row = format_encode_table([first]).splitlines()[-1]
    assert "(noisy)" in encode_search.describe(first) and "~" in encode_row and "±" in encode_row
    monkeypatch.setattr(encode_search, "race", race(quiet, 10.0))
    again = encode_search.tune_encode(store, W, **args)
    assert not again.noisy and "noisy" not in encode_search.describe(again)
    assert store.winner(first.key).ms == again.best_ms > first.best_ms  # slower, quiet: stored
