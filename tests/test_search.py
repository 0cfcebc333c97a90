import json
import os
import subprocess
import sys

import optuna
import pytest
import torch

from sae_tune.autotune import candidates as candidates_mod
from sae_tune.autotune.candidates import Candidate, search_space
from sae_tune.autotune.search import Tuner, optuna_storage, params_of, quiet_optuna, suggest
from sae_tune.autotune.verify import Reference, check
from sae_tune.cache.store import Store
from sae_tune.specs import spec_from_shape

SPEC = spec_from_shape(4096, 64, 16)
quiet_optuna()


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "cache.sqlite") as s:
        yield s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 24])
def test_tune_batch_stores_every_measurement_and_a_verified_winner(store, dtype, batch):
    tuner = Tuner(SPEC, device="cpu", dtype=dtype, store=store, seed=3)
    result = tuner.tune_batch(batch, trials=6)
    assert result.key.batch_bucket == (1 if batch == 1 else 32) and result.key.dtype == str(dtype)[6:]
    assert result.dense_ms > 0 and result.best_ms > 0 and result.baselines["dense"] == result.dense_ms
    assert result.best_ms <= min(result.baselines.values())  # never worse than a library path
    winner = store.winner(result.key)
    assert (winner.impl, winner.config) == (result.best.impl, result.best.config)
    trials = store.trials(result.key)
    assert len(trials) >= result.trials and all(t.ms > 0 for t in trials if t.ok)
    assert {b.impl for b in store.baselines(result.key)} >= {"dense", "embedding_bag_csr"}
    # the winner decodes a fresh batch within the tuner's tolerance (library paths may sum in bf16)
    work = tuner.workload(batch)
    out = work.run(result.best.build())
    assert check(out, Reference.of(work.acts, work.W_dec, work.b_dec), dtype).ok


def test_wrong_and_crashing_candidates_are_failed_trials_and_never_win(store, monkeypatch):
    real_build = Candidate.build

    def build(self):
        fn = real_build(self)
        if self.impl == "embedding_bag_crow":
            return lambda a, w, b: fn(a, w, b) * 1.01  # wrong by 1 %
        if self.impl == "sparse_coo":

            def crash(a, w, b):
                raise RuntimeError("CUDA out of memory (simulated)")

            return crash
        return fn

    monkeypatch.setattr(Candidate, "build", build)
    result = Tuner(SPEC, store=store).tune_batch(8, trials=8)
    assert result.best.impl not in ("embedding_bag_crow", "sparse_coo")
    failures = {t.impl: t.error for t in store.trials(result.key) if not t.ok}
    assert "wrong result" in failures["embedding_bag_crow"]
    assert "out of memory" in failures["sparse_coo"]
    assert result.failed >= 2


def test_search_stops_when_every_candidate_was_tried(store, monkeypatch):
    library = tuple(t for t in candidates_mod.TARGETS if t.name == "library")
    monkeypatch.setattr(candidates_mod, "TARGETS", library)  # a small space: every candidate is tried
    tuner = Tuner(SPEC, store=store)
    result = tuner.tune_batch(64, trials=500)
    space = search_space(SPEC, 64, torch.float32, torch.device("cpu"), tuner.max_l0s)
    assert result.trials + result.failed == space.size() == 10
    assert len({t.study for t in store.trials(result.key)}) == 1


def test_real_activations_are_used_as_the_workload(store):
    acts = torch.zeros(5, SPEC.width)
    acts[:, :3] = 2.0
    tuner = Tuner(SPEC, store=store, acts=acts)
    assert tuner.l0.max == 3 and tuner.workload(12).acts.shape == (12, SPEC.width)
    assert int((tuner.workload(12).acts != 0).sum()) == 36


def test_warm_start_from_neighbouring_batch_sizes(store):
    tuner = Tuner(SPEC, store=store)
    first = tuner.tune_batch(8, trials=4)
    key16 = tuner.key(16, tuner.l0.mean)
    space = search_space(SPEC, key16.batch_bucket, torch.float32, torch.device("cpu"), tuner.max_l0s)
    starts = list(tuner._warm_starts(space, key16))
    assert params_of(first.best, space) in starts


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_params_round_trip_through_suggest(device):
    space = search_space(SPEC, 64, torch.float32, torch.device(device), (32, 48))
    cands = [
        Candidate.of(i, c)
        for i, configs in space.configs.items()
        for c in configs[:: max(1, len(configs) // 40)]
    ]
    assert ("triton" in space.impls) == (device == "cuda") and ("cpu" in space.impls) == (device == "cpu")
    for cand in cands:
        assert suggest(optuna.trial.FixedTrial(params_of(cand, space)), space) == cand


def test_storage_urls(tmp_path):
    assert optuna_storage(None) is None
    assert optuna_storage(f"journal:{tmp_path / 'j.log'}") is not None
    assert optuna_storage(f"sqlite:///{tmp_path / 's.db'}") is not None
    with pytest.raises(ValueError, match="journal:PATH"):
        optuna_storage("not a storage")


def test_two_processes_tune_one_study_together(tmp_path):
    """Two processes share one Optuna study through a journal file, and one SQLite cache."""
    journal, cache = tmp_path / "study.log", tmp_path / "cache.sqlite"
    args = [
        sys.executable,
        "-m",
        "sae_tune.cli.main",
        "--width",
        "2048",
        "--d-model",
        "32",
        "--l0",
        "8",
        "--batch-size",
        "64",
        "--trials",
        "4",
        "--storage",
        f"journal:{journal}",
        "--cache",
        str(cache),
        "--json",
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [
        subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
    names = {json.loads(out)["results"][0]["study"] for out, _ in outputs}
    assert len(names) == 1
    study = optuna.load_study(study_name=names.pop(), storage=optuna_storage(f"journal:{journal}"))
    measured = [t for t in study.trials if not t.user_attrs.get("repeat")]
    assert len(measured) == 8  # 4 measured by each process (repeated suggestions are not measured)
    with Store(cache) as s:
        studies = {t.study for t in s.trials()}
        assert len(s.winners()) == 1 and len(studies) == 1
        assert len([t for t in s.trials() if t.trial_number is None]) >= 2 * 4  # both timed the baselines


def test_search_space_module_has_no_triton_on_cpu():
    space = search_space(SPEC, 8, torch.float32, torch.device("cpu"), (32,))
    assert "triton" not in space.impls  # even where the interpreter could run them, CPU never races them


def test_every_timing_is_stored_with_its_spread(store):
    result = Tuner(SPEC, store=store).tune_batch(8, trials=4)
    ok = [t for t in store.trials(result.key) if t.ok]
    assert ok and all(t.spread is not None and t.spread >= 0 for t in ok)
    assert all(b.spread is not None for b in store.baselines(result.key))
    assert store.winner(result.key).spread is not None  # from the interleaved final re-timing


def test_phases_are_reported_in_order(store):
    said = []
    Tuner(SPEC, store=store, phase=said.append).tune_batch(8, trials=2)
    phases = [m.split(": ")[1].split(" ")[0] for m in said]  # a noisy final re-timing says each repeat
    assert list(dict.fromkeys(phases)) == ["baselines", "search", "final", "done,"]


def test_retune_forgets_the_key_and_starts_a_fresh_shared_study(tmp_path):
    journal = f"journal:{tmp_path / 'study.log'}"
    with Store(tmp_path / "c.sqlite") as store:
        first = Tuner(SPEC, store=store, storage=journal).tune_batch(64, trials=2)
        store.set_winner_if_faster(first.key, "sparse_coo", {}, 1e-6, first.dense_ms)  # a lucky timing
        again = Tuner(SPEC, store=store, storage=journal).tune_batch(64, trials=2)
        study = optuna.load_study(study_name=again.study, storage=optuna_storage(journal))
        assert len(study.trials) == 4 and store.winner(first.key).ms == 1e-6  # kept without retune
        assert sum(t.trial_number is None for t in store.trials(first.key)) == 2 * 5  # two runs' baselines
        fresh = Tuner(SPEC, store=store, storage=journal, retune=True).tune_batch(64, trials=2)
        study = optuna.load_study(study_name=fresh.study, storage=optuna_storage(journal))
        assert len(study.trials) == 2  # the old study was deleted, not continued
        assert store.winner(first.key).ms > 1e-3
        assert sum(t.trial_number is None for t in store.trials(first.key)) == 5  # this run's only


@pytest.mark.parametrize(
    "url, words",
    [
        ("bogus://x", "cannot open this database"),
        ("sqlite:////no/such/dir/s.db", "cannot open this database"),
        ("journal:/no/such/dir/j.log", "no such directory: /no/such/dir"),
        ("journal:", "give a file"),
    ],
)
def test_bad_storage_urls_are_value_errors_naming_them(url, words, tmp_path):
    with pytest.raises(ValueError, match=words) as info:
        optuna_storage(url)
    assert repr(url) in str(info.value)
    with pytest.raises(ValueError, match="is a directory"):
        optuna_storage(f"journal:{tmp_path}")
