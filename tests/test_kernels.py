"""Every kernel family in Triton's interpreter against a dense fp64 reference.

The published grid: alloc x dtype x B x F x D x L0 (729 cases), crossed with (BLOCK_L, BLOCK_D) tiles.
The default run takes a representative subset in which every value of every axis appears; the whole
grid runs with ``pytest -m slow``.
"""

import itertools

import pytest
import torch
from conftest import DTYPES, assert_matches_dense, random_acts, random_weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_tune.inputs import check_decode_inputs
from sae_tune.targets.triton.launch import (
    MaxL0Exceeded,
    TruncationNotAllowed,
    build_sparse,
    check_overflow,
    decode_sparse,
    run_variant,
)
from sae_tune.targets.triton.variant import Variant

ALLOCS = ("chunked", "exact", "fixed")
BS, FS, DS, L0S = (1, 4, 32), (256, 1024, 16384), (128, 512, 768), (1, 8, 100)
TILES = ((1, 64), (8, 256), (32, 512))  # (BLOCK_L, BLOCK_D)
GRID = list(itertools.product(ALLOCS, DTYPES, BS, FS, DS, L0S))
assert len(GRID) == 729

# (B, F, D, L0, tile): every value of every axis appears; each runs for every alloc and dtype.
SUBSET = [
    (1, 256, 128, 1, TILES[0]),
    (4, 1024, 512, 8, TILES[1]),
    (32, 16384, 768, 100, TILES[2]),
    (4, 16384, 128, 100, TILES[1]),
    (1, 1024, 768, 100, TILES[0]),
    (32, 256, 512, 8, TILES[1]),
]


def grid_variant(alloc: str, F: int, tile: tuple[int, int]) -> Variant:
    block_l, block_d = tile
    if alloc == "chunked":
        # 4 slots per 256-wide chunk at small widths: the L0 = 100 tokens hold over-full chunks there
        block_l = max(block_l, 4)
        if F <= 1024:
            return Variant(block_f=256, chunk_slots=4, unit_chunks=2, block_l=block_l, block_d=block_d)
        return Variant(block_f=1024, chunk_slots=8, unit_chunks=16, block_l=block_l, block_d=block_d)
    if alloc == "exact":
        return Variant(alloc="exact", block_l=block_l, block_d=block_d)
    # max_l0 = 64 makes the L0 = 100 tokens of small widths over-full: the fallback path runs in the grid
    return Variant(
        alloc="fixed", overflow="fallback", max_l0=64 if F <= 1024 else 128, block_l=block_l, block_d=block_d
    )


def run_case(alloc, dtype, B, F, D, L0, tile, with_bias=True):
    acts = random_acts(B, F, L0, dtype, seed=B * 7 + L0)
    W, b = random_weights(F, D, dtype, seed=F + D)
    bias = b if with_bias else None
    inputs = check_decode_inputs(acts, W, bias)
    out = run_variant(inputs, grid_variant(alloc, F, tile))
    assert_matches_dense(out, acts, W, bias)


@pytest.mark.parametrize("alloc", ALLOCS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, F, D, L0, tile", SUBSET, ids=lambda x: str(x))
def test_grid_subset(alloc, dtype, B, F, D, L0, tile):
    run_case(alloc, dtype, B, F, D, L0, tile, with_bias=(B + L0) % 2 == 0)


@pytest.mark.slow
@pytest.mark.parametrize("tile", TILES, ids=str)
@pytest.mark.parametrize("alloc, dtype, B, F, D, L0", GRID, ids=str)
def test_grid_full(alloc, dtype, B, F, D, L0, tile):
    run_case(alloc, dtype, B, F, D, L0, tile, with_bias=(B + L0) % 2 == 0)


VARIANTS = [
    Variant(),
    Variant(block_f=256, chunk_slots=2, unit_chunks=1, block_l=8, block_d=64),
    Variant(alloc="exact", block_l=1, block_d=32),
    Variant(alloc="exact", block_l=16, block_d=128, block_f=256),
    Variant(alloc="fixed", overflow="validate", max_l0=1024, block_l=4, block_d=64),
    Variant(alloc="fixed", overflow="fallback", max_l0=8, block_l=8, block_d=64, block_f=256),
    Variant(alloc="fixed", overflow="fallback", max_l0=8, block_l=1, block_d=2048),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_edge_rows_all_zero_full_and_ragged(variant, dtype):
    """All-zero tokens, a token with every feature fired (L0 = F), F and D off the block sizes."""
    F, D = 300, 130
    acts = random_acts(5, F, [0, 3, F, 0, 17], dtype)
    W, b = random_weights(F, D, dtype)
    out = run_variant(check_decode_inputs(acts, W, b), variant)
    assert_matches_dense(out, acts, W, b)
    assert torch.equal(out[0], b.to(out.dtype)) and torch.equal(out[3], b.to(out.dtype))


@pytest.mark.parametrize("variant", VARIANTS[:6], ids=lambda v: v.name)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_and_inf_in_activations_propagate_as_in_dense(variant):
    F, D = 256, 64
    acts = random_acts(4, F, 5, torch.float32)
    acts[1, 7] = float("nan")
    acts[2, 9] = float("inf")
    acts[3, 11] = -float("inf")
    W, _ = random_weights(F, D, torch.float32)
    W[9, 3] = 0.0  # inf * 0 -> nan, as in the dense product
    out = run_variant(check_decode_inputs(acts, W, None), variant)
    ref = acts @ W
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    finite = ref.isfinite()
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.isinf() & (out > 0), ref.isinf() & (ref > 0))


def overfull_batch(dtype):
    """Token 1 fires 40 features; its neighbours fire 5 and 8; max_l0 = 16 in the tests below."""
    F, D = 512, 96
    acts = random_acts(3, F, [5, 40, 8], dtype, seed=3)
    W, b = random_weights(F, D, dtype, seed=4)
    return acts, W, b


def test_fallback_decodes_overfull_tokens_exactly(dtype):
    acts, W, b = overfull_batch(dtype)
    for block_l in (1, 4):
        v = Variant(alloc="fixed", overflow="fallback", max_l0=16, block_l=block_l, block_d=64)
        out = run_variant(check_decode_inputs(acts, W, b), v)
        assert_matches_dense(out, acts, W, b)


def test_validate_raises_naming_count_and_max_l0(dtype):
    acts, W, b = overfull_batch(dtype)
    v = Variant(alloc="fixed", overflow="validate", max_l0=16)
    with pytest.raises(MaxL0Exceeded, match=r"40 non-zero features, more than max_l0=16"):
        run_variant(check_decode_inputs(acts, W, b), v)
    v_ok = Variant(alloc="fixed", overflow="validate", max_l0=40)
    assert_matches_dense(run_variant(check_decode_inputs(acts, W, b), v_ok), acts, W, b)


def test_unchecked_refuses_without_opt_in_and_truncates_with_it(dtype):
    acts, W, b = overfull_batch(dtype)
    v = Variant(alloc="fixed", overflow="unchecked", max_l0=16, block_l=4, block_d=32)
    inputs = check_decode_inputs(acts, W, b)
    with pytest.raises(TruncationNotAllowed, match="allow_truncation"):
        run_variant(inputs, v)
    view = build_sparse(inputs.acts, v)
    assert view.offsets.tolist() == [5, 40, 8]  # true counts are kept
    check_overflow(view, allow_truncation=True)
    out = decode_sparse(view, W, b, inputs.out_dtype)
    # neighbours are exact: the over-full token wrote nothing outside its 16 slots
    assert_matches_dense(out[[0, 2]], acts[[0, 2]], W, b)
    # the over-full token holds exactly 16 of its own fired features, and is decoded from those
    kept = view.cols[16:32].long()
    assert len(set(kept.tolist())) == 16 and bool((acts[1, kept] != 0).all())
    truncated = torch.zeros_like(acts[1:2])
    truncated[0, kept] = acts[1, kept]
    assert_matches_dense(out[1:2], truncated, W, b)
    assert not torch.allclose(out[1].double(), (acts[1:2].double() @ W.double() + b.double())[0])


def test_exact_allocation_is_deterministic():
    acts = random_acts(8, 4096, 60, torch.float32)
    W, b = random_weights(4096, 64, torch.float32)
    inputs = check_decode_inputs(acts, W, b)
    v = Variant(alloc="exact", block_f=256, block_l=4, block_d=64)
    first = run_variant(inputs, v)
    assert torch.equal(first, run_variant(inputs, v))
    view = build_sparse(inputs.acts, v)
    # CSR in feature order per token
    for t in range(8):
        cols = view.cols[view.offsets[t] : view.offsets[t + 1]]
        assert torch.equal(cols.long(), acts[t].nonzero().flatten())


def test_addresses_past_2_31_elements_use_int64(dtype):
    """Rows of acts and W_dec that start beyond 2**31 elements are read from the right place.

    The tensors are views with huge strides into untouched (lazily mapped) storage, so this costs
    almost no memory while every row offset exceeds int32.
    """
    stride = 2**30 + 64
    F, D, B = 3, 32, 3
    acts_store = torch.empty(stride * (B - 1) + F, dtype=dtype)
    w_store = torch.empty(stride * (F - 1) + D, dtype=dtype)
    acts = acts_store.as_strided((B, F), (stride, 1))
    W = w_store.as_strided((F, D), (stride, 1))
    acts.copy_(torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, -1.5], [0.5, 3.0, 0.0]], dtype=dtype))
    W.copy_(random_weights(F, D, dtype)[0])
    variants = (
        Variant(alloc="exact", block_f=256, block_d=32),
        Variant(alloc="fixed", max_l0=2, block_d=32),
        Variant(block_f=256, chunk_slots=1, block_d=32),
    )
    for v in variants:
        out = run_variant(check_decode_inputs(acts, W, None), v)
        assert_matches_dense(out, acts.clone(), W.clone())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    F=st.integers(1, 700),
    D=st.integers(1, 150),
    variant=st.sampled_from(VARIANTS),
)
def test_fuzz_ragged_l0(data, dtype, F, D, variant):
    B = data.draw(st.integers(0, 6), label="B")
    l0 = data.draw(st.lists(st.integers(0, F), min_size=B, max_size=B), label="l0")
    acts = random_acts(B, F, l0, dtype, seed=F * 31 + D)
    W, b = random_weights(F, D, dtype)
    bias = b if data.draw(st.booleans(), label="bias") else None
    out = run_variant(check_decode_inputs(acts, W, bias), variant)
    assert_matches_dense(out, acts, W, bias)
