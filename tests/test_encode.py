"""sparse_encode: exactly SAELens's non-zeros (bitwise), chunked over F without a dense (B, F) tensor."""

import pytest
import torch
from conftest import DTYPES, TOLERANCE
from torch.utils._python_dispatch import TorchDispatchMode

import sae_tune
from sae_tune import SparseActs, sparse_encode
from sae_tune.encode import MIN_CHUNK, chunk_bounds, default_chunk, gemm_columns_exact

D, F = 96, 1500  # F not a multiple of any chunk below: the last chunk is partial


def problem(dtype, B=13, seed=0, lead=None):
    B = B if lead is None else lead[0] * lead[1]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen)
    W = torch.randn(D, F, generator=gen) / D**0.5
    b = torch.randn(F, generator=gen) / 4 - 1.0
    thr = torch.rand(F, generator=gen) * 1.5  # some thresholds below the ReLU's zero do not matter
    thr[:10] = -0.5
    x = x.reshape(*lead, D) if lead else x
    return x.to(dtype), W.to(dtype), b.to(dtype), thr.to(dtype)


# SAELens's expressions (sae_lens/saes/*.py encode, after process_sae_in)
def saelens_relu(x, W, b):
    return torch.relu(x @ W + b)


def saelens_jumprelu(x, W, b, thr):
    pre = x @ W + b
    return torch.relu(pre) * (pre > thr).to(pre.dtype)


def saelens_topk(x, W, b, k):
    pre = x @ W + b
    v, i = torch.topk(pre, k=k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, i, v.relu())


def assert_same_nonzeros(acts: SparseActs, dense: torch.Tensor):
    """Identical indices and values (bitwise, NaN included), features ascending in every row."""
    ref = SparseActs.from_dense(dense)
    assert acts.shape == dense.shape
    assert torch.equal(acts.offsets, ref.offsets)
    assert torch.equal(acts.indices, ref.indices)
    torch.testing.assert_close(acts.values, ref.values, rtol=0, atol=0, equal_nan=True)


def rounding_bound(x, W, b):
    """How far two correct GEMMs of x @ W + b may differ: a few units in the last place of the summed
    magnitudes |x| @ |W| + |b| (TOLERANCE is about one; two roundings, each side)."""
    x2, W2, b2 = x.reshape(-1, W.shape[0]).double(), W.double(), b.double()
    return 4 * TOLERANCE[x.dtype] * (x2.abs() @ W2.abs() + b2.abs())


def assert_within_gemm_rounding(acts: SparseActs, dense: torch.Tensor, x, W, b, *, thr=None, k=None):
    """The weaker promise, where the BLAS rounds a column slice otherwise than the full GEMM: every feature
    whose value differs from SAELens's differs by at most the GEMM's rounding, and one that fires in only
    one of them has a pre-activation within that rounding of max(threshold, 0) (TopK: of its token's k-th
    largest pre-activation)."""
    mine, ref = acts.to_dense().reshape(dense.shape).double(), dense.double()
    mine, ref = mine.reshape(-1, W.shape[1]), ref.reshape(-1, W.shape[1])
    bound = rounding_bound(x, W, b)
    pre = (x.reshape(-1, W.shape[0]) @ W + b).double()  # SAELens's pre-activations
    both_fire = (mine != 0) & (ref != 0)
    same = (mine == ref) | (mine.isnan() & ref.isnan())  # NaN or inf: the same on both sides
    close = same | ((mine - ref).abs() <= bound)
    assert close[both_fire].all(), "a value differs beyond rounding"
    one_fires = (mine != 0) != (ref != 0)
    if k is not None:
        edge = torch.topk(pre, k=k, dim=-1).values[:, -1:].clamp_min(0)
    else:
        edge = torch.zeros_like(pre) if thr is None else thr.double().clamp_min(0).expand_as(pre)
    near = (pre - edge).abs() <= 2 * bound
    assert near[one_fires].all(), "a feature far from the threshold fires in only one of the two"


def assert_saelens_nonzeros(acts: SparseActs, dense: torch.Tensor, x, W, b, chunk, *, thr=None, k=None):
    """The promise: bitwise where this BLAS gives column slices the full GEMM's numbers, else the weaker."""
    if chunk is None or gemm_columns_exact(x.reshape(-1, W.shape[0]), W, chunk):
        assert_same_nonzeros(acts, dense)
    else:
        assert_within_gemm_rounding(acts, dense, x, W, b, thr=thr, k=k)


CHUNKS = [None, MIN_CHUNK, 700]  # None: one chunk (F) at this batch size


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", CHUNKS)
def test_jumprelu_and_relu_match_saelens_bitwise(dtype, chunk):
    x, W, b, thr = problem(dtype, lead=(3, 5))
    acts = sparse_encode(x, W, b, threshold=thr, chunk=chunk)
    assert_saelens_nonzeros(acts, saelens_jumprelu(x, W, b, thr), x, W, b, chunk, thr=thr)
    assert 0 < acts.nnz < x.numel() // D * F
    assert_saelens_nonzeros(sparse_encode(x, W, b, chunk=chunk), saelens_relu(x, W, b), x, W, b, chunk)
    exact = sparse_encode(x, W, b, threshold=thr, chunk=chunk, exact=True)  # bitwise on every BLAS
    assert_same_nonzeros(exact, saelens_jumprelu(x, W, b, thr))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize("k", [1, 32, 300])
def test_topk_matches_saelens_bitwise(dtype, chunk, k):
    x, W, b, _ = problem(dtype)
    acts = sparse_encode(x, W, b, k=k, chunk=chunk)
    assert acts.max_per_row == k
    assert_saelens_nonzeros(acts, saelens_topk(x, W, b, k), x, W, b, chunk, k=k)
    assert_same_nonzeros(sparse_encode(x, W, b, k=k, chunk=chunk, exact=True), saelens_topk(x, W, b, k))


def test_topk_drops_features_whose_relu_is_zero():
    x, W, b, _ = problem(torch.float32)
    acts = sparse_encode(x, W, b - 10.0, k=50, chunk=MIN_CHUNK, exact=True)  # few positive pre-acts
    assert (acts.row_counts() < 50).any()
    assert_same_nonzeros(acts, saelens_topk(x, W, b - 10.0, 50))


def test_gemm_columns_exact_says_whether_this_blas_keeps_the_premise():
    """The premise of bitwise parity (columns s:e of x @ W equal x @ W[:, s:e]) holds on some BLAS and not
    on others; the probe must say which, for this machine's BLAS, as a direct comparison finds."""
    gen = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        for B in (1, 7, 64):
            x = torch.randn(B, 512, generator=gen).to(dtype)
            W = torch.randn(512, 3000, generator=gen).to(dtype)
            full = x @ W
            direct = all(torch.equal(x @ W[:, s:e], full[:, s:e]) for s, e in chunk_bounds(3000, MIN_CHUNK))
            assert gemm_columns_exact(x, W, MIN_CHUNK) == direct, (dtype, B)
            assert gemm_columns_exact(x, W, 3000) is True  # one GEMM over the row: SAELens's own


@pytest.mark.parametrize("frozen", [True, False])
def test_lead_dimensions_torch_cannot_fold_take_saelens_gemm(frozen):
    """x (3, 1, 2, D) whose last two dimensions are transposed: torch's ``x @ W_enc`` folds the lead
    dimensions into one GEMM (a copy) when W_enc requires grad, and runs a batched GEMM, which rounds
    otherwise, when it does not (a frozen SAE); sparse_encode must take the same path."""
    x, W, b, thr = problem(torch.float32, B=6)
    x = x.reshape(3, 1, D, 2).mT  # strides (2D, 2D, 1, 2): no view folds the lead dimensions
    W.requires_grad_(not frozen)
    with torch.no_grad():
        dense = saelens_jumprelu(x, W, b, thr)
        assert_same_nonzeros(sparse_encode(x, W, b, threshold=thr), dense)
        assert_same_nonzeros(sparse_encode(x, W, b, threshold=thr, chunk=MIN_CHUNK, exact=True), dense)
        assert_same_nonzeros(sparse_encode(x, W, b, k=9, exact=True), saelens_topk(x, W, b, 9))


def test_non_finite_pre_activations_keep_saelens_results():
    x, W, b, thr = problem(torch.float32)
    x[0, 0] = float("nan")
    x[1, 0] = float("inf")
    x[2, :] = 0.0
    b[5], b[6] = float("inf"), float("-inf")
    thr[7] = float("nan")
    thr[8] = float("inf")
    b[8] = float("inf")  # inf > inf is False: SAELens gives relu(inf) * 0 = NaN
    for chunk in (MIN_CHUNK, None):
        assert_same_nonzeros(
            sparse_encode(x, W, b, threshold=thr, chunk=chunk, exact=True), saelens_jumprelu(x, W, b, thr)
        )
        assert_same_nonzeros(sparse_encode(x, W, b, chunk=chunk, exact=True), saelens_relu(x, W, b))


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("mode", ["relu", "jumprelu", "topk"])
def test_no_tensor_of_b_times_f_elements(mode):
    x, W, b, thr = problem(torch.float32, B=64)
    kw = {"jumprelu": {"threshold": thr}, "topk": {"k": 16}, "relu": {}}[mode]
    with LargestTensor() as seen:
        acts = sparse_encode(x, W, b, chunk=MIN_CHUNK, **kw)
    # a chunk of pre-activations (64 x 492 at most: the tail joins the chunk before it), W_enc's view
    assert seen.largest <= max(64 * (MIN_CHUNK * 2), W.numel(), acts.nnz * 2)
    assert seen.largest < 64 * F
    with LargestTensor() as dense:
        saelens_relu(x, W, b)
    assert dense.largest == 64 * F  # the check sees a dense (B, F) tensor when there is one


def test_chunk_bounds_and_default():
    assert chunk_bounds(1000, 256) == [(0, 256), (256, 512), (512, 1000)]
    assert chunk_bounds(1024, 256) == [(0, 256), (256, 512), (512, 768), (768, 1024)]
    assert chunk_bounds(100, 256) == [(0, 100)]
    assert default_chunk(1024, 65536) == 16384
    assert default_chunk(32, 65536) == 65536
    assert default_chunk(1 << 20, 65536) == MIN_CHUNK


def test_empty_batch_and_lead_shape():
    x, W, b, thr = problem(torch.float32)
    acts = sparse_encode(x[:0], W, b, threshold=thr)
    assert acts.shape == (0, F) and acts.nnz == 0
    acts = sparse_encode(x.reshape(13, 1, D), W, b, k=4)
    assert acts.lead_shape == (13, 1) and acts.to_dense().shape == (13, 1, F)


def test_encode_decode_round_trip_matches_dense():
    from conftest import assert_matches_dense

    x, W, b, thr = problem(torch.float32)
    W_dec = torch.randn(F, D, generator=torch.Generator().manual_seed(4)) / 8
    b_dec = torch.randn(D, generator=torch.Generator().manual_seed(5))
    acts = sparse_encode(x, W, b, threshold=thr)
    assert_matches_dense(sae_tune.sparse_decode(acts, W_dec, b_dec), acts.to_dense(), W_dec, b_dec)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, W, b, t: sparse_encode(x, W, b, threshold=t, k=3), ValueError, "not both"),
        (lambda x, W, b, t: sparse_encode(x, W, b, k=0), ValueError, r"k must be an int in \[1, 1500\]"),
        (lambda x, W, b, t: sparse_encode(x, W, b, k=F + 1), ValueError, "k must be an int"),
        (lambda x, W, b, t: sparse_encode(x, W, b, chunk=64), ValueError, "chunk must be an int >= 256"),
        (lambda x, W, b, t: sparse_encode(x[:, :5], W, b), ValueError, r"x must have shape \(\.\.\., 96\)"),
        (lambda x, W, b, t: sparse_encode(x, W, b[:5]), ValueError, r"b_enc must have shape \(1500,\)"),
        (lambda x, W, b, t: sparse_encode(x, W, b, threshold=t[:4]), ValueError, "threshold must have shape"),
        (lambda x, W, b, t: sparse_encode(x.double(), W, b), TypeError, "must have one dtype"),
        (lambda x, W, b, t: sparse_encode(x, W.T, b), ValueError, "x must have shape"),
        (lambda x, W, b, t: sparse_encode(x, W, b, threshold="high"), TypeError, "threshold must be"),
        (lambda x, W, b, t: sparse_encode(x.long(), W, b), TypeError, "x must have a floating dtype"),
        (lambda x, W, b, t: sparse_encode(x, W, b, exact="yes"), TypeError, "exact must be a bool"),
    ],
)
def test_input_errors_name_the_argument(call, error, match):
    x, W, b, thr = problem(torch.float32)
    with pytest.raises(error, match=match):
        call(x, W, b, thr)


def test_refuses_inputs_that_require_grad():
    x, W, b, thr = problem(torch.float32)
    W.requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward; call it under torch.no_grad"):
        sparse_encode(x, W, b, threshold=thr)
    with torch.no_grad():
        assert sparse_encode(x, W, b, threshold=thr).nnz > 0


def test_topk_ties_at_the_kth_value_keep_the_features_torch_topk_keeps():
    """Features with identical pre-activations, spread over chunks, tied at the k-th largest value: the
    running top-k alone would keep whichever chunk came first; torch.topk on the row decides."""
    x, W, b, _ = problem(torch.float32)
    twins = [100, 101, 600, 601, 1200, 1201, 1400]
    W[:, twins] = W[:, 100:101]
    b[twins] = 6.0  # far above every other pre-activation: all seven are the top, tied
    for k in (3, 5):
        acts = sparse_encode(x, W, b, k=k, chunk=MIN_CHUNK, exact=True)
        assert (acts.row_counts() == k).all()
        assert_same_nonzeros(acts, saelens_topk(x, W, b, k))
