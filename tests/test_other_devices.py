"""Tensors on a device type sae-tune has no generated target for (``mps``, ``xpu`` ...; ``meta`` is the one
every torch build can make) take the dense expression, with the reason in ``explain``; never a traceback
from inside the dispatcher, and inputs split over devices are a ValueError naming them."""

import pytest
import torch

from sae_tune import explain, sparse_decode
from sae_tune.dispatch import reload
from sae_tune.dispatch.dispatcher import bypass_reason

F, D, B = 64, 8, 4


@pytest.fixture(autouse=True)
def _isolated(isolated_dispatch):
    yield
    reload()


def meta(*shape, dtype=torch.float32):
    return torch.zeros(shape, device="meta", dtype=dtype)


@pytest.mark.parametrize(
    "b",
    [None, "same", "float64", "row", "0-dim"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_meta_tensors_get_the_dense_expression_and_a_reason(dtype, b):
    acts, W = meta(2, B, F, dtype=dtype), meta(F, D, dtype=dtype)
    bias = {
        None: None,
        "same": meta(D, dtype=dtype),
        "float64": meta(D, dtype=torch.float64),
        "row": meta(1, D, dtype=dtype),
        "0-dim": meta(dtype=dtype),
    }[b]
    out = sparse_decode(acts, W, bias)
    dense = acts @ W if bias is None else acts @ W + bias
    assert out.device.type == "meta" and out.shape == dense.shape and out.dtype == dense.dtype
    decision = explain(acts, W, bias)
    assert (decision.implementation, decision.source) == ("dense", "dense")
    assert "device type meta" in decision.reason
    out = sparse_decode(acts, W, bias, k=3)  # the promise changes nothing there
    assert out.shape == dense.shape


def test_meta_with_autograd_and_autocast():
    acts, W = meta(B, F).requires_grad_(), meta(F, D).requires_grad_()
    out = sparse_decode(acts, W, meta(D))
    assert out.requires_grad and out.shape == (B, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sparse_decode(meta(B, F), meta(F, D)).shape == (B, D)


@pytest.mark.parametrize("device_type", ["xpu", "mps", "privateuseone"])
def test_other_device_types_are_left_to_torch_with_the_reason(monkeypatch, device_type):
    """A mocked device type (CPU tensors that say they are elsewhere, to Python code only): the call is
    the dense expression, and explain says why."""
    gen = torch.Generator().manual_seed(0)
    acts, W, b = (
        torch.rand(B, F, generator=gen),
        torch.rand(F, D, generator=gen),
        torch.rand(D, generator=gen),
    )
    monkeypatch.setattr(torch.Tensor, "is_cpu", property(lambda self: False))
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device(device_type)))
    assert bypass_reason(acts, W, b) == f"device type {device_type}"
    out = sparse_decode(acts, W, b)
    decision = explain(acts, W, b)
    monkeypatch.undo()
    assert torch.equal(out, acts @ W + b)
    assert (decision.implementation, decision.source) == ("dense", "dense")
    assert decision.reason == f"left to torch: device type {device_type}"


def test_inputs_split_over_devices_are_a_value_error_naming_them():
    acts, W = torch.zeros(B, F), torch.zeros(F, D)
    with pytest.raises(ValueError, match="feature_acts is on cpu but W_dec is on meta"):
        sparse_decode(acts, meta(F, D))  # torch's own "Tensor on device meta is not on the expected device"
    with pytest.raises(ValueError, match="feature_acts is on meta but W_dec is on cpu"):
        explain(meta(B, F), W)
    with pytest.raises(ValueError, match="b_dec is on meta but W_dec is on cpu"):
        sparse_decode(acts, W, meta(D))
    with pytest.raises(ValueError, match="b_dec is on cpu but W_dec is on meta"):
        sparse_decode(meta(B, F), meta(F, D), torch.zeros(1, D))
    # a 0-dim bias may live anywhere, as torch allows it
    assert sparse_decode(meta(B, F), meta(F, D), torch.tensor(1.0)).shape == (B, D)
