import pytest
import torch
from conftest import assert_matches_dense, random_acts, random_weights

from sae_tune import Variant, sparse_decode
from sae_tune.targets.triton.launch import TruncationNotAllowed

EXACT = Variant(alloc="exact", block_d=64, block_l=4, block_f=256)
FALLBACK = Variant(alloc="fixed", overflow="fallback", max_l0=8, block_d=64, block_l=4, block_f=256)


@pytest.mark.parametrize("variant", [EXACT, FALLBACK], ids=lambda v: v.alloc)
@pytest.mark.parametrize("lead", [(), (2, 3), (1, 1, 4)], ids=str)
def test_leading_dimensions_are_flattened_and_restored(variant, lead, dtype):
    F, D = 300, 70
    n = 1
    for s in lead:
        n *= s
    acts2d = random_acts(n, F, 6, dtype)
    acts = acts2d.reshape(*lead, F)
    W, b = random_weights(F, D, dtype)
    out = sparse_decode(acts, W, b, variant=variant)
    assert out.shape == (*lead, D)
    assert_matches_dense(out.reshape(n, D), acts2d, W, b)


@pytest.mark.parametrize("variant", [EXACT, FALLBACK], ids=lambda v: v.alloc)
def test_non_contiguous_inputs(variant, dtype):
    F, D = 260, 48
    acts_t = random_acts(F, 5, 0, dtype)  # placeholder storage, filled below
    acts = acts_t.t()  # (5, F) with strides (1, 5)
    acts.copy_(random_acts(5, F, 9, dtype))
    W_t, _ = random_weights(D, F, dtype)
    W = W_t.t()  # (F, D) with strides (1, F)
    b_wide = random_weights(1, 2 * D, dtype)[1]
    b = b_wide[::2]  # stride 2
    every_other = random_acts(10, F, 4, dtype)[::2]  # row stride 2F
    assert not acts.is_contiguous() and not W.is_contiguous() and not b.is_contiguous()
    assert_matches_dense(sparse_decode(acts, W, b, variant=variant), acts, W, b)
    assert_matches_dense(sparse_decode(every_other, W, None, variant=variant), every_other, W)


@pytest.mark.parametrize("variant", [EXACT, FALLBACK], ids=lambda v: v.alloc)
@pytest.mark.parametrize("shape", [(0, 300), (2, 0, 300)], ids=str)
def test_empty_batch(variant, shape, dtype):
    W, b = random_weights(300, 40, dtype)
    out = sparse_decode(torch.zeros(shape, dtype=dtype), W, b, variant=variant)
    assert out.shape == (*shape[:-1], 40) and out.dtype == dtype


def test_bias_dtype_promotes_as_the_dense_expression():
    acts = random_acts(3, 256, 5, torch.float16)
    W, _ = random_weights(256, 32, torch.float16)
    b = torch.randn(32, dtype=torch.float32)
    out = sparse_decode(acts, W, b, variant=EXACT)
    assert out.dtype == (acts @ W + b).dtype == torch.float32
    assert_matches_dense(out, acts, W, b)


def test_truncating_variant_needs_explicit_opt_in():
    acts = random_acts(2, 256, [3, 20], torch.float32)
    W, _ = random_weights(256, 32, torch.float32)
    unchecked = Variant(alloc="fixed", overflow="unchecked", max_l0=8)
    with pytest.raises(TruncationNotAllowed):
        sparse_decode(acts, W, variant=unchecked)
    out = sparse_decode(acts, W, variant=unchecked, allow_truncation=True)
    assert_matches_dense(out[:1], acts[:1], W)


def test_variant_is_typed_and_optional():
    acts = random_acts(2, 256, 3, torch.float32)
    W, _ = random_weights(256, 32, torch.float32)
    assert_matches_dense(sparse_decode(acts, W), acts, W)  # no variant: the dispatcher chooses
    with pytest.raises(TypeError, match="Variant"):
        sparse_decode(acts, W, variant={"alloc": "exact"})  # type: ignore[arg-type]


def test_gradients_are_never_silently_dropped():
    acts = random_acts(2, 256, 3, torch.float32).requires_grad_()
    W, _ = random_weights(256, 32, torch.float32)
    with pytest.raises(RuntimeError, match="no backward"):
        sparse_decode(acts, W, variant=EXACT)
    with torch.no_grad():
        assert_matches_dense(sparse_decode(acts, W, variant=EXACT), acts.detach(), W)
