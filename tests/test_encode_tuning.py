"""Encode tuning: the encode contract, the library encode impl, the cache's encode ops, the tuner, the
dispatcher's choice and the main job's encode race."""

import inspect
import json
import sqlite3
import warnings

import pytest
import torch
from click.testing import CliRunner

import sae_tune
from sae_tune import sparse_encode
from sae_tune.autotune import encode_search
from sae_tune.autotune.encode_search import disagreement, tune_encode
from sae_tune.cache.store import CacheKey, FieldError, Store
from sae_tune.device import describe_device
from sae_tune.dispatch import encode_choice
from sae_tune.dispatch.decision import DispatchWarning
from sae_tune.dispatch.encode_choice import EncodeChooser
from sae_tune.targets import TARGETS, ConfigFieldError, Target
from sae_tune.targets.base import EncodeProblem, EncodeRequest

D, F = 64, 2048
CPU = torch.device("cpu")
LIBRARY = TARGETS[0]
IMPL = LIBRARY.encode_impls[0]
KW = {
    "relu": lambda thr: {},
    "jumprelu": lambda thr: {"threshold": thr},
    "topk": lambda thr: {"k": 24},
}


def inputs(dtype, B=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen)
    W = torch.randn(D, F, generator=gen) / D**0.5
    b = torch.randn(F, generator=gen) / 4 - 1.0
    thr = torch.rand(F, generator=gen) * 1.5
    return x.to(dtype), W.to(dtype), b.to(dtype), thr.to(dtype)


def request(B=40, activation="jumprelu", k=None, dtype=torch.float32):
    return EncodeRequest(B, F, D, dtype, CPU, activation, k)


def info():
    return describe_device(CPU)


def encode_key(B=40, k=None, dtype=torch.float32):
    return CacheKey.for_encode(
        info(), template_hash=sae_tune.targets.templates_hash(), dtype=dtype, F=F, D=D, batch_size=B, k=k
    )


@pytest.fixture
def chooser(tmp_path):
    """A process-wide encode chooser reading a fresh cache file and no shipped configs (put back after)."""
    path = tmp_path / "cache.sqlite"
    previous = encode_choice.set_encode_chooser(EncodeChooser(path, shipped_dir=tmp_path))
    yield path
    encode_choice.set_encode_chooser(previous)


def spy(monkeypatch):
    """Record the (impl, config) of every library encode that runs."""
    seen = []
    real = LIBRARY.encode

    def recording(impl, config, problem):
        seen.append((impl, dict(config)))
        return real(impl, config, problem)

    monkeypatch.setattr(LIBRARY, "encode", recording)
    return seen


# --- the contract ---------------------------------------------------------------------------------


class Bare(Target):
    """A target with no encode code: only the decode members it must have."""

    name = "bare"
    impls = ("bare",)

    def available(self, device):
        return None

    def parse(self, impl, config):
        return {}

    def label(self, impl, config):
        return impl

    def space(self, request):
        return []

    def gate(self, impl, config, facts):
        return "no"

    def build(self, impl, config):
        raise NotImplementedError


def test_contract_defaults_say_a_target_has_no_encode():
    bare, req = Bare(), request()
    assert bare.encode_impls == () and bare.encode_space(req) == []
    with pytest.raises(ValueError):
        bare.encode_parse("x", {})
    assert isinstance(bare.encode_gate("x", {}, req), str)
    x, W, b, thr = inputs(torch.float32)
    with pytest.raises(ValueError):
        bare.encode("x", {}, EncodeProblem(x, W, b, thr, None))
    with pytest.raises(AttributeError):
        req.F = 3  # frozen: a request can key a dict
    assert set(inspect.signature(EncodeRequest).parameters) == {
        "n_tokens", "F", "D", "dtype", "device", "activation", "k",
    }  # fmt: skip
    assert list(inspect.signature(EncodeProblem).parameters) == ["x", "W_enc", "b_enc", "threshold", "k"]


# --- the library encode impl -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk"])
def test_library_impl_is_bit_identical_to_sparse_encode_at_every_chunk(dtype, activation):
    x, W, b, thr = inputs(dtype)
    kw = KW[activation](thr)
    k = kw.get("k")
    before = sparse_encode(x, W, b, chunk=1 << 20, **kw)  # one chunk: SAELens's whole-row expression
    req = request(activation=activation, k=k, dtype=dtype)
    space = LIBRARY.encode_space(req)
    configs = [c for _, c in space] + [{"chunk": 256}, {"chunk": 512}, {"chunk": "row"}]
    assert {"chunk": "row"} in configs and len(space) >= 2
    problem = EncodeProblem(x, W, b, None if activation != "jumprelu" else thr, k)
    for config in configs:
        assert LIBRARY.encode_gate(IMPL, config, req) is None
        offsets, indices, values = LIBRARY.encode(IMPL, config, problem)
        assert torch.equal(offsets, before.offsets) and torch.equal(indices, before.indices), config
        assert torch.equal(values, before.values), config
    assert torch.equal(sparse_encode(x, W, b, **kw).values, before.values)  # the dispatched default too


def test_library_space_starts_with_the_untuned_default_and_races_the_whole_row():
    from sae_tune.encode import default_chunk

    big = EncodeRequest(1024, 65536, 2304, torch.float32, CPU, "jumprelu")
    space = [c["chunk"] for _, c in LIBRARY.encode_space(big)]
    assert space[0] == default_chunk(1024, 65536) == 16384
    assert set(space) == {4096, 8192, 16384, 32768, "row"}
    small = [c["chunk"] for _, c in LIBRARY.encode_space(request(B=4))]
    assert small[0] == "row"  # the default at 4 x 2048: one chunk
    huge = EncodeRequest(4096, 1 << 20, 2304, torch.float32, CPU, "relu")
    assert "row" not in [c["chunk"] for _, c in LIBRARY.encode_space(huge)]  # 4G pre-activations


# --- the cache's encode ops ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"chunk": 512, "unroll": 4}, "config.unroll"),
        ({"chunk": 300}, "config.chunk"),  # not a power of two
        ({"chunk": 128}, "config.chunk"),  # narrower than the GEMM the SAE's own encode runs
        ({"chunk": 1 << 200}, "config.chunk"),
        ({"chunk": -512}, "config.chunk"),
        ({"chunk": "512"}, "config.chunk"),
        ({"chunk": "whole"}, "config.chunk"),
        ({"chunk": 512.0}, "config.chunk"),
        ({"chunk": True}, "config.chunk"),
        ({"chunk": None}, "config.chunk"),
        ({}, "config.chunk"),
    ],
)
def test_store_refuses_hostile_encode_configs(tmp_path, config, field):
    with Store(tmp_path / "c.sqlite") as store:
        for write in (
            lambda: store.set_winner_if_faster(encode_key(), IMPL, config, 1.0),
            lambda: store.record_trial(encode_key(), IMPL, config, 1.0),
            lambda: store.record_baseline(encode_key(), IMPL, 1.0, config),
        ):
            with pytest.raises(FieldError) as err:
                write()
            assert err.value.field == field
        assert store.winners(op=None) == [] and store.trials(op=None) == []


def test_encode_and_decode_impls_and_l0_buckets_do_not_mix(tmp_path):
    with Store(tmp_path / "c.sqlite") as store:
        with pytest.raises(FieldError, match="impl"):
            store.set_winner_if_faster(encode_key(), "dense", {}, 1.0)  # a decode impl on an encode key
        decode = CacheKey.for_device(
            info(), template_hash="t", dtype=torch.float32, F=F, D=D, batch_size=8, mean_l0=8
        )
        with pytest.raises(FieldError, match="impl"):
            store.set_winner_if_faster(decode, IMPL, {"chunk": 512}, 1.0)
    fields = encode_key().to_dict()
    assert fields["l0_bucket"] == 0 and fields["op"] == "encode"
    assert encode_key(k=24).l0_bucket == 32 and encode_key(k=24).op == "encode_topk"
    for op, l0 in (("encode", 1), ("decode", 0), ("encode_topk", 0)):
        with pytest.raises(FieldError) as err:
            CacheKey(**{**fields, "op": op, "l0_bucket": l0})
        assert err.value.field == "l0_bucket"


def test_encode_rows_sit_beside_decode_rows_in_the_same_schema(tmp_path):
    path = tmp_path / "c.sqlite"
    decode = CacheKey.for_device(
        info(), template_hash="t", dtype=torch.float32, F=F, D=D, batch_size=8, mean_l0=8
    )
    with Store(path) as store:
        version = store.summary()["schema_version"]
        store.set_winner_if_faster(decode, "sparse_coo", {}, 1.0)
        store.set_winner_if_faster(encode_key(), IMPL, {"chunk": 512}, 2.0)
    with Store(path) as store:  # reopens: no migration needed, the columns are the same
        assert store.summary()["schema_version"] == version
        assert [w.impl for w in store.winners()] == ["sparse_coo"]  # the decode winners, as before
        assert [w.impl for w in store.winners(op="encode")] == [IMPL]
        assert len(store.winners(op=None)) == 2
        assert store.winner(encode_key()).config == {"chunk": 512}


# --- the tuner -----------------------------------------------------------------------------------------


def test_tuner_records_trials_and_the_winner_under_the_encode_op(tmp_path):
    W = encode_search.random_w_enc(F, D, dtype=torch.float32, device=CPU, seed=0)
    with Store(tmp_path / "c.sqlite") as store:
        result = tune_encode(store, W, batch_size=64, activation="jumprelu", k=None, l0=8.0, info=info())
        key = result.key
        assert (key.op, key.l0_bucket, key.batch_bucket) == ("encode", 0, 64)
        winner = store.winner(key)
        assert (winner.impl, winner.config) == (result.best.impl, result.best.config)
        raced = [(t.impl, t.config) for t in store.trials(key) if t.ok]
        everyone = [(c.impl, c.config) for c in encode_search.candidates(request(B=64))]
        assert sorted(map(str, raced)) == sorted(map(str, everyone))  # every target's candidates
        assert set(map(str, LIBRARY.encode_space(request(B=64)))) <= set(map(str, raced))
        assert len(LIBRARY.encode_space(request(B=64))) >= 2
        assert [b.config for b in store.baselines(key)] == [LIBRARY.encode_space(request(B=64))[0][1]]
        topk = tune_encode(store, W, batch_size=8, activation="topk", k=24, l0=24.0, info=info())
        assert (topk.key.op, topk.key.l0_bucket) == ("encode_topk", 32)
        assert store.winner(topk.key) is not None


def test_tuner_refuses_a_candidate_whose_result_differs(tmp_path, monkeypatch):
    real_space, real_encode = LIBRARY.encode_space, LIBRARY.encode

    def space(req):
        return [*real_space(req), (IMPL, {"chunk": 512})]

    def encode(impl, config, problem):
        offsets, indices, values = real_encode(impl, config, problem)
        return (offsets, indices, values * 0.5) if config["chunk"] == 512 else (offsets, indices, values)

    monkeypatch.setattr(LIBRARY, "encode_space", space)
    monkeypatch.setattr(LIBRARY, "encode", encode)
    W = encode_search.random_w_enc(F, D, dtype=torch.float32, device=CPU, seed=0)
    with Store(tmp_path / "c.sqlite") as store:
        result = tune_encode(store, W, batch_size=64, activation="relu", k=None, l0=8.0, info=info())
        failed = [t for t in store.trials(result.key) if not t.ok]
        assert [t.config for t in failed] == [{"chunk": 512}] and "wrong result" in failed[0].error
        assert store.winner(result.key).config != {"chunk": 512}


def test_disagreement_names_what_differs():
    x, W, b, thr = inputs(torch.float32)
    problem = EncodeProblem(x, W, b, thr, None)
    ref = LIBRARY.encode(IMPL, {"chunk": "row"}, problem)
    offsets, indices, values = ref
    assert disagreement(ref, ref, problem, exact=True) is None
    assert "indices" in disagreement((offsets, indices.flip(0), values), ref, problem, exact=True)
    nudged = values * (1 + 1e-7)
    assert "bit for bit" in disagreement((offsets, indices, nudged), ref, problem, exact=True)
    assert disagreement((offsets, indices, nudged), ref, problem, exact=False) is None
    assert "values differ" in disagreement((offsets, indices, values + 1), ref, problem, exact=False)


# --- the dispatcher ----------------------------------------------------------------------------------------


def test_sparse_encode_uses_the_stored_winner(chooser, monkeypatch):
    x, W, b, thr = inputs(torch.float32, B=40)
    with Store(chooser) as store:
        store.set_winner_if_faster(encode_key(B=40), IMPL, {"chunk": 512}, 0.5)
        store.set_winner_if_faster(encode_key(B=40, k=24), IMPL, {"chunk": 1024}, 0.5)
    seen = spy(monkeypatch)
    acts = sparse_encode(x, W, b, threshold=thr)
    topk = sparse_encode(x, W, b, k=24)
    assert seen == [(IMPL, {"chunk": 512}), (IMPL, {"chunk": 1024})]
    assert torch.equal(acts.values, sparse_encode(x, W, b, threshold=thr, chunk=4096).values)
    assert torch.equal(topk.indices, sparse_encode(x, W, b, k=24, chunk=4096).indices)
    target, impl, config, reason = encode_choice.choose_encode(request(B=40))
    assert (target, impl, config) == (LIBRARY, IMPL, {"chunk": 512}) and "measured here" in reason
    assert encode_choice.explain_encode(request(B=40)).source == "cache"
    assert encode_choice.explain_encode(request(B=33, activation="relu")).config == {"chunk": 512}
    near = encode_choice.explain_encode(request(B=100))  # bucket 128: one step away
    assert (near.source, near.config) == ("nearest", {"chunk": 512})
    far = encode_choice.explain_encode(request(B=200))  # bucket 256: two steps, not carried that far
    assert far.source == "default" and far.config == {"chunk": "row"}


def test_untuned_default_is_todays_chunk(chooser, monkeypatch):
    from sae_tune.encode import default_chunk

    seen = spy(monkeypatch)
    x, W, b, _ = inputs(torch.float32, B=40)
    sparse_encode(x, W, b)
    assert seen == [(IMPL, {"chunk": "row"})]  # 40 x 2048: one chunk, as before tuning existed
    choice = encode_choice.explain_encode(EncodeRequest(1024, 65536, 2304, torch.float32, CPU, "relu"))
    assert choice.source == "default" and choice.config == {"chunk": default_chunk(1024, 65536)}


def test_dispatcher_ignores_a_hostile_stored_config(chooser, monkeypatch):
    with Store(chooser) as store:
        store.set_winner_if_faster(encode_key(B=40), IMPL, {"chunk": 512}, 0.5)
    conn = sqlite3.connect(chooser)
    seen = spy(monkeypatch)
    x, W, b, thr = inputs(torch.float32, B=40)
    for bad in ('{"chunk": 300}', '{"chunk": 512, "x": 1}', '{"chunk": 1e400}', '{"chunk": "512"}'):
        conn.execute("UPDATE winners SET config = ?", (bad,))
        conn.commit()
        encode_choice.reload_encode(chooser, shipped_dir=chooser.parent)
        with pytest.warns(DispatchWarning, match="skipping sae-tune cache entry"):
            sparse_encode(x, W, b, threshold=thr)
        assert seen[-1] == (IMPL, {"chunk": "row"}), bad  # the default, never an error
    conn.close()


def test_dispatcher_skips_a_gated_entry_with_the_reason(chooser, monkeypatch):
    with Store(chooser) as store:
        store.set_winner_if_faster(encode_key(B=40), IMPL, {"chunk": 512}, 0.5)
    real = LIBRARY.encode_gate
    monkeypatch.setattr(
        LIBRARY, "encode_gate", lambda i, c, r: "not today" if c.get("chunk") == 512 else real(i, c, r)
    )
    choice = encode_choice.explain_encode(request(B=40))
    assert choice.source == "default" and "not today" in choice.reason


def test_choices_are_kept_and_the_cache_is_read_once(chooser, monkeypatch):
    with Store(chooser) as store:
        store.set_winner_if_faster(encode_key(B=40), IMPL, {"chunk": 512}, 0.5)
    x, W, b, thr = inputs(torch.float32, B=40)
    sparse_encode(x, W, b, threshold=thr)
    chooser_now = encode_choice.get_encode_chooser()

    def no_reads(*args, **kwargs):
        raise AssertionError("the cache was read again")

    monkeypatch.setattr(chooser_now, "_load", no_reads)
    monkeypatch.setattr(chooser_now, "_decide", no_reads)
    seen = spy(monkeypatch)
    for _ in range(3):
        sparse_encode(x[:33], W, b, threshold=thr)  # 33 tokens: the bucket of 40 (64)
    assert seen == [(IMPL, {"chunk": 512})] * 3


# --- the main job ------------------------------------------------------------------------------------------


def _runner():
    if "mix_stderr" in inspect.signature(CliRunner).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()


@pytest.mark.parametrize(
    ("arch_args", "op", "l0_bucket"),
    [
        (["--arch", "jumprelu", "--l0", "8"], "encode", 0),
        (["--arch", "topk", "--k", "8"], "encode_topk", 8),
        (["--arch", "relu", "--l0", "8"], "encode", 0),
    ],
)
def test_main_job_tunes_encode_at_its_batch_sizes(tmp_path, arch_args, op, l0_bucket):
    from sae_tune.cli.main import main

    cache = tmp_path / "c.sqlite"
    args = ["--width", "2048", "--d-model", "32", *arch_args, "--device", "cpu", "--trials", "2"]
    result = _runner().invoke(
        main, [*args, "--batch-size", "4", "--batch-size", "64", "--cache", str(cache), "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [(e["batch_size"], e["op"]) for e in payload["encode"]] == [(4, op), (64, op)]
    with Store(cache) as store:
        winners = store.winners(op=op)
        assert sorted(w.key.batch_bucket for w in winners) == [4, 64]
        assert {w.key.l0_bucket for w in winners} == {l0_bucket} and len(store.winners()) == 2
    table = _runner().invoke(main, [*args, "--batch-size", "4", "--cache", str(cache)])
    assert table.exit_code == 0 and "encode winner" in table.stdout


def test_main_job_retune_forgets_the_encode_keys(tmp_path):
    from sae_tune.cli.main import main

    cache = tmp_path / "c.sqlite"
    args = ["--width", "2048", "--d-model", "32", "--l0", "8", "--device", "cpu", "--trials", "2"]
    args += ["--batch-size", "4", "--cache", str(cache), "--json"]
    assert _runner().invoke(main, args).exit_code == 0
    with Store(cache) as store:
        (winner,) = store.winners(op="encode")
        store.set_winner_if_faster(winner.key, IMPL, {"chunk": 256}, 1e-6)  # a lucky timing
    assert _runner().invoke(main, [*args, "--retune"]).exit_code == 0
    with Store(cache) as store:
        (fresh,) = store.winners(op="encode")
        assert fresh.ms > 1e-5


def test_spec_architecture_picks_the_encode_activation():
    from sae_tune.cli.tune import activation_for
    from sae_tune.specs import get_spec

    assert activation_for(get_spec("gemma-2b-l20")) == "jumprelu"
    assert activation_for(get_spec("qwen3.5-2b-topk50")) == "topk"
    assert encode_search.activation_of("relu", None) == "relu"


def test_config_field_error_names_the_field():
    with pytest.raises(ConfigFieldError) as err:
        LIBRARY.encode_parse(IMPL, {"chunk": 1000})
    assert err.value.field == "chunk"
    assert LIBRARY.encode_label(IMPL, {"chunk": "row"}) == f"{IMPL}[row]"


def test_race_budget_bounds_the_rounds_and_slow_candidates_drop_out():
    req = request(B=64, activation="relu")
    W = encode_search.random_w_enc(F, D, dtype=torch.float32, device=CPU, seed=0)
    problem = encode_search.workload(req, W, 8.0, seed=0)
    timings, failures, finalists = encode_search.race(req, problem, budget_s=0.0)
    assert not failures and len(timings) >= 3
    assert all(len(t.samples) == 1 for t in timings.values())  # the checked run only: a slow shape
    timings, _, finalists = encode_search.race(req, problem, budget_s=30.0)
    fastest = min(t.samples[0] for t in timings.values())
    for cand, timing in timings.items():
        raced = cand in finalists
        assert raced == (timing.samples[0] <= encode_search.PRUNE * fastest)
        assert len(timing.samples) == (encode_search.MAX_ROUNDS if raced and len(finalists) > 1 else 1)


class Fake(Bare):
    """A second target with one encode config; ``wrong`` makes its values differ from the library's."""

    name = "fake"
    encode_impls = ("fake-encode",)

    def __init__(self, wrong):
        self.wrong, self.calls = wrong, 0

    def encode_space(self, request):
        return [("fake-encode", {})]

    def encode_parse(self, impl, config):
        if impl != "fake-encode" or dict(config):
            raise ConfigFieldError(next(iter(config), "impl"), "fake takes no fields")
        return {}

    def encode_gate(self, impl, config, request):
        return None

    def encode(self, impl, config, problem):
        self.calls += 1
        offsets, indices, values = LIBRARY.encode(IMPL, {"chunk": 256}, problem)
        return offsets, indices, values * 2 if self.wrong else values


@pytest.mark.parametrize("wrong", [False, True])
def test_another_targets_winner_is_checked_on_first_use(chooser, monkeypatch, wrong):
    import sae_tune.cache.store as store_module

    fake = Fake(wrong)
    for module in (store_module, encode_choice, encode_search):
        monkeypatch.setattr(module, "TARGETS", (*TARGETS, fake))
    with Store(chooser) as store:
        store.set_winner_if_faster(encode_key(B=40), "fake-encode", {}, 0.5)
    x, W, b, thr = inputs(torch.float32, B=40)
    expected = sparse_encode(x, W, b, threshold=thr, chunk=512)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            acts = sparse_encode(x, W, b, threshold=thr)
            assert torch.equal(acts.values, expected.values)  # a wrong entry never reaches the user
    complaints = [w for w in caught if "not using encode fake" in str(w.message)]
    assert len(complaints) == (1 if wrong else 0)
    assert fake.calls == (1 if wrong else 4)  # checked once (64 tokens), then used for every call
    choice = encode_choice.explain_encode(request(B=40))
    assert choice.target is (LIBRARY if wrong else fake)


def test_an_x_with_rows_out_of_memory_order_keeps_saelens_rounding(chooser):
    """float16 GEMMs of a transposed x and of its contiguous copy round differently: sparse_encode runs the
    torch code on x as given (SAELens's own expression), whatever is tuned."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(D, 13, generator=gen).half().T
    W = (torch.randn(D, F, generator=gen) / D**0.5).half()
    b = (torch.randn(F, generator=gen) / 4 - 1).half()
    with Store(chooser) as store:
        store.set_winner_if_faster(encode_key(B=13, dtype=torch.float16), IMPL, {"chunk": 512}, 0.5)
    dense = torch.relu(x @ W + b)
    acts = sparse_encode(x, W, b)
    ref = sae_tune.SparseActs.from_dense(dense)
    assert torch.equal(acts.indices, ref.indices) and torch.equal(acts.values, ref.values)


def test_encode_winners_export_show_and_stay_out_of_the_decode_index(tmp_path):
    """`cache show` and `cache export` carry every op; the decode dispatcher's index ignores encode rows
    (it would otherwise list them as entries with an unknown implementation)."""
    from sae_tune.cache.share import export_records, validate_payload
    from sae_tune.cli.main import main
    from sae_tune.dispatch.index import CacheIndex, read_local

    path = tmp_path / "c.sqlite"
    decode = CacheKey.for_device(
        info(), template_hash="t", dtype=torch.float32, F=F, D=D, batch_size=8, mean_l0=8
    )
    with Store(path) as store:
        store.set_winner_if_faster(decode, "sparse_coo", {}, 1.0)
        store.set_winner_if_faster(encode_key(), IMPL, {"chunk": 512}, 2.0)
        payload = export_records(store)
    assert sorted(r["op"] for r in payload["records"]) == ["decode", "encode"]
    assert {rec.key.op for rec in validate_payload(payload)} == {"decode", "encode"}
    records = read_local(path)
    assert len(records) == 2 and len(CacheIndex(records)) == 1
    shown = CliRunner().invoke(main, ["cache", "show", "--cache", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "  encode, fp32" in shown.output and "  decode, fp32" in shown.output  # a line per op
    wide = CliRunner().invoke(main, ["cache", "show", "--wide", "--cache", str(path)])
    assert wide.exit_code == 0, wide.output
    assert IMPL in wide.output and "| encode " in wide.output
