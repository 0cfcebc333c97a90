import logging
import sqlite3
import warnings

import pytest
import torch
from conftest import TOLERANCE, assert_matches_dense, random_acts, random_weights

import sae_tune
from sae_tune import Variant, explain, sparse_decode
from sae_tune.cache.share import write_export
from sae_tune.cache.store import CacheKey, Provenance, Store, WinnerRecord
from sae_tune.device import describe_device
from sae_tune.dispatch import Decision, Dispatcher, DispatchWarning, costmodel, reload, set_dispatcher
from sae_tune.dispatch.grad import with_dense_backward
from sae_tune.targets import by_name, templates_hash
from sae_tune.targets.library.paths import TORCH_PATHS, TorchPath

CPU = torch.device("cpu")
F, D = 512, 48


@pytest.fixture(autouse=True)
def isolated(tmp_path, isolated_dispatch):
    """Every test dispatches from its own (absent) cache file and an empty shipped folder."""
    yield tmp_path
    reload()


def key_here(F=F, D=D, dtype="float32", batch=8, l0=8):
    return CacheKey.for_device(
        describe_device(CPU),
        template_hash=templates_hash(),
        dtype=dtype,
        F=F,
        D=D,
        batch_size=batch,
        mean_l0=l0,
    )


def store_winner(path, impl, config=None, **key):
    with Store(path) as store:
        store.set_winner_if_faster(key_here(**key), impl, config or {}, 1.0, 10.0)


def record(impl, config, **key):
    return WinnerRecord(key_here(**key), impl, config, 1.0, 10.0, Provenance.current())


# --- results -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(8,), (2, 4), (2, 2, 2), (1,)], ids=str)
@pytest.mark.parametrize("winner", ["embedding_bag_csr", "sparse_coo", None], ids=str)
def test_result_is_the_dense_expression(isolated, winner, lead, dtype):
    if winner is not None:
        store_winner(isolated / "cache.sqlite", winner, dtype=str(dtype).removeprefix("torch."), batch=8)
    n = torch.Size(lead).numel()
    acts = random_acts(n, F, 6, dtype).reshape(*lead, F)
    W, b = random_weights(F, D, dtype)
    out = sparse_decode(acts, W, b)
    assert out.shape == (*lead, D) and out.dtype == dtype
    assert_matches_dense(out.reshape(n, D), acts.reshape(n, F), W, b)
    assert_matches_dense(sparse_decode(acts, W).reshape(n, D), acts.reshape(n, F), W)
    decision = explain(acts, W, b)
    if winner is not None and n == 8:
        assert (decision.implementation, decision.source) == (winner, "cache")


def test_non_contiguous_and_promoting_bias(dtype):
    acts = random_acts(12, F, 5, dtype)[::2]
    W = random_weights(D, F, dtype)[0].t()
    b = random_weights(1, 2 * D, dtype)[1][::2]
    assert not acts.is_contiguous() and not W.is_contiguous() and not b.is_contiguous()
    assert_matches_dense(sparse_decode(acts, W, b), acts, W, b)
    b32 = b.float()
    out, ref = sparse_decode(acts, W, b32), acts @ W + b32
    assert out.dtype == ref.dtype == torch.float32  # the product is rounded to dtype, then promoted
    product_tol = 2 * TOLERANCE[dtype] * (acts.double().abs() @ W.double().abs())
    assert ((out.double() - ref.double()).abs() <= product_tol + 1e-6).all()


def test_empty_batches_and_zero_width():
    W, b = random_weights(F, D, torch.float32)
    for shape in [(0, F), (2, 0, F)]:
        out = sparse_decode(torch.zeros(shape), W, b)
        assert out.shape == (*shape[:-1], D)
    assert explain(torch.zeros(0, F), W, b).source == "dense"
    out = sparse_decode(torch.zeros(3, 0), torch.zeros(0, D), b)
    assert torch.equal(out, b.expand(3, D))


def test_bad_input_raises_naming_the_shapes():
    W, b = random_weights(F, D, torch.float32)
    acts = random_acts(4, F, 3, torch.float32)
    with pytest.raises(ValueError, match=r"\(4, 100\)"):
        sparse_decode(acts[:, :100], W, b)
    with pytest.raises(ValueError, match=r"b_dec must have shape \(48,\)"):
        sparse_decode(acts, W, b[:5])
    with pytest.raises(TypeError, match="same dtype"):
        sparse_decode(acts, W.bfloat16(), b)
    with pytest.raises(TypeError, match="floating"):
        sparse_decode(acts.long(), W.long())
    with pytest.raises(ValueError, match="positive int"):
        sparse_decode(acts, W, b, k=0)
    with pytest.raises(TypeError):
        sparse_decode(acts.numpy(), W, b)


def test_tensors_torch_must_handle_are_left_to_torch():
    W, b = random_weights(F, D, torch.float64)
    acts = random_acts(3, F, 4, torch.float64)
    sparse_out = sparse_decode(acts.to_sparse(), W, b)
    assert torch.allclose(sparse_out, acts @ W + b)
    meta = sparse_decode(acts.to("meta"), W.to("meta"))
    assert meta.shape == (3, D) and meta.device.type == "meta"
    per_sample = torch.func.vmap(lambda a: sparse_decode(a, W, b))(acts)
    assert torch.allclose(per_sample, acts @ W + b)


# --- sources and explain -------------------------------------------------------------------------------


def test_sources_in_lookup_order(isolated, monkeypatch, caplog):
    W, b = random_weights(F, D, torch.float32)
    acts = random_acts(8, F, 6, torch.float32)
    assert explain(acts, W, b).source == "model"

    other = isolated / "other.sqlite"  # a winner exported from elsewhere and shipped
    store_winner(other, "sparse_coo", batch=8)
    with Store(other) as store:
        write_export(isolated / "shipped" / "cpu.json", store)
    reload()
    assert (explain(acts, W, b).implementation, explain(acts, W, b).source) == ("sparse_coo", "shipped")

    store_winner(isolated / "cache.sqlite", "embedding_bag_csr", {"chunk": 4}, batch=32)
    reload()
    near = explain(acts, W, b)
    assert (near.implementation, dict(near.config), near.source) == (
        "embedding_bag_csr",
        {"chunk": 4},
        "nearest",
    )
    assert "nearest to this batch bucket 8" in near.reason

    store_winner(isolated / "cache.sqlite", "embedding_bag_crow", batch=8)
    reload()
    with caplog.at_level(logging.DEBUG, logger="sae_tune"):
        exact = explain(acts, W, b)
        out = sparse_decode(acts, W, b)
    assert isinstance(exact, Decision) and (exact.implementation, exact.source) == (
        "embedding_bag_crow",
        "cache",
    )
    assert "10 ms" in exact.reason and exact.label == "embedding_bag_crow"
    assert sum("embedding_bag_crow (cache)" in r.getMessage() for r in caplog.records) == 2
    assert_matches_dense(out, acts, W, b)
    with pytest.raises(TypeError):
        exact.config["chunk"] = 1  # read-only


def test_cost_model_takes_the_gather_for_a_wide_sparse_sae_and_dense_for_a_tiny_one(monkeypatch):
    # fixed rates: the decision must not depend on how loaded the machine was when they were probed
    rates = costmodel.Rates(bandwidth=20e9, op_overhead=5e-6, scan=2e9, flops=100e9)
    monkeypatch.setattr(costmodel, "measure_rates", lambda device, dtype=torch.float32: rates)
    W, b = random_weights(16384, 512, torch.float32)
    acts = random_acts(32, 16384, 16, torch.float32)
    wide = explain(acts, W, b)
    gather = "cpu" if by_name("cpu").available(torch.device("cpu")) is None else "embedding_bag_csr"
    assert (wide.implementation, wide.source) == (gather, "model"), wide  # the C target where it builds
    assert "GB/s" in wide.reason and "mean L0 16" in wide.reason
    W_small, b_small = random_weights(64, 16, torch.float32)
    dense_acts = torch.rand(32, 64) + 0.1  # every feature fires
    tiny = explain(dense_acts, W_small, b_small)
    assert (tiny.implementation, tiny.source) == ("dense", "model"), tiny
    assert_matches_dense(sparse_decode(acts, W, b), acts, W, b)


def test_measured_rates_are_positive_and_cached():
    rates = costmodel.measure_rates("cpu")
    assert rates.bandwidth > 1e8 and rates.scan > 1e6 and rates.flops > 1e8 and 0 < rates.op_overhead < 1e-3
    assert costmodel.measure_rates("cpu") == rates


def test_cost_model_formulas():
    rates = costmodel.Rates(bandwidth=20e9, op_overhead=5e-6, scan=2e9, flops=100e9)

    def costs(**kw):
        return costmodel.predict(("dense", "embedding_bag_csr"), itemsize=4, rates=rates, **kw)

    gemma = costs(n_tokens=32, F=65536, D=2304, mean_l0=72)
    assert gemma["embedding_bag_csr"] * 10 < gemma["dense"]
    assert gemma["dense"] > 2 * 32 * 65536 * 2304 / rates.flops  # 2 cores: even B=32 is compute-bound
    fast_math = costmodel.Rates(bandwidth=20e9, op_overhead=5e-6, scan=2e9, flops=1e13)
    memory_bound = costmodel.predict(
        ("dense",), n_tokens=32, F=65536, D=2304, mean_l0=72, itemsize=4, rates=fast_math
    )
    assert 0.025 < memory_bound["dense"] < 0.035  # ~600 MB of W_dec at 20 GB/s
    full = costs(n_tokens=32, F=4096, D=256, mean_l0=4096)
    assert full["dense"] < full["embedding_bag_csr"]
    big_batch = costs(n_tokens=8192, F=16384, D=2048, mean_l0=64)
    assert big_batch["dense"] > 2 * 8192 * 16384 * 2048 / rates.flops  # compute-bound, not memory-bound
    args = dict(n_tokens=1, F=4096, D=256, mean_l0=2600, itemsize=4, rates=rates)
    near = costmodel.predict(("dense", "embedding_bag_csr"), **args)
    assert costmodel.MARGIN * near["dense"] < near["embedding_bag_csr"] < near["dense"]
    close = costmodel.choose(("dense", "embedding_bag_csr"), **args)
    assert close.impl == "dense"  # a sparse path must win by the margin
    with pytest.raises(ValueError):
        costmodel.predict(("magic",), n_tokens=1, F=1, D=1, mean_l0=1, itemsize=4, rates=rates)


def test_l0_bucket_is_matched_by_the_batch_l0_only_when_it_matters(isolated):
    path = isolated / "cache.sqlite"
    store_winner(path, "embedding_bag_csr", l0=4)
    store_winner(path, "sparse_coo", l0=64)
    W, b = random_weights(F, D, torch.float32)
    light, heavy = random_acts(8, F, 3, torch.float32), random_acts(8, F, 60, torch.float32)
    assert explain(light, W, b).implementation == "embedding_bag_csr"
    assert explain(heavy, W, b).implementation == "sparse_coo"
    assert "L0 bucket 64" in explain(heavy, W, b).reason
    assert_matches_dense(sparse_decode(heavy, W, b), heavy, W, b)
    assert_matches_dense(sparse_decode(light, W, b), light, W, b)


# --- the cache file ------------------------------------------------------------------------------------


def test_dispatch_creates_no_cache_file(tmp_path, monkeypatch):
    target = tmp_path / "not-yet" / "cache.sqlite"
    monkeypatch.setenv("SAE_TUNE_CACHE", str(target))
    reload()
    W, b = random_weights(F, D, torch.float32)
    acts = random_acts(4, F, 3, torch.float32)
    sparse_decode(acts, W, b)
    explain(acts, W, b)
    assert not target.parent.exists()


@pytest.mark.parametrize("content", ["garbage", "foreign"])
def test_unreadable_cache_warns_once_and_is_left_untouched(isolated, content):
    path = isolated / "cache.sqlite"
    if content == "garbage":
        path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 8)
    else:
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE winners (x)")
    before = path.read_bytes()
    files = sorted(p.name for p in isolated.iterdir())
    W, b = random_weights(F, D, torch.float32)
    acts = random_acts(8, F, 4, torch.float32)
    with pytest.warns(DispatchWarning, match="not readable") as caught:
        out1 = sparse_decode(acts, W, b)
        out2 = sparse_decode(acts, W, b)
    assert len([w for w in caught if issubclass(w.category, DispatchWarning)]) == 1
    assert_matches_dense(out1, acts, W, b)
    assert torch.equal(out1, out2)
    assert explain(acts, W, b).source == "model"
    assert path.read_bytes() == before
    assert sorted(p.name for p in isolated.iterdir()) == files


def test_invalid_rows_are_skipped_with_a_warning(isolated):
    path = isolated / "cache.sqlite"
    store_winner(path, "embedding_bag_csr", batch=8)
    store_winner(path, "sparse_coo", batch=16)
    with sqlite3.connect(path) as conn:  # as written by another version, or edited by hand
        conn.execute(
            'UPDATE winners SET impl = \'triton\', config = \'{"alloc": "exact", "block_q": 3}\' '
            "WHERE batch_bucket = 8"
        )
        conn.execute('UPDATE winners SET config = \'{"chunk": "all"}\' WHERE batch_bucket = 16')
    W, b = random_weights(F, D, torch.float32)
    acts = random_acts(8, F, 4, torch.float32)
    with pytest.warns(DispatchWarning, match="skipping sae-tune cache entry") as caught:
        decision = explain(acts, W, b)
    assert len(caught) == 2
    assert decision.source == "model"


def test_entry_failing_verification_is_never_trusted(isolated, monkeypatch):
    def wrong(acts, W_dec, b_dec=None):
        return TORCH_PATHS["dense"].build()(acts, W_dec, b_dec) + 1.0

    monkeypatch.setitem(TORCH_PATHS, "embedding_bag_crow", TorchPath("embedding_bag_crow", wrong))
    store_winner(isolated / "cache.sqlite", "embedding_bag_crow", batch=8)
    W, b = random_weights(F, D, torch.float32)
    acts = random_acts(8, F, 4, torch.float32)
    with pytest.warns(DispatchWarning, match="wrong result against dense"):
        out = sparse_decode(acts, W, b)
    assert_matches_dense(out, acts, W, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_matches_dense(sparse_decode(acts, W, b), acts, W, b)
    assert explain(acts, W, b).source == "model"


def test_variant_the_templates_cannot_render_is_skipped(monkeypatch):
    import jinja2

    import sae_tune.targets.triton.launch as kernels

    def broken(variant):
        raise jinja2.UndefinedError("'block_q' is undefined")

    monkeypatch.setattr(kernels, "load_module", broken)  # what the launchers render from
    rec = record("triton", Variant(alloc="exact", block_f=256, block_d=64, block_l=4).to_dict(), F=256, D=40)
    set_dispatcher(Dispatcher(local_records=[rec], shipped_records=[]))
    W, b = random_weights(256, 40, torch.float32)
    acts = random_acts(8, 256, 4, torch.float32)
    assert explain(acts, W, b).implementation == "triton"
    with pytest.warns(DispatchWarning, match="UndefinedError"):
        out = sparse_decode(acts, W, b)
    assert_matches_dense(out, acts, W, b)
    assert explain(acts, W, b).source == "model"


def test_hot_path_never_reads_the_cache_again(isolated, monkeypatch):
    store_winner(isolated / "cache.sqlite", "embedding_bag_csr", batch=8)
    W, b = random_weights(F, D, torch.float32)
    acts = random_acts(8, F, 4, torch.float32)
    sparse_decode(acts, W, b)

    def no_sqlite(*args, **kwargs):
        raise AssertionError("SQLite touched on the hot path")

    monkeypatch.setattr(sqlite3, "connect", no_sqlite)
    for batch in (acts, acts[:5], acts[:1]):  # also other batch buckets: still in memory
        assert_matches_dense(sparse_decode(batch, W, b), batch, W, b)
    store_winner_later = explain(acts, W, b)
    assert store_winner_later.source == "cache"


def test_reload_reads_winners_tuned_after_the_first_decode(isolated):
    W, b = random_weights(F, D, torch.float32)
    acts = random_acts(8, F, 4, torch.float32)
    assert explain(acts, W, b).source == "model"
    store_winner(isolated / "cache.sqlite", "sparse_coo", batch=8)
    assert explain(acts, W, b).source == "model"  # in memory until reload
    sae_tune.dispatch.reload()
    assert explain(acts, W, b).source == "cache"


# --- overflow safety -----------------------------------------------------------------------------------

FIXED = dict(alloc="fixed", max_l0=8, block_f=256, block_d=32, block_l=4)


@pytest.mark.parametrize("overflow", ["validate", "unchecked", "fallback"])
def test_tokens_above_the_tuned_max_l0_decode_exactly(overflow):
    rec = record("triton", Variant(overflow=overflow, **FIXED).to_dict(), F=256, D=40, batch=6)
    set_dispatcher(Dispatcher(local_records=[rec], shipped_records=[]))
    W, b = random_weights(256, 40, torch.float32)
    acts = random_acts(6, 256, [3, 20, 8, 0, 9, 30], torch.float32)
    decision = explain(acts, W, b)
    assert (decision.implementation, decision.source) == ("triton", "cache")
    assert decision.config["overflow"] == "fallback" and decision.config["max_l0"] == 8
    assert_matches_dense(sparse_decode(acts, W, b), acts, W, b)


def test_unchecked_variant_truncates_only_with_consent():
    rec = record("triton", Variant(overflow="unchecked", **FIXED).to_dict(), F=256, D=40, batch=6)
    set_dispatcher(Dispatcher(local_records=[rec], shipped_records=[]))
    W, b = random_weights(256, 40, torch.float32)
    acts = random_acts(6, 256, 4, torch.float32)
    # a k promise can be broken unseen, so it runs the same slots with the exact fallback
    assert explain(acts, W, b, k=4).config["overflow"] == "fallback"
    assert explain(acts, W, b, k=9).config["overflow"] == "fallback"
    assert explain(acts, W, b, allow_truncation=True).config["overflow"] == "unchecked"
    assert_matches_dense(sparse_decode(acts, W, b, k=4), acts, W, b)


def test_topk_path_needs_a_promise_or_consent(isolated):
    store_winner(isolated / "cache.sqlite", "embedding_bag_topk", {"k": 4}, batch=8)
    W, b = random_weights(F, D, torch.float32)
    heavy = random_acts(8, F, 10, torch.float32)
    assert explain(heavy, W, b).source == "model"
    assert "embedding_bag_topk[k=4] (cache): embedding_bag_topk keeps only k=4" in explain(heavy, W, b).reason
    assert_matches_dense(sparse_decode(heavy, W, b), heavy, W, b)  # not truncated to 4
    light = random_acts(8, F, 4, torch.float32)
    assert explain(light, W, b, k=4).implementation == "embedding_bag_topk"
    assert explain(light, W, b, k=5).source == "model"
    assert explain(heavy, W, b, allow_truncation=True).implementation == "embedding_bag_topk"
    assert_matches_dense(sparse_decode(light, W, b, k=4), light, W, b)


def test_explicit_variant_behaviour_is_kept():
    acts = random_acts(2, 256, [3, 4], torch.float32)
    W, _ = random_weights(256, 32, torch.float32)
    unchecked = Variant(alloc="fixed", overflow="unchecked", max_l0=8, block_f=256, block_d=32, block_l=4)
    with pytest.raises(ValueError, match="allow_truncation"):
        sparse_decode(acts, W, variant=unchecked)
    assert_matches_dense(sparse_decode(acts, W, variant=unchecked, k=4), acts, W)
    with pytest.raises(RuntimeError, match="no backward"):
        sparse_decode(acts.requires_grad_(), W, variant=unchecked, k=4)


# --- gradients -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("b_dtype", [None, torch.float32], ids=["same-dtype-bias", "fp32-bias"])
@pytest.mark.parametrize("dtype_", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradients_equal_dense_autograd(isolated, dtype_, b_dtype):
    store_winner(
        isolated / "cache.sqlite", "embedding_bag_csr", dtype=str(dtype_).removeprefix("torch."), batch=8
    )
    W0, b0 = random_weights(F, D, dtype_)
    acts0 = random_acts(8, F, 6, dtype_).reshape(2, 4, F)
    b0 = b0.to(b_dtype or dtype_)
    grad = torch.randn(2, 4, D, dtype=torch.promote_types(dtype_, b0.dtype))

    def grads(fn):
        acts, W, b = (t.clone().requires_grad_() for t in (acts0, W0, b0))
        out = fn(acts * 1.0, W, b)  # a non-leaf input, as in an SAE
        out.backward(grad)
        return out.detach(), acts.grad, W.grad, b.grad

    assert "dense product's backward" in explain(acts0.detach().requires_grad_(), W0, b0).reason
    ours = grads(sparse_decode)
    ref = grads(lambda a, W, b: a @ W + b)
    assert ours[0].dtype == ref[0].dtype
    for got, want in zip(ours[1:], ref[1:], strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want)  # the same backward ops in the same dtypes
    product_tol = 2 * TOLERANCE[dtype_] * (acts0.double().abs() @ W0.double().abs())
    assert ((ours[0].double() - ref[0].double()).abs() <= product_tol + 1e-6).all()


def test_gradcheck_and_double_backward():
    gather = TORCH_PATHS["embedding_bag_csr"].build()

    def fn(acts, W, b):
        return with_dense_backward(gather, acts, W, b)

    acts = random_acts(4, 64, 5, torch.float64).requires_grad_()
    W, b = (t.requires_grad_() for t in random_weights(64, 8, torch.float64))
    torch.autograd.gradcheck(fn, (acts, W, b))
    torch.autograd.gradgradcheck(fn, (acts, W, b))


def test_without_a_c_compiler_the_model_says_why_and_library_paths_still_run(isolated_dispatch, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    rates = costmodel.Rates(bandwidth=20e9, op_overhead=5e-6, scan=2e9, flops=100e9)
    monkeypatch.setattr(costmodel, "measure_rates", lambda device, dtype=torch.float32: rates)
    W, b = random_weights(16384, 512, torch.float32)
    acts = random_acts(32, 16384, 16, torch.float32)
    decision = explain(acts, W, b)
    assert decision.implementation == "embedding_bag_csr", decision
    assert "cpu target unavailable: no C compiler found" in decision.reason
    assert_matches_dense(sparse_decode(acts, W, b), acts, W, b)
