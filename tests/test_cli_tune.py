import inspect
import json

import pytest
from click.testing import CliRunner

from sae_tune.cache.store import Store
from sae_tune.cli.main import main

SMALL = ["--width", "2048", "--d-model", "32", "--l0", "8", "--device", "cpu", "--trials", "3"]


def runner() -> CliRunner:
    """stdout and stderr apart (click < 8.2 needs mix_stderr=False for that)."""
    if "mix_stderr" in inspect.signature(CliRunner).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()


def invoke(*args: str):
    return runner().invoke(main, list(args), catch_exceptions=False)


def test_json_output_has_a_results_entry_per_batch_size(tmp_path):
    cache = tmp_path / "c.sqlite"
    result = invoke(*SMALL, "--batch-size", "4", "--batch-size", "16", "--cache", str(cache), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [r["batch_size"] for r in payload["results"]] == [4, 16]
    for r in payload["results"]:
        assert {"batch_size", "best_impl", "best_config", "best_ms", "dense_ms", "speedup"} <= set(r)
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["best_ms"])
    with Store(cache) as store:
        assert len(store.winners()) == 2 and store.summary()["trials"] > 0


def test_table_output_and_preset_names(tmp_path):
    result = invoke(*SMALL, "--batch-size", "2", "--cache", str(tmp_path / "c.sqlite"))
    assert result.exit_code == 0
    assert "winner" in result.output and "vs dense" in result.output and "F=2048 D=32" in result.output
    # every line fits a terminal of 120 columns (the tables, their legends, the header with the cache path)
    assert max(len(line) for line in result.stdout.splitlines()) <= 120, result.stdout


def test_acts_file_is_the_workload(tmp_path):
    import torch

    acts = torch.zeros(6, 2048)
    acts[:, 5:9] = 1.0
    torch.save(acts, tmp_path / "acts.pt")
    result = invoke(
        *SMALL,
        "--batch-size",
        "4",
        "--acts",
        str(tmp_path / "acts.pt"),
        "--cache",
        str(tmp_path / "c.sqlite"),
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["l0"]["max"] == 4


@pytest.mark.parametrize(
    "args, words",
    [
        (["--sae", "gemma-2b-l99"], ["gemma-2b-l99"]),
        (["--width", "2048"], ["--d-model"]),
        (["--width", "2048", "--d-model", "32", "--l0", "4096"], ["l0"]),
        (["--sae", "gemma-2b-l20", "--width", "10"], ["either"]),
        (["--width", "64", "--d-model", "8", "--l0", "4", "--device", "cuda"], ["CUDA"]),
        (["--width", "64", "--d-model", "8", "--l0", "4", "--device", "mps"], ["mps"]),
        (["--width", "64", "--d-model", "8", "--l0", "4", "--trials", "0"], ["trials"]),
        (["--width", "64", "--d-model", "8", "--l0", "4", "--storage", "nonsense"], ["storage"]),
    ],
)
def test_usage_errors_exit_2_and_say_what_is_wrong(args, words, tmp_path):
    result = CliRunner().invoke(main, [*args, "--cache", str(tmp_path / "c.sqlite")])
    assert result.exit_code == 2, result.output
    for word in words:
        assert word in result.output


def test_bad_acts_file_is_a_usage_error(tmp_path):
    path = tmp_path / "acts.npy"
    path.write_bytes(b"not numpy")
    result = CliRunner().invoke(main, [*SMALL, "--acts", str(path), "--cache", str(tmp_path / "c.sqlite")])
    assert result.exit_code == 2 and "acts.npy" in result.output


def test_corrupt_cache_is_a_clear_error_and_left_alone(tmp_path):
    cache = tmp_path / "c.sqlite"
    cache.write_bytes(b"garbage" * 100)
    result = CliRunner().invoke(main, [*SMALL, "--batch-size", "2", "--cache", str(cache)])
    assert result.exit_code == 2 and str(cache) in result.output and "Traceback" not in result.output
    assert "'--cache'" in result.output
    assert cache.read_bytes() == b"garbage" * 100


def test_list_prints_the_presets():
    result = invoke("list")
    assert result.exit_code == 0
    assert "gemma-2b-l20" in result.output and "65536" in result.output and "2304" in result.output


def _winner(cache):
    with Store(cache) as store:
        (winner,) = store.winners()
        return winner, store.trials(winner.key)


def test_retune_replaces_a_stored_winner_and_its_records(tmp_path):
    """A lucky (too fast) timing stored once stays the winner for good; --retune measures afresh."""
    cache = str(tmp_path / "c.sqlite")
    args = [*SMALL, "--batch-size", "8", "--cache", cache, "--json"]
    assert invoke(*args).exit_code == 0
    measured, first_trials = _winner(cache)
    assert measured.spread is not None and all(t.spread is not None for t in first_trials if t.ok)
    with Store(cache) as store:  # as if a noisy run had timed sparse_coo at 1 ns
        store.set_winner_if_faster(measured.key, "sparse_coo", {}, 1e-6, measured.dense_ms)
    again = invoke(*args)
    assert again.exit_code == 0 and json.loads(again.stdout)["retune"] is False
    kept, trials = _winner(cache)
    assert (kept.impl, kept.ms) == ("sparse_coo", 1e-6)  # without --retune the stored winner stays
    assert len(trials) > len(first_trials)
    retuned = invoke(*args, "--retune")
    assert retuned.exit_code == 0, retuned.output
    assert json.loads(retuned.stdout)["retune"] is True and "--retune removed" in retuned.stderr
    fresh, fresh_trials = _winner(cache)
    assert fresh.ms > 1e-3 and fresh.spread is not None  # measured again, not the lucky 1 ns
    assert sum(t.trial_number is None for t in trials) == 2 * 5  # two runs' baselines
    assert sum(t.trial_number is None for t in fresh_trials) == 5  # the old runs' records are gone


def test_retune_with_several_batch_sizes_of_one_bucket_keeps_both_runs(tmp_path):
    """--retune forgets a key once per run: a second batch size of the same bucket adds to the first."""
    cache = str(tmp_path / "c.sqlite")
    result = invoke(
        *SMALL, "--batch-size", "24", "--batch-size", "32", "--cache", cache, "--retune", "--json"
    )
    assert result.exit_code == 0, result.output
    assert result.stderr.count("--retune removed") == 1
    with Store(cache) as store:  # the baselines of both batch sizes are kept
        assert len([t for t in store.trials() if t.trial_number is None]) >= 2 * 5
