"""The CPU target's encode (torch GEMM per chunk + the C threshold and compaction): bit for bit the result
of ``sae_tune.sparse_encode`` with the same chunk size, whose non-zeros are SAELens's (tests/test_encode.py
checks those against SAELens's dense expression)."""

from __future__ import annotations

import importlib
import json
import warnings

import pytest
import torch
from conftest import DTYPES

import sae_tune
from sae_tune.targets.base import ConfigFieldError, EncodeProblem, EncodeRequest
from sae_tune.targets.cpu.target import ENCODE_IMPL, CpuTarget

ce = importlib.import_module("sae_tune.targets.cpu.encode")
launch = importlib.import_module("sae_tune.targets.cpu.launch")
encode_module = importlib.import_module("sae_tune.encode")

TARGET = CpuTarget()
if TARGET.available(torch.device("cpu")) is not None:  # these tests are about the C target
    pytest.fail(
        f"the CPU target needs a C compiler here: {TARGET.available(torch.device('cpu'))}", pytrace=False
    )


def _sae(B, D, F, dtype, seed=0, bias=True):
    """x (B, D), W_enc (D, F), b_enc and a threshold with negative entries (they clamp to 0)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen)
    W = torch.randn(D, F, generator=gen) / D**0.5
    b = torch.randn(F, generator=gen) * 0.3 if bias else None
    thr = torch.randn(F, generator=gen) * 0.8  # about 16% of the features below -0.8
    return x.to(dtype), W.to(dtype), None if b is None else b.to(dtype), thr.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _assert_same(result, ref: sae_tune.SparseActs) -> None:
    offsets, indices, values = result
    assert offsets.dtype == indices.dtype == torch.int64
    assert values.dtype == ref.values.dtype
    assert torch.equal(offsets, ref.offsets)
    assert torch.equal(indices, ref.indices)
    assert torch.equal(_bits(values), _bits(ref.values))  # NaN payloads included


def _encode(x, W, b, thr, chunk, threads=0):
    return TARGET.encode(ENCODE_IMPL, {"chunk": chunk, "threads": threads}, EncodeProblem(x, W, b, thr, None))


# --- bit for bit against sparse_encode -------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
@pytest.mark.parametrize("B", [1, 7, 64])
@pytest.mark.parametrize("F,chunks", [(256, (256, 1024)), (1000, (256, 512)), (4096, (1024, 4096, 8192))])
def test_matches_sparse_encode(activation, B, F, chunks, dtype):
    x, W, b, thr = _sae(B, 40, F, dtype, seed=B + F)
    thr = thr if activation == "jumprelu" else None
    for chunk in chunks:
        ref = sae_tune.sparse_encode(x, W, b, threshold=thr, chunk=chunk)
        assert ref.nnz > 0
        _assert_same(_encode(x, W, b, thr, chunk), ref)


def test_without_bias_and_with_a_strided_W(dtype):
    x, W, _, thr = _sae(9, 33, 700, dtype, seed=3, bias=False)
    W_t = W.t().contiguous().t()  # column-major W_enc: the GEMM takes its slices as they are
    for t in (None, thr):
        ref = sae_tune.sparse_encode(x, W_t, None, threshold=t, chunk=256)
        _assert_same(_encode(x, W_t, None, t, 256), ref)


@pytest.mark.parametrize("lead", [(2, 3), (4, 1, 5), (6,)])
def test_lead_shapes_flatten_like_sparse_encode(lead):
    x, W, b, thr = _sae(1, 24, 600, torch.float32, seed=5)
    x = torch.randn(*lead, 24, generator=torch.Generator().manual_seed(1))
    ref = sae_tune.sparse_encode(x, W, b, threshold=thr, chunk=256)
    assert ref.lead_shape == lead
    _assert_same(_encode(x.reshape(-1, 24), W, b, thr, 256), ref)


def test_empty_tokens_and_empty_problems(dtype):
    x, W, b, thr = _sae(6, 16, 512, dtype, seed=6)
    x[1] = 0
    x[4] = 0
    b = -b.abs() - 0.1  # a zero token's pre-activations are all negative: it fires nothing
    ref = sae_tune.sparse_encode(x, W, b, threshold=thr, chunk=256)
    counts = ref.offsets.diff()
    assert counts[1] == counts[4] == 0 and counts.sum() > 0
    _assert_same(_encode(x, W, b, thr, 256), ref)
    for B, F in ((0, 512), (6, 0)):
        xs, Ws = torch.zeros(B, 16, dtype=dtype), torch.zeros(16, F, dtype=dtype)
        offsets, indices, values = _encode(xs, Ws, None, None, 256)
        assert offsets.tolist() == [0] * (B + 1) and indices.numel() == values.numel() == 0
        assert values.dtype == dtype


def test_every_feature_fires_takes_the_exact_second_pass(dtype, monkeypatch):
    """All B x F fire: more pairs than the scan's first slots, so the C write pass runs at exact offsets."""
    x, W, b, _ = _sae(64, 16, 2048, dtype, seed=7)
    b = torch.full_like(b, 1e3)
    thr = torch.full((2048,), -5.0, dtype=dtype)
    kernel = ce.build(dtype)
    calls = []
    real = kernel.entries["sae_tune_encode_write"]
    monkeypatch.setitem(kernel.entries, "sae_tune_encode_write", lambda *a: calls.append(1) or real(*a))
    for t in (None, thr):
        ref = sae_tune.sparse_encode(x, W, b, threshold=t, chunk=512)
        assert ref.nnz == 64 * 2048
        _assert_same(_encode(x, W, b, t, 512), ref)
    assert calls  # the first chunk's slots (1/8 of its size) were too few


def test_too_few_slots_in_some_chunks_and_threads_do_not_change_the_result(monkeypatch):
    """Force the scan to run out of slots in the first chunk of every call (and in a thread's share when one
    token is dense); any thread count gives the same CSR."""
    x, W, b, thr = _sae(37, 20, 3000, torch.float32, seed=8)
    x[5] = x[5] * 40  # one dense token
    ref = sae_tune.sparse_encode(x, W, b, threshold=thr, chunk=512)
    for first, least in ((1e-9, 1), (1 / 16, 4096)):
        monkeypatch.setattr(ce, "_FIRST_DENSITY", first)
        monkeypatch.setattr(ce, "_MIN_SLOTS", least)
        for threads in (1, 2, 3, 8):
            _assert_same(_encode(x, W, b, thr, 512, threads), ref)


def test_threshold_equal_to_pre_does_not_fire_and_nan_threshold_never_fires(dtype):
    """pre > max(thr, 0), strict, compared in fp32 exactly as torch compares the dtype."""
    x, W, b, thr = _sae(3, 24, 512, dtype, seed=9)
    pre = (x @ W + b)[0]  # the same GEMM numbers as a chunk's (sparse_encode's docstring)
    thr = torch.where(pre > 0, pre, thr)  # token 0 sits exactly on every positive threshold
    thr[7] = float("nan")
    thr[8] = -float("inf")
    ref = sae_tune.sparse_encode(x, W, b, threshold=thr, chunk=256)
    assert ref.offsets[1] == 0  # token 0 fires nothing
    _assert_same(_encode(x, W, b, thr, 256), ref)


@pytest.mark.parametrize("activation", ["relu", "jumprelu"])
def test_nan_and_inf_chunks_take_saelens_expression(activation, dtype, monkeypatch):
    """A chunk with a NaN or infinite pre-activation takes SAELens's torch expression (its NaN products
    included); the finite chunks stay in C."""
    B, F = 5, 1024
    x, W, b, thr = _sae(B, 16, F, dtype, seed=10)
    b[3] = float("nan")  # chunk 0: a NaN feature
    b[300] = float("inf")  # chunk 1: +inf: fires (relu(inf) * (inf > thr))
    thr[300] = float("inf")  # ... except as NaN where inf > inf is false: inf * 0
    b[301] = -float("inf")  # -inf never fires
    W[:, 600] = 0
    W[0, 600] = float("inf")  # chunk 2: +inf for token 0, -inf for token 1
    x[0, 0], x[1, 0] = 1.0, -1.0
    thr = thr if activation == "jumprelu" else None
    calls = []
    real = encode_module._threshold_chunk
    monkeypatch.setattr(encode_module, "_threshold_chunk", lambda *a: calls.append(1) or real(*a))
    ref = sae_tune.sparse_encode(x, W, b, threshold=thr, chunk=256)
    assert bool(ref.values.isnan().any()) and bool(ref.values.isinf().any())
    calls.clear()
    _assert_same(_encode(x, W, b, thr, 256), ref)
    assert len(calls) == 3  # chunks 0, 1, 2; chunk 3 (768:1024) is finite: the C kernel's


# --- building: the artefact is checked ------------------------------------------------------------------


@pytest.fixture
def kernel_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_TUNE_KERNEL_DIR", str(tmp_path / "kernels"))
    launch.forget_built()
    ce.forget_built()
    yield tmp_path / "kernels" / "c"
    launch.forget_built()
    ce.forget_built()


def test_tampered_encode_artefact_is_rebuilt_never_loaded(kernel_dir):
    ce.build(torch.float32)
    (manifest,) = [p for p in kernel_dir.glob("*.json") if not p.name.startswith("probe-")]
    (so,) = kernel_dir.glob("*.so")
    assert json.loads(manifest.read_text())["key"] == manifest.stem
    assert (kernel_dir / f"{manifest.stem}.c").read_text() == ce.render_encode(torch.float32)
    launch.forget_built()
    ce.forget_built()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ce.build(torch.float32)  # the verified copy from disk: no warning
    # plant the bf16 kernels (valid code, other value size) under the fp32 kernels' name
    ce.forget_built()
    ce.build(torch.bfloat16)
    (other,) = [p for p in kernel_dir.glob("*.so") if p != so]
    so.write_bytes(other.read_bytes())
    launch.forget_built()
    ce.forget_built()
    with pytest.warns(RuntimeWarning, match="does not match its manifest"):
        kernel = ce.build(torch.float32)
    assert kernel.name == "encode-compact|f32"
    x, W, b, thr = _sae(7, 16, 600, torch.float32, seed=11)
    _assert_same(_encode(x, W, b, thr, 256), sae_tune.sparse_encode(x, W, b, threshold=thr, chunk=256))


def test_render_is_readable_c_for_each_dtype():
    for dtype, kind in zip(DTYPES, ("f32", "f16", "bf16"), strict=True):
        src = ce.render_encode(dtype)
        assert f"encode-compact|{kind}" in src and "int32_t sae_tune_encode_scan(" in src
        assert "sae_tune_encode_assemble(" in src and "{{" not in src
    with pytest.raises(TypeError, match="float64"):
        ce.render_encode(torch.float64)


# --- the encode contract ---------------------------------------------------------------------------------


def _request(activation="jumprelu", dtype=torch.float32, device="cpu", B=1024, F=65536, k=None):
    return EncodeRequest(B, F, 2304, dtype, torch.device(device), activation, k)


@pytest.mark.parametrize(
    "config,field",
    [
        ({"chunk": 100}, "chunk"),
        ({"chunk": 1000}, "chunk"),
        ({"chunk": True}, "chunk"),
        ({"chunk": "4096"}, "chunk"),
        ({"chunk": 1 << 30}, "chunk"),
        ({"threads": -1}, "threads"),
        ({"threads": 2.0}, "threads"),
        ({"chunk": 4096, "bogus": 1}, "bogus"),
    ],
)
def test_invalid_config_names_the_field(config, field):
    with pytest.raises(ConfigFieldError) as info:
        TARGET.encode_parse(ENCODE_IMPL, config)
    assert info.value.field == field
    reason = TARGET.encode_gate(ENCODE_IMPL, config, _request())
    assert reason is not None and field in reason
    x, W, b, thr = _sae(2, 8, 300, torch.float32)
    with pytest.raises(ConfigFieldError):
        TARGET.encode(ENCODE_IMPL, config, EncodeProblem(x, W, b, thr, None))


def test_parse_label_and_unknown_impl():
    assert TARGET.encode_impls == (ENCODE_IMPL,)
    assert TARGET.encode_parse(ENCODE_IMPL, {}) == {"chunk": 16384, "threads": 0}
    assert TARGET.encode_parse(ENCODE_IMPL, {"chunk": 512, "threads": 1}) == {"chunk": 512, "threads": 1}
    assert TARGET.encode_label(ENCODE_IMPL, {"chunk": 512}) == "cpu[c-encode-c512-thall]"
    with pytest.raises(ValueError, match="no encode impl 'cpu'"):
        TARGET.encode_parse("cpu", {})
    with pytest.raises(ConfigFieldError, match="mapping"):
        TARGET.encode_parse(ENCODE_IMPL, [("chunk", 512)])


def test_space_and_gate():
    space = TARGET.encode_space(_request())
    chunks = [c["chunk"] for _, c in space]
    assert {impl for impl, _ in space} == {ENCODE_IMPL}
    assert chunks[0] == 16384 and len(set(chunks)) == len(chunks) >= 3  # sparse_encode's default first
    assert all(TARGET.encode_gate(ENCODE_IMPL, c, _request()) is None for _, c in space)
    assert [c["chunk"] for _, c in TARGET.encode_space(_request(B=1, F=300))] == [512, 256]
    assert TARGET.encode_space(_request("relu", torch.bfloat16, B=7, F=4096))[0][1]["chunk"] == 4096
    assert TARGET.encode_space(_request("topk", k=64)) == []
    assert TARGET.encode_space(_request(dtype=torch.float64)) == []
    assert TARGET.encode_space(_request(device="meta")) == []
    assert "'topk'" in TARGET.encode_gate(ENCODE_IMPL, {}, _request("topk", k=64))
    assert "float64" in TARGET.encode_gate(ENCODE_IMPL, {}, _request(dtype=torch.float64))
    assert "meta" in TARGET.encode_gate(ENCODE_IMPL, {}, _request(device="meta"))


def test_no_compiler_leaves_the_space_empty(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent")
    assert TARGET.encode_space(_request()) == []
    assert "/nonexistent" in TARGET.encode_gate(ENCODE_IMPL, {}, _request())


def test_problem_mistakes_are_named():
    x, W, b, thr = _sae(2, 8, 300, torch.float32)
    with pytest.raises(ValueError, match="TopK"):
        TARGET.encode(ENCODE_IMPL, {}, EncodeProblem(x, W, b, None, 5))
    with pytest.raises(TypeError, match="float64"):
        TARGET.encode(ENCODE_IMPL, {}, EncodeProblem(x.double(), W.double(), None, None, None))
    with pytest.raises(TypeError, match="b_enc is torch.float16"):
        TARGET.encode(ENCODE_IMPL, {}, EncodeProblem(x, W, b.half(), None, None))
    with pytest.raises(ValueError, match="meta"):
        TARGET.encode(ENCODE_IMPL, {}, EncodeProblem(x.to("meta"), W.to("meta"), None, None, None))
