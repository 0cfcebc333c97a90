"""Regression tests of the decode path's hardening: each test fails on the code before its fix."""

import warnings

import pytest
import torch
from conftest import TOLERANCE, assert_matches_dense, random_acts, random_weights

from sae_tune import Variant, explain, sparse_decode
from sae_tune.autotune.verify import Reference, check
from sae_tune.cache.store import CacheKey, Provenance, WinnerRecord
from sae_tune.device import describe_device
from sae_tune.dispatch import Dispatcher, DispatchWarning, reload, set_dispatcher
from sae_tune.inputs import check_decode_inputs
from sae_tune.targets import templates_hash
from sae_tune.targets.library.paths import embedding_bag_topk
from sae_tune.targets.triton.launch import build_sparse, decode_sparse

CPU = torch.device("cpu")
F, D = 256, 32
SMALL = dict(block_f=256, block_d=32, block_l=4)  # one program per token and tile: fast in the interpreter
EXACT = Variant(**SMALL)


@pytest.fixture(autouse=True)
def isolated(isolated_dispatch):
    yield
    reload()


def record(impl, config, *, dtype="float32", batch=8, l0=8, F=F, D=D):
    key = CacheKey.for_device(
        describe_device(CPU),
        template_hash=templates_hash(),
        dtype=dtype,
        F=F,
        D=D,
        batch_size=batch,
        mean_l0=l0,
    )
    return WinnerRecord(key, impl, config, 1.0, 10.0, Provenance.current())


def use(*records):
    set_dispatcher(Dispatcher(local_records=list(records), shipped_records=[]))


def neg_view(x: torch.Tensor) -> torch.Tensor:
    view = torch.complex(torch.zeros_like(x), -x).conj().imag
    assert view.is_neg() and torch.equal(view.clone(), x)
    return view


# --- 1. negative / conjugate bits ------------------------------------------------------------------------


def test_negated_views_decode_to_their_values_on_every_path():
    acts = random_acts(6, F, 5, torch.float32)
    W, b = random_weights(F, D, torch.float32)
    nacts, nW, nb = neg_view(acts), neg_view(W), neg_view(b)
    with torch.no_grad():
        assert_matches_dense(sparse_decode(nacts, nW, nb, variant=EXACT), acts, W, b)
        fixed = Variant(alloc="fixed", max_l0=4, **SMALL)  # token 0.. have 5: the fallback walk reads acts
        assert_matches_dense(sparse_decode(nacts, nW, nb, variant=fixed), acts, W, b)
        view = build_sparse(nacts, EXACT)
        assert_matches_dense(decode_sparse(view, nW, nb, torch.float32), acts, W, b)
    inputs = check_decode_inputs(nacts, nW, nb)
    assert not (inputs.acts.is_neg() or inputs.W_dec.is_neg() or inputs.b_dec.is_neg())
    # through the dispatcher: a kernel entry verified on an ordinary batch, then a negated one
    use(record("triton", EXACT.to_dict(), batch=6))
    assert_matches_dense(sparse_decode(acts, W, b), acts, W, b)
    assert explain(nacts, nW, nb).implementation == "triton"
    assert_matches_dense(sparse_decode(nacts, nW, nb), acts, W, b)


# --- 2. float64 on the kernel path ---------------------------------------------------------------------


def test_kernel_path_refuses_float64_and_messages_list_what_is_accepted():
    acts = random_acts(2, F, 3, torch.float64)
    W, b = random_weights(F, D, torch.float64)
    with pytest.raises(TypeError, match=r"float32, float16, bfloat16; feature_acts is torch.float64"):
        sparse_decode(acts, W, b, variant=EXACT)
    with pytest.raises(TypeError, match=r"b_dec is torch.float64"):  # would be added in fp32
        sparse_decode(acts.float(), W.float(), b, variant=EXACT)
    with pytest.raises(TypeError, match=r"float32, float16, bfloat16; feature_acts is torch.int64"):
        sparse_decode(acts.long(), W.long(), variant=EXACT)
    # the generic checks accept float64, and say so
    with pytest.raises(TypeError, match=r"\(float32, float16, bfloat16, float64\), got torch.int64"):
        check_decode_inputs(acts.long(), W)
    assert sparse_decode(acts, W, b).dtype == torch.float64  # the dispatcher still takes it


# --- 3. the k promise ----------------------------------------------------------------------------------


def test_topk_winner_decodes_features_added_behind_autograds_back():
    W, b = random_weights(F, D, torch.float32)
    acts = random_acts(8, F, 4, torch.float32)
    use(record("embedding_bag_topk", {"k": 4}))
    assert_matches_dense(sparse_decode(acts, W, b, k=4), acts, W, b)
    assert explain(acts, W, b, k=4).implementation == "embedding_bag_topk"
    free = (acts[0] == 0).nonzero().flatten()[:3]
    acts.data[0, free] += 5.0  # a steering edit: no version bump autograd would see
    acts.numpy()[3, free.numpy()] = -2.0  # another one, through numpy
    assert_matches_dense(sparse_decode(acts, W, b, k=4), acts, W, b)
    assert_matches_dense(embedding_bag_topk(4)(acts, W, b), acts, W, b)


def test_unchecked_kernel_under_a_broken_promise_stays_exact():
    W, b = random_weights(F, D, torch.float32)
    unchecked = Variant(alloc="fixed", overflow="unchecked", max_l0=8, **SMALL)
    use(record("triton", unchecked.to_dict(), batch=6))
    light = random_acts(6, F, 4, torch.float32)
    assert_matches_dense(sparse_decode(light, W, b, k=8), light, W, b)
    heavy = random_acts(6, F, [3, 20, 8, 0, 9, 30], torch.float32)  # the promise k=8 broken
    assert_matches_dense(sparse_decode(heavy, W, b, k=8), heavy, W, b)
    with torch.no_grad():
        assert_matches_dense(sparse_decode(heavy, W, b, variant=unchecked, k=8), heavy, W, b)


# --- 4. overflowing batches ----------------------------------------------------------------------------


def test_verdict_on_overflow_compares_as_the_dense_product_would():
    acts = torch.zeros(2, 8)
    acts[:, :3] = 2e38
    W = torch.ones(8, 4)
    ref = Reference.of(acts, W)
    out = acts @ W  # +inf: 6e38 rounds to inf in float32
    assert out.isinf().all() and check(out, ref, torch.float32).ok
    wrong = out.clone()
    wrong[0, 0] = float("nan")
    assert not check(wrong, ref, torch.float32).ok  # a NaN where the product is +inf
    # the exact sum is finite but some orders overflow: the batch cannot decide, the path is not blamed
    acts[:, 2] = -2e38
    ref = Reference.of(acts, W)
    verdict = check(torch.full((2, 4), float("inf")), ref, torch.float32)
    assert not verdict.ok and not verdict.decided and "overflow" in verdict.reason
    assert check(torch.full((2, 4), 2e38), ref, torch.float32).ok
    # an ordinary wrong result is still decided
    small = random_acts(2, 8, 3, torch.float32)
    verdict = check(small @ W + 1.0, Reference.of(small, W), torch.float32)
    assert not verdict.ok and verdict.decided


@pytest.mark.parametrize("dtype, big", [(torch.float32, 2e38), (torch.float16, 4e4)], ids=str)
def test_an_overflowing_batch_does_not_condemn_the_path(dtype, big):
    W, b = random_weights(F, D, dtype)
    W = W.abs() + 0.5  # every product of a large activation is large
    use(record("embedding_bag_csr", {}, dtype=str(dtype).removeprefix("torch.")))
    huge = torch.zeros(8, F, dtype=dtype)
    huge[:, :3] = big
    huge[1, 2] = -big  # token 1: finite exact sum, order-dependent overflow
    with warnings.catch_warnings():
        warnings.simplefilter("error", DispatchWarning)
        out = sparse_decode(huge, W, b)
    dense = huge @ W + b
    assert out.dtype == dense.dtype
    assert torch.equal(out.isinf(), dense.isinf()) and torch.equal(out.isnan(), dense.isnan())
    ordinary = random_acts(8, F, 6, dtype)
    assert_matches_dense(sparse_decode(ordinary, W, b), ordinary, W, b)
    decision = explain(ordinary, W, b)
    assert (decision.implementation, decision.source) == ("embedding_bag_csr", "cache")


# --- 13. explain describes the call it is given ----------------------------------------------------------


def test_model_reason_quotes_the_explained_batch(monkeypatch):
    use()
    W, b = random_weights(F, D, torch.float32)
    jumprelu = random_acts(8, F, 40, torch.float32)
    topk = random_acts(8, F, 4, torch.float32)
    sparse_decode(jumprelu, W, b)
    assert "mean L0 40" in explain(jumprelu, W, b).reason
    reason = explain(topk, W, b).reason
    assert "mean L0 4," in reason and "mean L0 40," not in reason

    def no_count(*args, **kwargs):
        raise AssertionError("a count on the settled hot path")

    monkeypatch.setattr(torch, "count_nonzero", no_count)
    assert_matches_dense(sparse_decode(topk, W, b), topk, W, b)


# --- 14. clear errors on the explicit-variant path ----------------------------------------------------


def _bad_inputs():
    acts = random_acts(4, F, 3, torch.float32)
    W, b = random_weights(F, D, torch.float32)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        csr = acts.to_sparse_csr()
    return [
        ("coo acts", (acts.to_sparse(), W, b), {}, TypeError, ["feature_acts", "strided", "sparse_coo"]),
        ("csr acts", (csr, W, b), {}, TypeError, ["feature_acts", "sparse_csr"]),
        ("coo W", (acts, W.to_sparse(), b), {}, TypeError, ["W_dec", "sparse_coo"]),
        ("coo b", (acts, W, b.to_sparse()), {}, TypeError, ["b_dec", "sparse_coo"]),
        ("0-dim acts", (torch.tensor(1.0), W, b), {}, ValueError, ["feature_acts", "0-D"]),
        ("1-D W", (acts, W[:, 0].contiguous(), None), {}, ValueError, ["W_dec", "2-D"]),
        ("3-D W", (acts, W[None], b), {}, ValueError, ["W_dec", "2-D"]),
        ("list acts", (acts.tolist(), W, b), {}, TypeError, ["feature_acts", "list"]),
        ("numpy W", (acts, W.numpy(), b), {}, TypeError, ["W_dec", "ndarray"]),
        ("list b", (acts, W, b.tolist()), {}, TypeError, ["b_dec", "list"]),
        ("b shape", (acts, W, b[None]), {}, ValueError, ["b_dec", f"({D},)"]),
        ("width", (acts[:, :10], W, b), {}, ValueError, ["feature_acts", "W_dec"]),
        ("variant dict", (acts, W, b), {"variant": EXACT.to_dict()}, TypeError, ["variant", "dict"]),
        ("truncation", (acts, W, b), {"allow_truncation": "yes"}, TypeError, ["allow_truncation"]),
        ("k", (acts, W, b), {"k": 2.0}, ValueError, ["k"]),
        ("complex", (acts.cfloat(), W.cfloat(), None), {}, TypeError, ["feature_acts", "complex64"]),
    ]


@pytest.mark.parametrize("case, args, kwargs, error, words", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_explicit_variant_inputs_get_errors_naming_what_is_wrong(case, args, kwargs, error, words):
    kwargs = {"variant": EXACT, **kwargs}
    with pytest.raises(error) as info:
        sparse_decode(*args, **kwargs)
    for word in words:
        assert word in str(info.value), (case, str(info.value))


def test_explicit_variant_on_zero_features_or_columns_is_the_dense_expression():
    W, b = random_weights(F, D, torch.float32)
    out = sparse_decode(torch.zeros(3, 0), torch.zeros(0, D), b, variant=EXACT)
    assert torch.equal(out, b.expand(3, D))
    out = sparse_decode(torch.zeros(2, 3, 0), torch.zeros(0, D), variant=EXACT)
    assert out.shape == (2, 3, D) and not out.any()
    acts = random_acts(4, F, 3, torch.float32)
    assert sparse_decode(acts, torch.zeros(F, 0), torch.zeros(0), variant=EXACT).shape == (4, 0)
    # the dispatcher keeps leaving sparse layouts to torch's own expression
    torch.testing.assert_close(sparse_decode(acts.to_sparse(), W, b), acts @ W + b)


# --- 15. autocast ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "fp32-bias"])
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16], ids=["fp32-W", "bf16-W"])
def test_autocast_gives_the_dtype_and_value_of_the_dense_expression(w_dtype, with_bias):
    acts = random_acts(8, F, 6, torch.float32)
    W, b = random_weights(F, D, w_dtype)
    b = b.float() if with_bias else None
    use(
        record("embedding_bag_csr", {}, dtype="float32"),
        record("embedding_bag_csr", {}, dtype="bfloat16"),
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = acts @ W if b is None else acts @ W + b
        got = sparse_decode(acts, W, b)
        with torch.no_grad():
            explicit = sparse_decode(acts, W, b, variant=EXACT)
        decision = explain(acts, W, b)
    a16, W16 = acts.bfloat16(), W.bfloat16()
    for out in (got, explicit):
        assert out.dtype == want.dtype
        if b is None:
            assert_matches_dense(out, a16, W16)
        else:  # the product rounded to bf16, then the fp32 bias added
            tol = 2 * TOLERANCE[torch.bfloat16] * (a16.double().abs() @ W16.double().abs()) + 1e-6
            assert ((out.double() - want.double()).abs() <= tol).all()
    if w_dtype == torch.bfloat16:
        assert decision.implementation == "embedding_bag_csr"  # acts cast as autocast would, then sparse
    else:
        assert "autocast" in decision.reason  # W_dec would need a cast: left to torch
