"""SparseActs: CSR activations validated on construction, densified exactly, decoded from the CSR directly."""

import pytest
import torch
from conftest import DTYPES, assert_matches_dense, random_acts, random_weights

import sae_tune
from sae_tune import SparseActs


def csr(offsets, indices, values, F=8, **kw):
    return SparseActs(
        torch.tensor(offsets, dtype=torch.int64),
        torch.tensor(indices, dtype=kw.pop("index_dtype", torch.int64)),
        torch.tensor(values, dtype=torch.float32),
        F,
        **kw,
    )


def test_to_dense_nnz_and_rows():
    a = csr([0, 2, 2, 3], [1, 5, 7], [1.0, -2.0, 3.0])
    assert a.nnz == 3 and a.n_tokens == 3 and a.shape == (3, 8)
    dense = torch.zeros(3, 8)
    dense[0, 1], dense[0, 5], dense[2, 7] = 1.0, -2.0, 3.0
    assert torch.equal(a.to_dense(), dense)
    assert a.rows().tolist() == [0, 0, 2]
    assert a.row_counts().tolist() == [2, 0, 1]


def test_repeated_feature_sums_in_to_dense_and_decode():
    a = csr([0, 2], [3, 3], [1.0, 2.0], F=4)
    assert a.to_dense().tolist() == [[0.0, 0.0, 0.0, 3.0]]
    W = torch.arange(8.0).reshape(4, 2)
    assert torch.equal(sae_tune.sparse_decode(a, W), a.to_dense() @ W)


def test_lead_shape_and_from_dense_round_trip():
    acts = random_acts(6, 50, 4, torch.float32).reshape(2, 3, 50)
    a = SparseActs.from_dense(acts)
    assert a.lead_shape == (2, 3) and a.shape == (2, 3, 50) and a.nnz == 24
    assert torch.equal(a.to_dense(), acts)
    b = SparseActs(a.offsets, a.indices.int(), a.values, 50, lead_shape=(2, 3))
    assert torch.equal(b.to_dense(), acts)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(offsets=[0, 2, 1], indices=[1, 2], values=[1.0, 2.0]), ValueError, "must run from 0 to nnz"),
        (dict(offsets=[0, 2, 1, 2], indices=[1, 2], values=[1.0, 2.0]), ValueError, "must not decrease"),
        (dict(offsets=[1, 2], indices=[1, 2], values=[1.0, 2.0]), ValueError, "from 0 to nnz"),
        (dict(offsets=[0, 2], indices=[1, 8], values=[1.0, 2.0]), ValueError, r"in \[0, 8\)"),
        (dict(offsets=[0, 2], indices=[-1, 2], values=[1.0, 2.0]), ValueError, r"in \[0, 8\)"),
        (dict(offsets=[0, 2], indices=[1, 2], values=[1.0]), ValueError, "2 indices but 1 values"),
        (dict(offsets=[0, 2], indices=[1, 2], values=[1.0, 2.0], lead_shape=(2,)), ValueError, "lead_shape"),
        (dict(offsets=[0, 2], indices=[1, 2], values=[1.0, 2.0], max_per_row=1), ValueError, "a row holds 2"),
        (dict(offsets=[0, 2], indices=[1, 2], values=[1.0, 2.0], F=-1), ValueError, "num_features"),
    ],
)
def test_invalid_csr_is_refused_naming_the_field(kwargs, error, match):
    F = kwargs.pop("F", 8)
    with pytest.raises(error, match=match):
        csr(kwargs.pop("offsets"), kwargs.pop("indices"), kwargs.pop("values"), F=F, **kwargs)


def test_wrong_dtypes_and_types_are_refused():
    off, idx, val = torch.tensor([0, 1]), torch.tensor([0]), torch.tensor([1.0])
    with pytest.raises(TypeError, match="offsets must be int64"):
        SparseActs(off.int(), idx, val, 4)
    with pytest.raises(TypeError, match="indices must be int64 or int32"):
        SparseActs(off, idx.short(), val, 4)
    with pytest.raises(TypeError, match="values must be float32"):
        SparseActs(off, idx, val.long(), 4)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        SparseActs([0, 1], idx, val, 4)
    with pytest.raises(ValueError, match="must be 1-D"):
        SparseActs(off, idx.reshape(1, 1), val, 4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_from_csr_matches_fp64(dtype):
    acts = random_acts(9, 300, [0, 1, 5, 17, 3, 0, 40, 2, 9], dtype).reshape(3, 3, 300)
    W, b = random_weights(300, 48, dtype)
    a = SparseActs.from_dense(acts)
    out = sae_tune.sparse_decode(a, W, b)
    assert out.shape == (3, 3, 48)
    assert_matches_dense(out.reshape(9, 48), acts.reshape(9, 300), W, b)
    assert_matches_dense(sae_tune.sparse_decode(a, W).reshape(9, 48), acts.reshape(9, 300), W)


def test_decode_of_empty_acts_is_the_bias():
    W, b = random_weights(10, 4, torch.float32)
    a = SparseActs(torch.zeros(4, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0), 10)
    assert torch.equal(sae_tune.sparse_decode(a, W, b), b.expand(3, 4))


def test_decode_refuses_mismatches():
    a = csr([0, 1], [1], [1.0])
    with pytest.raises(ValueError, match=r"W_dec must have shape \(8, D\)"):
        sae_tune.sparse_decode(a, torch.zeros(7, 4))
    with pytest.raises(TypeError, match="same dtype"):
        sae_tune.sparse_decode(a, torch.zeros(8, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"b_dec must have shape \(4,\)"):
        sae_tune.sparse_decode(a, torch.zeros(8, 4), torch.zeros(5))
    with pytest.raises(TypeError, match="variant= takes dense"):
        sae_tune.sparse_decode(a, torch.zeros(8, 4), variant=sae_tune.Variant())
