"""TopK sparse_encode is SAELens's TopK (``torch.topk`` over the whole row, then ReLU) for every k in [1, F]
and every input: NaN pre-activations (which torch.topk ranks above +inf), ties, k = 1 and k near F."""

import pytest
import torch
from conftest import DTYPES
from test_encode import D, F, assert_saelens_nonzeros, assert_same_nonzeros, problem, saelens_topk

from sae_tune import sparse_encode
from sae_tune.encode import MIN_CHUNK


def rows_of(acts, rows):
    """(indices, values) of the given tokens, token by token."""
    out = []
    for r in rows:
        s, e = int(acts.offsets[r]), int(acts.offsets[r + 1])
        out.append((acts.indices[s:e], acts.values[s:e]))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 7, F - 1])
def test_a_token_whose_input_holds_a_nan_keeps_saelens_nan_features(dtype, k):
    """A NaN in a token's input makes its whole row NaN: torch.topk keeps k of F NaNs, and which depends
    on the whole row; a running top-k over chunks kept others."""
    x, W, b, _ = problem(dtype)
    x[0, 0] = float("nan")
    x[4, D - 1] = float("nan")
    for chunk in (MIN_CHUNK, 700):
        acts = sparse_encode(x, W, b, k=k, chunk=chunk)
        dense = saelens_topk(x, W, b, k)
        ref = sparse_encode(x, W, b, k=k, chunk=F)  # the whole row: SAELens's own call
        assert_same_nonzeros(ref, dense)
        for (i, v), (ri, rv) in zip(rows_of(acts, [0, 4]), rows_of(ref, [0, 4]), strict=True):
            assert torch.equal(i, ri) and v.isnan().all() and rv.isnan().all()
        assert_saelens_nonzeros(acts, dense, x, W, b, chunk, k=k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_nan", [3, 8, 40])
def test_nan_features_more_or_fewer_than_k(dtype, n_nan):
    """Features whose bias is NaN: with at most k of them all are kept; with more, torch.topk's pick."""
    x, W, b, _ = problem(dtype)
    nan_features = torch.randperm(F, generator=torch.Generator().manual_seed(n_nan))[:n_nan]
    b[nan_features] = float("nan")
    for k in (7, 8):
        for chunk in (MIN_CHUNK, 700):
            acts = sparse_encode(x, W, b, k=k, chunk=chunk)
            assert_saelens_nonzeros(acts, saelens_topk(x, W, b, k), x, W, b, chunk, k=k)
            assert_same_nonzeros(
                sparse_encode(x, W, b, k=k, chunk=chunk, exact=True), saelens_topk(x, W, b, k)
            )


@pytest.mark.parametrize("dtype", DTYPES)
def test_k_from_one_to_f_with_ties_and_infinities(dtype):
    """k at both ends of [1, F], with features tied at the top (+inf and finite twins spread over chunks)."""
    x, W, b, _ = problem(dtype)
    twins = [3, 300, 301, 900, 1499]
    W[:, twins] = W[:, 3:4]
    b[twins] = 5.0
    b[[10, 600, 1300]] = float("inf")
    for k in (1, 2, 3, 4, 8, F - 2, F - 1, F):
        acts = sparse_encode(x, W, b, k=k, chunk=MIN_CHUNK, exact=True)
        assert_same_nonzeros(acts, saelens_topk(x, W, b, k))
        assert acts.max_per_row <= k
