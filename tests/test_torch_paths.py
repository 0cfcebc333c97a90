"""Every torch decode path against a float64 dense reference, per dtype, with the edge cases that bite."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sae_tune.autotune.workload import synthetic_acts
from sae_tune.specs import get_spec
from sae_tune.targets.library.paths import (
    TORCH_PATHS,
    UnsupportedPathError,
    chunked,
    dense,
    embedding_bag_topk,
    max_row_nnz,
    sparse_csr,
    would_truncate,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative to the magnitude of the terms summed (|acts| @ |W_dec| + |b_dec|). Dense BLAS and embedding_bag
# accumulate half inputs in fp32 (error ~ half an output ulp); COO sparse.mm accumulates in the input dtype,
# so its error grows with L0 and gets a looser bound.
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}
RTOL_HALF_ACCUMULATION = {**RTOL, torch.float16: 8e-3, torch.bfloat16: 5e-2}
HALF_ACCUMULATION = {"sparse_coo"}
SHAPES = [(1, 64, 16, 8), (7, 512, 48, 20), (33, 2048, 96, 40)]  # (B, F, D, mean L0)


def _build(name: str, acts: torch.Tensor, chunk: int | None = None):
    path = TORCH_PATHS[name]
    params = {"k": max(1, max_row_nnz(acts))} if "k" in path.params else {}
    return path.build(chunk=chunk, **params)


def _inputs(B: int, F: int, D: int, l0: int, dtype: torch.dtype, seed: int = 0):
    """Signed activations (a JumpReLU workload with random signs) with all-zero first and last rows."""
    g = torch.Generator().manual_seed(seed)
    acts = synthetic_acts((F, l0), B, seed=seed)
    acts = acts * (torch.randint(0, 2, acts.shape, generator=g) * 2 - 1)
    acts[0] = 0
    acts[-1] = 0
    W = torch.randn(F, D, generator=g)
    b = torch.randn(D, generator=g)
    return acts.to(dtype), W.to(dtype), b.to(dtype)


def _assert_matches_reference(out, acts, W, b, name: str = "dense"):
    ref = acts.double() @ W.double()
    scale = acts.double().abs() @ W.double().abs()
    if b is not None:
        ref = ref + b.double()
        scale = scale + b.double().abs()
    expected_dtype = (acts @ W + b).dtype if b is not None else (acts @ W).dtype
    assert out.dtype == expected_dtype
    assert out.shape == ref.shape
    err = (out.double() - ref).abs()
    rtol = (RTOL_HALF_ACCUMULATION if name in HALF_ACCUMULATION else RTOL)[acts.dtype]
    bound = rtol * scale + 1e-6
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, f"error {worst:.2f}x the {acts.dtype} tolerance"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-F{}-D{}-L{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(TORCH_PATHS))
def test_path_matches_dense_fp64(name, dtype, shape):
    acts, W, b = _inputs(*shape, dtype)
    path = TORCH_PATHS[name]
    fn = _build(name, acts)
    if not path.supports(dtype):
        with pytest.raises(UnsupportedPathError, match=str(dtype)):
            fn(acts, W, b)
        return
    _assert_matches_reference(fn(acts, W, b), acts, W, b, name)
    _assert_matches_reference(fn(acts, W, None), acts, W, None, name)


def test_csr_half_support_is_reported_consistently():
    """On CPU torch has no half CSR matmul; the path must say so rather than silently converting W_dec."""
    for dtype in DTYPES:
        acts, W, b = _inputs(3, 64, 8, 4, dtype)
        try:
            sparse_csr(acts, W, b)
            ran = True
        except UnsupportedPathError:
            ran = False
        assert ran == TORCH_PATHS["sparse_csr"].supports(dtype)
    assert TORCH_PATHS["sparse_csr"].supports(torch.float32)


@pytest.mark.parametrize("name", sorted(TORCH_PATHS))
def test_bias_dtype_promotes_like_torch(name):
    acts, W, _ = _inputs(5, 256, 32, 10, torch.bfloat16)
    b32 = torch.randn(32)
    if not TORCH_PATHS[name].supports(torch.bfloat16):
        acts, W = acts.half(), W.half()
        if not TORCH_PATHS[name].supports(torch.float16):
            acts, W = acts.float(), W.float()
            b32 = b32.double()
    out = _build(name, acts)(acts, W, b32)
    assert out.dtype == (acts @ W + b32).dtype != acts.dtype
    _assert_matches_reference(out, acts, W, b32, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(TORCH_PATHS))
def test_empty_batch_and_all_zero_batch(name, dtype):
    if not TORCH_PATHS[name].supports(dtype):
        dtype = torch.float32
    W = torch.randn(128, 24, dtype=dtype)
    b = torch.randn(24, dtype=dtype)
    fn = TORCH_PATHS[name].build(**({"k": 4} if TORCH_PATHS[name].params else {}))
    empty = fn(torch.zeros(0, 128, dtype=dtype), W, b)
    assert empty.shape == (0, 24) and empty.dtype == dtype
    zeros = fn(torch.zeros(6, 128, dtype=dtype), W, b)
    assert torch.equal(zeros, b.expand(6, 24))
    assert torch.equal(fn(torch.zeros(6, 128, dtype=dtype), W, None), torch.zeros(6, 24, dtype=dtype))


@pytest.mark.parametrize("name", sorted(TORCH_PATHS))
def test_leading_dimensions_are_kept(name):
    acts, W, b = _inputs(12, 256, 16, 12, torch.float32)
    fn = _build(name, acts)
    out = fn(acts.reshape(3, 4, 256), W, b)
    assert out.shape == (3, 4, 16)
    torch.testing.assert_close(out.reshape(12, 16), dense(acts, W, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TORCH_PATHS))
def test_input_errors_are_raised_not_computed(name):
    fn = TORCH_PATHS[name].build(**({"k": 4} if TORCH_PATHS[name].params else {}))
    acts, W, b = _inputs(4, 64, 8, 4, torch.float32)
    with pytest.raises(TypeError, match="same dtype"):
        fn(acts.double(), W, b)
    with pytest.raises(ValueError, match="65 rows"):
        fn(acts, torch.randn(65, 8), b)
    with pytest.raises(ValueError, match="b_dec must have shape"):
        fn(acts, W, torch.randn(9))
    with pytest.raises(TypeError, match="floating dtype"):
        fn(acts.to(torch.int64), W.to(torch.int64), None)


# --- chunking -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 64])
@pytest.mark.parametrize("name", sorted(TORCH_PATHS))
def test_chunked_equals_unchunked(name, chunk):
    acts, W, b = _inputs(10, 512, 32, 16, torch.float32, seed=1)
    whole = _build(name, acts)(acts, W, b)
    parts = _build(name, acts, chunk=chunk)
    assert parts.__name__.endswith(f"[chunk={chunk}]")
    torch.testing.assert_close(parts(acts, W, b), whole, rtol=1e-5, atol=1e-5)
    assert parts(acts[:0], W, b).shape == (0, 32)


def test_chunk_and_k_must_be_positive_ints():
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError):
            chunked(dense, bad)
        with pytest.raises(ValueError):
            embedding_bag_topk(bad)


def test_build_checks_parameters():
    with pytest.raises(ValueError, match=r"missing \['k'\]"):
        TORCH_PATHS["embedding_bag_topk"].build()
    with pytest.raises(ValueError, match=r"unknown \['k'\]"):
        TORCH_PATHS["dense"].build(k=4)
    assert TORCH_PATHS["dense"].build() is dense
    assert TORCH_PATHS["embedding_bag_topk"].build(k=7).__name__ == "embedding_bag_topk[k=7]"


# --- truncation -----------------------------------------------------------------------------------------


def test_only_topk_can_truncate():
    assert {n for n, p in TORCH_PATHS.items() if p.can_truncate} == {"embedding_bag_topk"}
    assert all(p.name == n for n, p in TORCH_PATHS.items())


def test_topk_detects_tokens_above_k_and_decodes_them_exactly():
    W = torch.randn(32, 4, dtype=torch.float64)
    acts = torch.zeros(3, 32, dtype=torch.float64)
    acts[0, [1, 5, 9]] = torch.tensor([3.0, -0.5, 2.0], dtype=torch.float64)  # 3 non-zeros
    acts[1, [2, 4]] = torch.tensor([-4.0, 1.0], dtype=torch.float64)
    assert max_row_nnz(acts) == 3
    assert not would_truncate(acts, 3) and would_truncate(acts, 2)
    assert not would_truncate(torch.zeros(0, 32), 1) and max_row_nnz(torch.zeros(0, 32)) == 0

    torch.testing.assert_close(embedding_bag_topk(3)(acts, W), acts @ W)
    # k=2 is a broken promise for token 0: it is found and decoded exactly, not truncated to 2
    torch.testing.assert_close(embedding_bag_topk(2)(acts, W), acts @ W)
    torch.testing.assert_close(embedding_bag_topk(1)(acts, W), acts @ W)


def test_topk_larger_than_width_is_exact():
    acts, W, b = _inputs(4, 16, 8, 12, torch.float32)
    _assert_matches_reference(embedding_bag_topk(1000)(acts, W, b), acts, W, b)


# --- a real shape and random ones -------------------------------------------------------------------------


def test_paths_agree_on_a_gemma_scope_workload():
    spec = get_spec("gemma-2b-l20-16k")
    acts = synthetic_acts(spec, 8, seed=0)
    W = torch.randn(spec.width, 128) / spec.width**0.5
    b = torch.randn(128)
    for name in TORCH_PATHS:
        _assert_matches_reference(_build(name, acts)(acts, W, b), acts, W, b, name)


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(0, 9),
    F=st.integers(1, 300),
    D=st.integers(1, 20),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_densities_fp32(B, F, D, density, seed):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(B, F, generator=g) * (torch.rand(B, F, generator=g) < density)
    W = torch.randn(F, D, generator=g)
    b = torch.randn(D, generator=g)
    for name in TORCH_PATHS:
        _assert_matches_reference(_build(name, acts)(acts, W, b), acts, W, b, name)
