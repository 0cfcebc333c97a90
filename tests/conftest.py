"""Test set-up: Triton's interpreter runs every kernel on CPU tensors; it must be chosen before triton
is first imported, so it is set here, before any test module imports sae_tune's kernels."""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("SAE_TUNE_KERNEL_DIR", tempfile.mkdtemp(prefix="sae-tune-kernels-"))
# Dispatch (sparse_decode without a variant, SAELens decoders) reads the tuning cache: never the user's.
os.environ.setdefault(
    "SAE_TUNE_CACHE", os.path.join(tempfile.mkdtemp(prefix="sae-tune-cache-"), "cache.sqlite")
)

import pytest  # noqa: E402
import torch  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Relative tolerance against the sum of absolute products |acts| @ |W_dec| (+ |b_dec|): the kernels
# accumulate in fp32 and round once to the output dtype, so the error is about half an output ulp.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def assert_matches_dense(out: torch.Tensor, acts: torch.Tensor, W: torch.Tensor, b=None) -> None:
    """Compare with the dense product in fp64, scaled by the magnitude of the summed terms."""
    ref = acts.double() @ W.double()
    scale = acts.double().abs() @ W.double().abs()
    if b is not None:
        ref = ref + b.double()
        scale = scale + b.double().abs()
    expected_dtype = W.dtype if b is None else torch.promote_types(W.dtype, b.dtype)
    assert out.dtype == expected_dtype, (out.dtype, expected_dtype)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    # plus one subnormal step: results in the subnormal range round on an absolute grid
    tol = TOLERANCE[out.dtype] * scale + torch.finfo(out.dtype).tiny * torch.finfo(out.dtype).eps
    err = (out.double() - ref).abs()
    worst = (err - tol).max().item() if err.numel() else 0.0
    assert worst <= 0, f"max error {err.max().item():.3g} exceeds tolerance by {worst:.3g}"


def random_acts(
    B: int, F: int, l0: int | list[int], dtype: torch.dtype, seed: int = 0, signed: bool = True
) -> torch.Tensor:
    """(B, F) activations with exactly l0 (or l0[t]) non-zeros per token at random features."""
    gen = torch.Generator().manual_seed(seed)
    counts = [l0] * B if isinstance(l0, int) else list(l0)
    acts = torch.zeros(B, F, dtype=torch.float64)
    for t, k in enumerate(counts):
        idx = torch.randperm(F, generator=gen)[:k]
        vals = torch.rand(k, generator=gen, dtype=torch.float64) * 2 + 0.1
        if signed:
            vals = vals * torch.where(torch.rand(k, generator=gen) < 0.3, -1.0, 1.0).double()
        acts[t, idx] = vals
    return acts.to(dtype)


def random_weights(F: int, D: int, dtype: torch.dtype, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(F, D, generator=gen, dtype=torch.float64) / 8
    b = torch.randn(D, generator=gen, dtype=torch.float64)
    return W.to(dtype), b.to(dtype)


CPU_KEY_FIELDS = dict(
    device_name="Intel(R) Xeon(R) Processor",
    capability=None,
    torch_version="2.13.0+cpu",
    triton_version="3.9.0",
    template_hash="0123abcd",
    op="decode",
    dtype="float32",
    F=16384,
    D=2304,
    batch_bucket=32,
    l0_bucket=128,
)


def make_key(**over):
    """A valid cache key (CPU unless overridden)."""
    from sae_tune.cache.store import CacheKey

    return CacheKey(**{**CPU_KEY_FIELDS, **over})


@pytest.fixture
def isolated_dispatch(tmp_path, monkeypatch):
    """Dispatch from this test's own (absent) cache file and an empty shipped folder."""
    from sae_tune.dispatch import reload

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setenv("SAE_TUNE_CACHE", str(tmp_path / "cache.sqlite"))
    monkeypatch.setenv("SAE_TUNE_SHIPPED_DIR", str(shipped))
    reload()
    return shipped


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


def require(ok: bool, message: str) -> None:
    """Go on when ``ok``; otherwise a skip on a developer's machine and a failure in CI (``.ci/run``
    installs every tool a test needs, so a skip there would hide a missing install)."""
    if ok:
        return
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def require_tool(*names: str) -> str:
    """The path of the first of ``names`` on PATH (see ``require`` for when there is none)."""
    import shutil

    found = next((path for path in map(shutil.which, names) if path), None)
    require(found is not None, f"needs {' or '.join(names)} on PATH (.ci/run installs it)")
    return found
