"""``sparse_decode`` is a drop-in: every dtype and bias shape ``acts @ W_dec + b_dec`` takes gives that
expression's result, dtype and shape, whatever path the dispatcher chooses; ``explain`` takes the same
inputs (a ``SparseActs`` included) and says where the bias goes."""

import re

import pytest
import torch
from conftest import TOLERANCE, random_acts, random_weights

from sae_tune import explain, sparse_decode
from sae_tune.cache.store import CacheKey, Provenance, WinnerRecord
from sae_tune.device import describe_device
from sae_tune.dispatch import Dispatcher, reload, set_dispatcher
from sae_tune.sparse_acts import SparseActs
from sae_tune.targets import templates_hash

F, D, B = 192, 24, 6
FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
NAMES = {d: str(d).removeprefix("torch.") for d in FLOATS}


@pytest.fixture(autouse=True)
def _isolated(isolated_dispatch):
    yield
    reload()


def assert_is_dense_expression(out, acts, W, b):
    """The dense expression's dtype and shape; the value within the rounding of the product to W's dtype
    (the dense expression rounds there before adding the bias) plus the result dtype's own."""
    dense = acts @ W if b is None else acts @ W + b
    assert out.dtype == dense.dtype and out.shape == dense.shape, (out.dtype, out.shape, dense.dtype)
    product = acts.double() @ W.double()
    scale = acts.double().abs() @ W.double().abs()
    ref, bias_scale = (product, 0.0) if b is None else (product + b.double(), b.double().abs())
    tol = 2 * TOLERANCE[W.dtype] * scale + TOLERANCE[out.dtype] * (scale + bias_scale)
    tol = tol + torch.finfo(W.dtype).tiny * torch.finfo(W.dtype).eps
    err = (out.double() - ref).abs()
    assert (err <= tol).all(), f"max error {err.max().item():.3g}"


def winner(impl, dtype):
    key = CacheKey.for_device(
        describe_device(torch.device("cpu")),
        template_hash=templates_hash(),
        dtype=NAMES[dtype],
        F=F,
        D=D,
        batch_size=B,
        mean_l0=8,
    )
    set_dispatcher(Dispatcher(local_records=[WinnerRecord(key, impl, {}, 1.0, 10.0, Provenance.current())]))


@pytest.mark.parametrize("b_dtype", [None, *FLOATS], ids=lambda d: NAMES.get(d, "no-bias"))
@pytest.mark.parametrize("w_dtype", FLOATS, ids=NAMES.get)
def test_every_dtype_combination_is_the_dense_expression(w_dtype, b_dtype):
    acts = random_acts(B, F, 7, w_dtype)
    W, b = random_weights(F, D, w_dtype)
    b = None if b_dtype is None else b.to(b_dtype)
    out = sparse_decode(acts, W, b)  # float32 W with a float64 bias raised TypeError on the C default
    assert_is_dense_expression(out, acts, W, b)
    decision = explain(acts, W, b)
    if b is not None and b_dtype != w_dtype:
        assert f"b_dec ({NAMES[b_dtype]}) is added by torch after the product" in decision.reason
    else:
        assert "b_dec" not in decision.reason


@pytest.mark.parametrize("impl", ["embedding_bag_csr", "sparse_coo"])
@pytest.mark.parametrize(
    "w_dtype, b_dtype", [(torch.float32, torch.float64), (torch.bfloat16, torch.float16)]
)
def test_promoting_bias_through_a_tuned_library_winner(impl, w_dtype, b_dtype):
    winner(impl, w_dtype)
    acts = random_acts(B, F, 7, w_dtype)
    W, b = random_weights(F, D, w_dtype)
    out = sparse_decode(acts, W, b.to(b_dtype))
    assert out.dtype == torch.promote_types(w_dtype, b_dtype)
    assert_is_dense_expression(out, acts, W, b.to(b_dtype))
    assert explain(acts, W, b.to(b_dtype)).implementation == impl


@pytest.mark.parametrize(
    "lead, b_shape",
    [
        ((B,), ()),
        ((B,), (1,)),
        ((B,), (1, D)),
        ((B,), (B, D)),
        ((2, 3), (3, D)),
        ((B,), (2, 1, D)),
        ((), (1, D)),
    ],
    ids=str,
)
def test_bias_shapes_that_broadcast_are_the_dense_expression(lead, b_shape):
    n = torch.Size(lead).numel()
    acts = random_acts(n, F, 5, torch.float32).reshape(*lead, F)
    W = random_weights(F, D, torch.float32)[0]
    b = torch.randn(b_shape, generator=torch.Generator().manual_seed(3))
    out = sparse_decode(acts, W, b)
    dense = acts @ W + b
    assert out.shape == dense.shape and out.dtype == dense.dtype
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    assert "broadcast by torch" in explain(acts, W, b).reason or tuple(b_shape) == (D,)


def test_bias_that_does_not_broadcast_is_a_value_error_naming_b_dec():
    acts = random_acts(B, F, 5, torch.float32)
    W = random_weights(F, D, torch.float32)[0]
    for b in (torch.zeros(D + 1), torch.zeros(B + 1, D), torch.zeros(D, 1, 2)):
        with pytest.raises(ValueError, match=rf"b_dec must have shape \({D},\)"):
            sparse_decode(acts, W, b)
        with pytest.raises(ValueError, match="b_dec"):
            explain(acts, W, b)


def test_gradients_flow_through_a_bias_added_after_the_product():
    acts = random_acts(B, F, 5, torch.float32).requires_grad_()
    W = random_weights(F, D, torch.float32)[0].requires_grad_()
    b = torch.randn(1, D, dtype=torch.float64, requires_grad=True)
    sparse_decode(acts, W, b).sum().backward()
    grads = [t.grad.clone() for t in (acts, W, b)]
    for t in (acts, W, b):
        t.grad = None
    (acts @ W + b).sum().backward()
    for got, t in zip(grads, (acts, W, b), strict=True):
        torch.testing.assert_close(got, t.grad)


@pytest.mark.parametrize("b_kind", ["none", "same", "float64", "row"])
def test_explain_takes_a_sparse_acts_like_sparse_decode(b_kind):
    acts = random_acts(B, F, 5, torch.float32)
    W, b = random_weights(F, D, torch.float32)
    b = {"none": None, "same": b, "float64": b.double(), "row": b[None]}[b_kind]
    sa = SparseActs.from_dense(acts)
    out = sparse_decode(sa, W, b)
    assert_is_dense_expression(out, acts, W, b)
    decision = explain(sa, W, b)  # raised on a SparseActs
    assert (decision.implementation, decision.source) == ("embedding_bag_csr", "csr")
    assert "straight from its CSR" in decision.reason
    # and both refuse the same inputs, with the same error
    for bad in (W[:-1], W.double(), W.numpy()):
        with pytest.raises((TypeError, ValueError)) as decode_error:
            sparse_decode(sa, bad, b)
        with pytest.raises(decode_error.type, match=re.escape(str(decode_error.value))):
            explain(sa, bad, b)
    with pytest.raises(ValueError, match="k must be a positive int"):
        sparse_decode(sa, W, b, k=0)
    with pytest.raises(ValueError, match="k must be a positive int"):
        explain(sa, W, b, k=0)
