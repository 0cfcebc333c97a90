"""A seeded fuzz of sparse_encode against SAELens's own ``encode`` (JumpReLU, standard/ReLU, TopK): every
dtype, k over all of [1, F] (its ends weighted), NaN and infinite inputs, weights and thresholds, tied
features, strided and transposed inputs, lead dimensions, chunk sizes, ``exact=``. A few hundred cases in
the default tier, thousands behind ``slow``; a failure names its seed (rerun it alone with
``FUZZ_SEED=<seed>``)."""

import functools
import os
import random

import pytest
import torch
from conftest import DTYPES
from test_encode import assert_same_nonzeros, assert_within_gemm_rounding

from sae_tune import sparse_encode
from sae_tune.encode import MIN_CHUNK, chunk_bounds, gemm_columns_exact, gemm_input

sae_lens = pytest.importorskip("sae_lens")

ARCHS = ("jumprelu", "standard", "topk")


@functools.cache
def saelens_sae(arch: str, dtype: torch.dtype):
    """One SAELens SAE per architecture and dtype; each case puts its own weights in (building one per
    case would take most of the fuzz's time)."""
    name = str(dtype).removeprefix("torch.")
    if arch == "jumprelu":
        return sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=8, d_sae=8, dtype=name))
    if arch == "topk":
        return sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=8, d_sae=8, k=1, dtype=name))
    return sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=8, d_sae=8, dtype=name))


def poison(t: torch.Tensor, rng: random.Random, gen: torch.Generator) -> None:
    """Put NaN or +-inf at a few random places of ``t`` (in place)."""
    flat = t.view(-1)
    if flat.numel() == 0:
        return
    for _ in range(rng.choice([1, 1, 3])):
        flat[torch.randint(0, flat.numel(), (1,), generator=gen)] = rng.choice(
            [float("nan"), float("nan"), float("inf"), -float("inf")]
        )


def make_case(seed: int):
    """(description, SAELens's encode input, sparse_encode's kwargs, the SAE) for one seed."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    arch, dtype = rng.choice(ARCHS), rng.choice(DTYPES)
    F = rng.choice([1, 2, 255, 256, 257, 300, 511, 700, 1024, 1024, 1500, 2100, 2100, rng.randint(1, 2100)])
    D = rng.choice([1, 3, 16, 48])
    lead = rng.choice([(), (0,), (1,), (5,), (2, 3), (3, 1, 2)])
    lead = lead or (rng.randint(1, 12),)
    x = torch.randn(*lead, D, generator=gen)
    W = torch.randn(D, F, generator=gen) / D**0.5
    b = torch.randn(F, generator=gen) / 2 - rng.choice([0.0, 0.5, 1.5])
    thr = torch.rand(F, generator=gen) * rng.choice([0.1, 1.0]) - rng.choice([0.0, 0.2])
    tie = rng.random() < 0.25
    if tie:  # tied features: copies of one column and bias over the row (ties at the k-th value)
        cols = torch.randint(0, F, (max(1, F // rng.choice([2, 5, 50])),), generator=gen)
        W[:, cols] = W[:, :1].clone()
        b[cols] = float(b[0])
    if rng.random() < 0.2:  # coarse values: ties everywhere
        x, W, b = x.round(), (W * 2).round() / 2, b.round()
    nonfinite = rng.random() < 0.35
    if nonfinite:  # a NaN in x makes its token's row NaN (TopK then keeps k of F NaNs)
        poison(rng.choice([x, x, x, W, b, thr]), rng, gen)
    x, W, b, thr = x.to(dtype), W.to(dtype), b.to(dtype), thr.to(dtype)
    if rng.random() < 0.3:  # W_enc stored transposed (a view of (F, D))
        W = W.T.contiguous().T
    if rng.random() < 0.3 and x.dim() >= 2:  # x strided: every other token of a wider batch, or transposed
        x = (
            torch.stack([x, x], dim=-2).flatten(-3, -2)[..., ::2, :]
            if rng.random() < 0.5
            else x.mT.contiguous().mT
        )
    k = None
    if arch == "topk":
        k = rng.choice([1, 2, F, F - 1, F - 2, rng.randint(1, F), rng.randint(1, min(F, 64))])
        k = min(max(k, 1), F)
    chunk = rng.choice([None, MIN_CHUNK, MIN_CHUNK, 512, rng.randint(MIN_CHUNK, 3000)])
    exact = rng.random() < 0.3
    sae = saelens_sae(arch, dtype)
    grad = rng.random() < 0.5  # an SAE's parameters require grad unless frozen: torch's GEMM path differs
    with torch.no_grad():
        sae.W_enc = torch.nn.Parameter(W, requires_grad=grad)
        sae.b_enc = torch.nn.Parameter(b, requires_grad=grad)
        sae.b_dec = torch.nn.Parameter(torch.zeros(D, dtype=dtype), requires_grad=False)
        if arch == "jumprelu":
            sae.threshold = torch.nn.Parameter(thr, requires_grad=False)
        if arch == "topk":
            sae.activation_fn.k = k
    W, b = sae.W_enc, sae.b_enc  # sparse_encode takes the SAE's own parameters
    kwargs = {"chunk": chunk, "exact": exact}
    if arch == "jumprelu":
        kwargs["threshold"] = thr
    if arch == "topk":
        kwargs["k"] = k
    desc = (
        f"seed={seed} {arch} {dtype} F={F} D={D} lead={tuple(x.shape[:-1])} k={k} chunk={chunk} "
        f"exact={exact} ties={tie} nonfinite={nonfinite} x strides={x.stride()} W strides={W.stride()} "
        f"requires_grad={grad}"
    )
    return desc, x, W, b, kwargs, sae


def check_case(seed: int) -> None:
    desc = f"seed={seed} (building the case)"
    try:
        desc, x, W, b, kwargs, sae = make_case(seed)
        with torch.no_grad():
            dense = sae.encode(x)
            acts = sparse_encode(x, W, b, **kwargs)
        assert acts.shape == dense.shape and acts.values.dtype == dense.dtype
        chunk, F = kwargs["chunk"], W.shape[1]
        one_gemm = chunk is None or len(chunk_bounds(F, min(chunk, F) or 1)) == 1
        if kwargs["exact"] or one_gemm or gemm_columns_exact(gemm_input(x, W), W, chunk):
            assert_same_nonzeros(acts, dense)
        else:  # this BLAS rounds a column slice otherwise: the weaker promise
            thr = kwargs.get("threshold")
            assert_within_gemm_rounding(acts, dense, x, W, b, thr=thr, k=kwargs.get("k"))
    except Exception as exc:
        raise AssertionError(f"fuzz case failed: {desc}: {exc}") from exc


def run(seeds) -> None:
    failed = []
    for seed in seeds:
        try:
            check_case(seed)
        except AssertionError as exc:
            failed.append(str(exc))
            print(exc)
    assert not failed, f"{len(failed)} fuzz cases failed, first: {failed[0]}"


@pytest.mark.parametrize("block", range(4))
def test_fuzz_sparse_encode_against_saelens(block):
    """300 cases in 4 blocks (a block's seeds are fixed: a failure reproduces)."""
    one = os.environ.get("FUZZ_SEED")
    run([int(one)] if one else range(block * 75, (block + 1) * 75))


@pytest.mark.slow
@pytest.mark.parametrize("block", range(10))
def test_fuzz_sparse_encode_against_saelens_wide(block):
    run(range(10_000 + block * 400, 10_000 + (block + 1) * 400))
