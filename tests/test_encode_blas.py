"""sparse_encode on a BLAS whose GEMM of a column slice rounds otherwise than the full GEMM's columns (an
Intel machine's MKL; MKL_CBWR=COMPATIBLE here): the probe finds it, ``exact=True`` stays SAELens's bit for
bit, and without it every difference lies within the GEMM's rounding."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import DTYPES
from test_encode import (
    assert_same_nonzeros,
    assert_within_gemm_rounding,
    problem,
    saelens_jumprelu,
    saelens_relu,
    saelens_topk,
)

import sae_tune.encode
from sae_tune import sparse_encode
from sae_tune.encode import MIN_CHUNK, gemm_columns_exact


def split_k(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A BLAS that sums the two halves of D apart for every GEMM narrower than the SAE (1500 features):
    column slices round otherwise than the full GEMM's columns."""
    if w.shape[1] == 1500:
        return torch.matmul(x, w)
    h = x.shape[1] // 2
    return torch.matmul(x[:, :h], w[:h]) + torch.matmul(x[:, h:], w[h:])


@pytest.fixture
def other_blas(monkeypatch):
    monkeypatch.setattr(sae_tune.encode, "_gemm", split_k)
    yield
    sae_tune.encode.forget_column_checks()


@pytest.mark.parametrize("dtype", DTYPES)
def test_probe_finds_a_blas_whose_column_slices_round_otherwise(other_blas, dtype):
    x, W, _, _ = problem(dtype)
    assert gemm_columns_exact(x, W, MIN_CHUNK) is False
    assert gemm_columns_exact(x, W, 1500) is True  # the whole row is SAELens's own GEMM
    assert gemm_columns_exact(x, W, 4096) is True


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_is_saelens_bitwise_on_such_a_blas(other_blas, dtype):
    x, W, b, thr = problem(dtype, B=16)
    for chunk in (MIN_CHUNK, 512):
        acts = sparse_encode(x, W, b, threshold=thr, chunk=chunk, exact=True)
        assert_same_nonzeros(acts, saelens_jumprelu(x, W, b, thr))
    assert_same_nonzeros(sparse_encode(x, W, b, chunk=MIN_CHUNK, exact=True), saelens_relu(x, W, b))
    for k in (1, 1499):
        assert_same_nonzeros(
            sparse_encode(x, W, b, k=k, chunk=MIN_CHUNK, exact=True), saelens_topk(x, W, b, k)
        )
    # the simulated BLAS bites: without exact=True the chunked values are not SAELens's bits
    loose = sparse_encode(x, W, b, chunk=MIN_CHUNK)
    assert not torch.equal(loose.to_dense(), saelens_relu(x, W, b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_exact_differences_lie_within_gemm_rounding(other_blas, dtype):
    x, W, b, thr = problem(dtype, B=32)
    b = b + 1.0  # about half the pre-activations above zero: many features near the edges
    thr = thr / 4
    acts = sparse_encode(x, W, b, threshold=thr, chunk=MIN_CHUNK)
    assert_within_gemm_rounding(acts, saelens_jumprelu(x, W, b, thr), x, W, b, thr=thr)
    acts = sparse_encode(x, W, b, chunk=MIN_CHUNK)
    assert_within_gemm_rounding(acts, saelens_relu(x, W, b), x, W, b)
    for k in (1, 1400):
        acts = sparse_encode(x, W, b, k=k, chunk=MIN_CHUNK)
        assert_within_gemm_rounding(acts, saelens_topk(x, W, b, k), x, W, b, k=k)


def test_the_rounding_check_catches_a_feature_far_from_the_threshold():
    """The weaker promise's check is not vacuous: a feature dropped far above the threshold fails it."""
    x, W, b, thr = problem(torch.float32)
    acts = sparse_encode(x, W, b, threshold=thr)
    dense = saelens_jumprelu(x, W, b, thr)
    wrong = dense.clone()
    row, col = (dense > thr + 0.5).nonzero()[0]
    wrong[row, col] = 0
    with pytest.raises(AssertionError, match="far from the threshold"):
        assert_within_gemm_rounding(acts, wrong, x, W, b, thr=thr)


SCRIPT = textwrap.dedent(
    """
    import torch
    from test_encode import assert_same_nonzeros, assert_within_gemm_rounding, saelens_jumprelu, saelens_topk
    from sae_tune import sparse_encode
    from sae_tune.encode import gemm_columns_exact
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(8, 512, generator=gen)
    W = torch.randn(512, 3000, generator=gen) / 512**0.5
    b, thr = torch.randn(3000, generator=gen) / 4, torch.rand(3000, generator=gen) / 2
    print("columns exact:", gemm_columns_exact(x, W, 256))
    ref = saelens_jumprelu(x, W, b, thr)
    assert_within_gemm_rounding(sparse_encode(x, W, b, threshold=thr, chunk=256), ref, x, W, b, thr=thr)
    assert_same_nonzeros(sparse_encode(x, W, b, threshold=thr, chunk=256, exact=True), ref)
    assert_same_nonzeros(sparse_encode(x, W, b, k=30, chunk=256, exact=True), saelens_topk(x, W, b, 30))
    print("ok")
    """
)


@pytest.mark.slow  # a fresh interpreter importing torch: about 10 s on this project's 2-core machine
def test_a_real_blas_whose_thread_split_rounds_columns_otherwise():
    """MKL with MKL_CBWR=COMPATIBLE on 2 threads splits a 3000-wide GEMM's columns at 1500 and rounds the
    last columns of the first half with another kernel (this project's machine). Whatever this BLAS does,
    the promise holds: exact=True bitwise, else within rounding."""
    env = dict(os.environ, MKL_CBWR="COMPATIBLE", OMP_NUM_THREADS="2")
    tests = os.path.dirname(__file__)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300, cwd=tests
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.strip().endswith("ok")
