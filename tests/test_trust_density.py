"""A winner verified on a sparse batch is not trusted on a denser one when its error grows with the
non-zeros per token: the library COO path accumulates 16-bit inputs in fp32, and a path that may not
(``half_accumulation``) is trusted only up to the per-token L0 it was verified at."""

import warnings

import pytest
import torch
from conftest import assert_matches_dense

from sae_tune import explain, sparse_decode
from sae_tune.autotune.verify import Reference, check
from sae_tune.cache.store import CacheKey, Provenance, WinnerRecord
from sae_tune.device import describe_device
from sae_tune.dispatch import Dispatcher, DispatchWarning, reload, set_dispatcher
from sae_tune.targets import templates_hash
from sae_tune.targets.library import paths
from sae_tune.targets.library.paths import TORCH_PATHS, TorchPath

F, D, B = 512, 16, 8
HALF = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _isolated(isolated_dispatch):
    yield
    reload()


def use_winner(impl, dtype, batch=B):
    key = CacheKey.for_device(
        describe_device(torch.device("cpu")),
        template_hash=templates_hash(),
        dtype=str(dtype).removeprefix("torch."),
        F=F,
        D=D,
        batch_size=batch,
        mean_l0=4,
    )
    record = WinnerRecord(key, impl, {}, 1.0, 10.0, Provenance.current())
    set_dispatcher(Dispatcher(local_records=[record], shipped_records=[]))


def batch(n, l0, dtype, seed):
    """Positive activations (the partial sums of a 16-bit accumulation grow, so its error shows)."""
    gen = torch.Generator().manual_seed(seed)
    acts = torch.zeros(n, F, dtype=torch.float64)
    for t in range(n):
        k = l0[t] if isinstance(l0, list) else l0
        acts[t, torch.randperm(F, generator=gen)[:k]] = (
            torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
        )
    return acts.to(dtype)


def within_own_tolerance(out, acts, W):
    """sae-tune's verification tolerance (it allows a few ulps of a 16-bit accumulator per term)."""
    assert check(out, Reference.of(acts, W), W.dtype).ok


def weights(dtype):
    return (torch.rand(F, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64) / 4).to(dtype)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_sparse_coo_winner_is_right_on_a_dense_batch_after_a_sparse_one(dtype):
    use_winner("sparse_coo", dtype)
    W = weights(dtype)
    sparse, dense = batch(B, 4, dtype, seed=2), batch(B, F, dtype, seed=3)
    assert_matches_dense(sparse_decode(sparse, W), sparse, W)
    assert explain(sparse, W).implementation == "sparse_coo"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DispatchWarning)
        out = sparse_decode(dense, W)  # accumulated in the input dtype: up to 0.76 of the scale off
    assert_matches_dense(out, dense, W)
    assert explain(dense, W).implementation == "sparse_coo"


def _coo_in_input_dtype(acts, W_dec, b_dec=None):
    """What torch's COO ``sparse.mm`` does on CPU with 16-bit inputs: accumulate in that dtype."""
    out = torch.sparse.mm(acts.to_sparse(), W_dec)
    return out if b_dec is None else out + b_dec


@pytest.fixture
def drifting_coo(monkeypatch):
    """sparse_coo replaced by a 16-bit accumulation, declared as such."""
    path = TorchPath(
        "sparse_coo", _coo_in_input_dtype, half_accumulation=True, _supports=paths._coo_supported
    )
    monkeypatch.setitem(TORCH_PATHS, "sparse_coo", path)
    return path


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_a_drifting_path_is_verified_again_on_a_denser_batch(drifting_coo, dtype):
    use_winner("sparse_coo", dtype)
    W = weights(dtype)
    sparse, dense = batch(B, 4, dtype, seed=2), batch(B, F, dtype, seed=3)
    within_own_tolerance(sparse_decode(sparse, W), sparse, W)
    within_own_tolerance(sparse_decode(sparse, W), sparse, W)  # settled on it
    assert explain(sparse, W).implementation == "sparse_coo"
    with pytest.warns(DispatchWarning, match="not using sparse_coo .* wrong result"):
        out = sparse_decode(dense, W)
    assert_matches_dense(out, dense, W)
    assert explain(dense, W).implementation != "sparse_coo"
    assert_matches_dense(sparse_decode(sparse, W), sparse, W)


def test_a_drifting_path_is_checked_on_the_densest_tokens_and_trusted_up_to_their_l0(monkeypatch):
    dtype, n = torch.bfloat16, 96  # more tokens than one verification checks
    use_winner("sparse_coo", dtype, batch=128)
    W = weights(dtype)
    calls = []

    def counting(acts, W_dec, b_dec=None):
        calls.append(acts.shape[0])
        return _coo_in_input_dtype(acts, W_dec, b_dec)

    path = TorchPath("sparse_coo", counting, half_accumulation=True, _supports=paths._coo_supported)
    monkeypatch.setitem(TORCH_PATHS, "sparse_coo", path)
    first = batch(n, [4] * 80 + [12] + [4] * 15, dtype, seed=4)
    within_own_tolerance(sparse_decode(first, W), first, W)
    assert len(calls) == 2  # verified (64 tokens, the densest among them), then run on the batch
    within_own_tolerance(sparse_decode(first.flip(0), W), first.flip(0), W)
    assert len(calls) == 3  # no denser than what was verified: trusted
    # one token far denser than any verified, past the first 64: verified again, on that token, and refused
    second = batch(n, [4] * 90 + [F] + [4] * 5, dtype, seed=5)
    with pytest.warns(DispatchWarning, match="not using sparse_coo"):
        out = sparse_decode(second, W)
    assert_matches_dense(out, second, W)
