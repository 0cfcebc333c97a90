"""The C/OpenMP CPU target: variants, rendering, building (content-checked cache) and exact results.

Every result is compared with the fp64 dense product (conftest.assert_matches_dense); conversions to
bf16/fp16 are compared bit for bit with torch's own round-to-nearest-even.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import stat
import warnings
from pathlib import Path

import pytest
import torch
from conftest import DTYPES, assert_matches_dense, random_acts, random_weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_tune.targets import cpu

# the modules, not the same-named functions the package exports
cpu_build = importlib.import_module("sae_tune.targets.cpu.build")
launch = importlib.import_module("sae_tune.targets.cpu.launch")

if cpu.available("cpu") is not None:  # a machine without a C compiler is not what these tests are about
    pytest.fail(f"the CPU target needs a C compiler here: {cpu.available('cpu')}", pytrace=False)

V = cpu.CpuVariant
# one variant per structure choice: both families, every schedule, unroll 1..8, prefetch on/off, token
# tiles, tiles smaller and larger than the test shapes
VARIANTS = [
    V("twophase", 1, 256, 4, 8, 64, 0, "static"),
    V("twophase", 4, 16, 1, 0, 8, 2, "dynamic"),
    V("twophase", 2, 64, 8, 3, 32, 0, "guided"),
    V("fused", 1, 128, 2, 0, 16, 0, "guided"),
    V("fused", 4, 4096, 4, 0, 64, 1, "static"),
    V("fused", 1, 32, 1, 0, 8, 0, "dynamic"),
]
VIDS = [v.name for v in VARIANTS]
# (B, F, D, l0): first/last features, F and D not multiples of any tile, D=1, B=1, B=0
SHAPES = [(5, 300, 70, 12), (1, 1000, 257, 40), (3, 97, 1, 9), (0, 50, 20, 0)]


def _run(variant, acts, W, b=None):
    out_dtype = W.dtype if b is None else torch.promote_types(W.dtype, b.dtype)
    return cpu.run(variant, acts, W, b, out_dtype)


# --- variants --------------------------------------------------------------------------------------------


def test_variant_fields_are_validated_and_named():
    with pytest.raises(ValueError, match="family"):
        V(family="sparse")
    with pytest.raises(TypeError, match="d_tile"):
        V(d_tile=True)
    with pytest.raises(TypeError, match="unroll"):
        V(unroll=4.0)
    with pytest.raises(ValueError, match="d_tile.*power of two"):
        V(d_tile=100)
    with pytest.raises(ValueError, match="prefetch"):
        V(prefetch=99)
    with pytest.raises(ValueError, match="prefetch applies"):
        V(family="fused", prefetch=4)
    with pytest.raises(ValueError, match="schedule"):
        V(schedule='static); system("x"')
    with pytest.raises(ValueError, match="unknown CPU variant field.*bogus"):
        V.from_dict({"bogus": 1})
    with pytest.raises(TypeError, match="mapping"):
        V.from_dict([("family", "fused")])
    v = V("fused", 2, 512, 2, 0, 128, 1, "guided")
    assert V.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    assert not v.can_truncate and not v.host_sync
    assert v.name == "c-fused-t2-d512-u2-s128-th1-guided"


def test_search_space_is_large_distinct_and_default_is_in_it():
    space = cpu.search_space(65536, 2304, torch.float32)
    assert len(space) >= 100
    assert len({v.name for v in space}) == len(space)
    assert {v.family for v in space} == {"fused", "twophase"}
    assert {v.schedule for v in space} == {"static", "dynamic", "guided"}
    assert {v.threads for v in space} >= {0, 1}
    assert cpu.default_variant(65536, 2304, torch.float32) in space
    assert all(v.d_tile <= 16 for v in cpu.search_space(10, 3, torch.bfloat16))
    with pytest.raises(TypeError, match="dtype"):
        cpu.search_space(10, 3, torch.float64)


def test_render_refuses_a_tampered_variant_and_reads_as_c():
    v = V()
    object.__setattr__(v, "schedule", "static) num_threads(1")
    with pytest.raises(ValueError, match="schedule"):
        cpu.render(v, (torch.float32, None, torch.float32))
    src = cpu.render(V(), (torch.bfloat16, torch.float32, torch.float32))
    assert "int sae_tune_decode(" in src and "bf16" in src and "__builtin_prefetch" in src
    with pytest.raises(TypeError, match="output dtype must be torch.float32"):
        cpu.render(V(), (torch.bfloat16, torch.float32, torch.bfloat16))


# --- correctness -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS, ids=VIDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-F{}-D{}".format(*s[:3]))
def test_matches_dense(variant, shape, dtype):
    B, F, D, l0 = shape
    acts = random_acts(B, F, l0, dtype, seed=F + D)
    if B:
        acts[0, 0], acts[-1, F - 1] = 1.5, -0.75  # first and last feature
    W, b = random_weights(F, D, dtype)
    assert_matches_dense(_run(variant, acts, W, b), acts, W, b)
    assert_matches_dense(_run(variant, acts, W), acts, W)


@pytest.mark.parametrize("variant", VARIANTS[:4], ids=VIDS[:4])
def test_heavy_token_and_empty_rows(variant):
    F, D = 512, 96
    acts = random_acts(6, F, [3, F // 2, 0, 1, 5, F], torch.float32, seed=3)
    W, b = random_weights(F, D, torch.float32)
    assert_matches_dense(_run(variant, acts, W, b), acts, W, b)


@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[3]], ids=[VIDS[0], VIDS[3]])
def test_nan_and_inf_activations_propagate_like_dense(variant):
    F, D = 200, 40
    acts = random_acts(4, F, 10, torch.float32, seed=4)
    unfired = int((acts == 0).all(0).nonzero()[0])
    acts[1, 7], acts[2, 150], acts[3, unfired] = float("nan"), float("inf"), -0.0
    W, b = random_weights(F, D, torch.float32)
    W[unfired] = float("inf")  # only a -0.0 activation points here: a non-fired row is never read
    out = _run(variant, acts, W, b)
    W_read = W.clone()
    W_read[unfired] = 0.0
    ref = acts.double() @ W_read.double() + b.double()  # dense over the fired rows: NaN row 1, +-Inf row 2
    assert bool(ref[1].isnan().all()) and bool(ref[2].isinf().all()) and bool(ref[3].isfinite().all())
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert torch.equal(out[2].sign(), ref[2].sign().float())
    finite = ref.isfinite()
    assert torch.allclose(out.double()[finite], ref[finite], rtol=1e-5, atol=1e-5)


def _strided_cases(dtype):
    B, F, D = 5, 300, 70
    acts = random_acts(B, F, 11, dtype, seed=5)
    W, b = random_weights(F, D, dtype)
    return {
        "transposed acts": (acts.t().contiguous().t(), W, b),
        "transposed W": (acts, W.t().contiguous().t(), b),
        "column slices": (
            torch.cat([acts, acts], 1)[:, ::2],
            torch.stack([W, W], 2)[:, :, 1],
            torch.stack([b, b], 1)[:, 0],
        ),
        "row slices": (torch.cat([acts, acts])[::2], torch.stack([W, W], 1)[:, 0], b),
        "broadcast acts": (acts[:1].expand(B, F), W, b),
        "neg views": (torch._neg_view(acts), torch._neg_view(W), torch._neg_view(b)),
    }


@pytest.mark.parametrize(
    "case", ["transposed acts", "transposed W", "column slices", "row slices", "broadcast acts", "neg views"]
)
@pytest.mark.parametrize("variant", [VARIANTS[0], VARIANTS[5]], ids=[VIDS[0], VIDS[5]])
def test_any_strides_and_neg_views(variant, case):
    acts, W, b = _strided_cases(torch.bfloat16)[case]
    assert acts.is_neg() or not case.startswith("neg")
    expected = (acts.resolve_neg(), W.resolve_neg(), b.resolve_neg())
    assert_matches_dense(_run(variant, acts, W, b), *expected)


@pytest.mark.parametrize(
    "wdtype,bdtype",
    [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float32, torch.float16)],
)
def test_bias_of_another_dtype_promotes_like_dense(wdtype, bdtype):
    acts = random_acts(3, 100, 7, wdtype)
    W = random_weights(100, 33, wdtype)[0]
    b = random_weights(100, 33, bdtype, seed=2)[1]
    out = _run(VARIANTS[0], acts, W, b)
    assert out.dtype == torch.promote_types(wdtype, bdtype) == torch.float32
    assert_matches_dense(out, acts, W, b)


def test_int64_addressing_of_a_row_stride_past_2_pow_31():
    """A W_dec view whose row stride is 2**31 + 64 elements: only touched pages of the 4 GiB are real."""
    D, stride = 48, 2**31 + 64
    storage = torch.empty(stride + D, dtype=torch.bfloat16)
    W = storage.as_strided((2, D), (stride, 1))
    W.copy_(random_weights(2, D, torch.bfloat16)[0])
    acts = torch.tensor([[0.0, 1.5], [2.0, -1.0]], dtype=torch.bfloat16)
    for variant in (VARIANTS[0], VARIANTS[3]):
        assert_matches_dense(_run(variant, acts, W), acts, W)
    acts_storage = torch.empty(stride + 2, dtype=torch.bfloat16)
    far_acts = acts_storage.as_strided((2, 2), (stride, 1))
    far_acts.copy_(acts)
    assert_matches_dense(_run(VARIANTS[0], far_acts, W.contiguous()), acts, W)


def _exact_sums(dtype, n=4096, seed=0):
    """acts (n, 2) and W (2, 1) so that each out[t] = a0*w0 + a1*w1 is exact in fp32 (few mantissa bits)
    but needs rounding to ``dtype``: truncation and round-to-nearest-even differ on many of them."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(1, 64, (n, 2), generator=gen).double()
    a[:, 1] *= 2.0 ** -torch.randint(3, 9, (n,), generator=gen).double()
    acts = a.to(dtype)
    W = torch.tensor([[1.0], [1.0]], dtype=dtype)
    exact = acts.double() @ W.double()
    assert torch.equal(exact.float().double(), exact)  # fp32 accumulation is exact here
    return acts, W, exact


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_downcast_rounds_to_nearest_even(out_dtype):
    acts, W, exact = _exact_sums(out_dtype)
    truncated = (exact.float().view(torch.int32) >> 16 << 16).view(torch.float32)
    expected = exact.to(out_dtype)
    if out_dtype == torch.bfloat16:
        assert (truncated.to(out_dtype) != expected).sum() > 100  # a truncating cast would fail below
    for variant in (VARIANTS[0], VARIANTS[3]):
        out = _run(variant, acts, W)
        assert torch.equal(out, expected)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_downcast_of_every_special_value(out_dtype):
    """Overflow to Inf, NaN stays NaN, subnormals and ties: against torch's conversion of the fp32 sum."""
    f32 = torch.tensor(
        [
            65504.0,
            65519.0,
            65520.0,
            1e30,
            float("inf"),
            -float("inf"),
            float("nan"),
            2.0**-24,
            2.0**-25,
            3 * 2.0**-26,
            1.5 * 2.0**-24,
            2.0**-14 - 2.0**-25,
            1e-40,
            -0.0,
            3.3895e38,
            1.0 + 2.0**-8,
        ],
        dtype=torch.float32,
    )
    # out = 1 * f32 + bias 0 in the output dtype is not possible (W is the output dtype), so feed the
    # fp32 values as the bias of an fp32 W and compare the kernel's fp32 -> out conversion via a second
    # call whose W is the output dtype and whose sums are those values exactly: one non-zero times 1.
    D = f32.numel()
    W = torch.zeros(1, D, dtype=out_dtype)
    acts = torch.zeros(1, 1, dtype=out_dtype)
    b = f32.to(out_dtype)  # representable values: the kernel must give them back unchanged
    out = _run(VARIANTS[0], acts, W, b)
    same = (out == b) | (out.isnan() & b.isnan())
    assert bool(same.all()), (out, b)
    # values that need rounding: random fp32 bit patterns as sums of two exact halves of the output dtype
    gen = torch.Generator().manual_seed(1)
    bits = torch.randint(-(2**31), 2**31 - 1, (20000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    hi = x.to(out_dtype)
    lo = (x.double() - hi.double()).to(out_dtype)
    ok = (
        hi.isfinite()
        & lo.isfinite()
        & ((hi.double() + lo.double()).float().double() == hi.double() + lo.double())
    )
    hi, lo = hi[ok], lo[ok]
    acts = torch.ones(1, 2, dtype=out_dtype)
    W = torch.stack([hi, lo])
    exact = hi.double() + lo.double()
    out = _run(VARIANTS[3], acts, W)[0]
    expected = exact.to(out_dtype)
    assert torch.equal(out, expected)


def test_f16_inputs_convert_exactly_for_every_half_value():
    halves = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
    W = halves.reshape(1, -1)
    acts = torch.ones(1, 1, dtype=torch.float16)
    for variant in (VARIANTS[0], VARIANTS[4]):
        out = _run(variant, acts, W, torch.zeros(65536))[0]
        ref = halves.float()
        assert bool(((out == ref) | (out.isnan() & ref.isnan())).all())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(0, 6),
    F=st.integers(1, 80),
    D=st.integers(1, 40),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    variant=st.sampled_from(VARIANTS),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_small_shapes(B, F, D, density, dtype, variant, bias, seed):
    l0 = [min(F, round(density * F))] * B
    acts = random_acts(B, F, l0, dtype, seed=seed)
    W, b = random_weights(F, D, dtype, seed=seed + 1)
    b = b if bias else None
    assert_matches_dense(_run(variant, acts, W, b), acts, W, b)


def test_input_mistakes_are_named():
    acts = random_acts(2, 10, 3, torch.float32)
    W, b = random_weights(10, 4, torch.float32)
    with pytest.raises(TypeError, match="same dtype"):
        _run(V(), acts.half(), W)
    with pytest.raises(ValueError, match="features but W_dec has"):
        _run(V(), acts[:, :9], W)
    with pytest.raises(ValueError, match="b_dec must have shape"):
        _run(V(), acts, W, b[:3])
    with pytest.raises(TypeError, match="out_dtype must be torch.float32"):
        cpu.run(V(), acts, W, b, torch.float16)
    with pytest.raises(TypeError, match="float64"):
        _run(V(), acts.double(), W.double())


# --- building --------------------------------------------------------------------------------------------


@pytest.fixture
def kernel_dir(tmp_path, monkeypatch):
    """A fresh kernel folder and an empty in-process table: every build goes to the disk."""
    monkeypatch.setenv("SAE_TUNE_KERNEL_DIR", str(tmp_path / "kernels"))
    launch.forget_built()
    yield tmp_path / "kernels" / "c"
    launch.forget_built()


F32 = (torch.float32, None, torch.float32)


def _artefacts(folder: Path):
    (manifest,) = [p for p in folder.glob("*.json") if not p.name.startswith("probe-")]
    (so,) = folder.glob("*.so")
    return manifest, so


def test_cache_is_private_content_addressed_and_reused(kernel_dir):
    k1 = cpu.build(VARIANTS[0], F32)
    assert k1.name.startswith(VARIANTS[0].name) and k1.openmp
    assert stat.S_IMODE(kernel_dir.stat().st_mode) == 0o700
    manifest, so = _artefacts(kernel_dir)
    record = json.loads(manifest.read_text())
    assert record["key"] == manifest.stem and so.name.startswith(manifest.stem)
    assert (kernel_dir / f"{manifest.stem}.c").read_text() == cpu.render(VARIANTS[0], F32)
    launch.forget_built()
    mtime = so.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k2 = cpu.build(VARIANTS[0], F32)  # loaded from disk, no warning, no rebuild
    assert k2.key == k1.key and so.stat().st_mtime_ns == mtime


def test_tampered_shared_object_is_rebuilt_never_loaded(kernel_dir):
    cpu.build(VARIANTS[0], F32)
    manifest, so = _artefacts(kernel_dir)
    # plant a valid kernel of another variant under this one's name: it would run if loaded
    launch.forget_built()
    other = cpu.build(VARIANTS[3], F32)
    (other_so,) = [p for p in kernel_dir.glob("*.so") if p != so]
    so.write_bytes(other_so.read_bytes())
    launch.forget_built()
    with pytest.warns(RuntimeWarning, match="does not match its manifest"):
        kernel = cpu.build(VARIANTS[0], F32)
    assert kernel.name.startswith(VARIANTS[0].name) and other.name.startswith(VARIANTS[3].name)
    acts = random_acts(3, 50, 5, torch.float32)
    W = random_weights(50, 8, torch.float32)[0]
    assert_matches_dense(_run(VARIANTS[0], acts, W), acts, W)


@pytest.mark.parametrize("field", ["so_sha256", "key", "garbage"])
def test_tampered_manifest_is_rebuilt(kernel_dir, field):
    cpu.build(VARIANTS[0], F32)
    manifest, _ = _artefacts(kernel_dir)
    record = json.loads(manifest.read_text())
    if field == "garbage":
        manifest.write_text("{not json")
    else:
        record[field] = "0" * 64
        manifest.write_text(json.dumps(record))
    launch.forget_built()
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        kernel = cpu.build(VARIANTS[0], F32)
    assert kernel.name.startswith(VARIANTS[0].name)
    assert json.loads(manifest.read_text())["key"] == manifest.stem


def test_compile_error_carries_the_compiler_message(kernel_dir):
    with pytest.raises(cpu.CpuBuildError, match=r"(?s)failed to compile.*error.*undeclared_thing"):
        cpu_build.build_source("int sae_tune_decode(void) { return undeclared_thing; }\n")


def test_no_compiler_is_reported_by_available(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent")
    reason = cpu.available("cpu")
    assert reason is not None and "/nonexistent" in reason and "$CC" in reason
    with pytest.raises(cpu.CpuBuildError, match="/nonexistent"):
        cpu_build.build_source("int x;\n")
    monkeypatch.delenv("CC")
    assert cpu.available(torch.device("cpu")) is None
    assert "not on meta" in cpu.available("meta")


def _wrapper(tmp_path: Path, refuse: str) -> str:
    """A compiler that refuses one flag, like a compiler without -march=native or OpenMP."""
    script = tmp_path / f"cc-without{refuse}"
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "{refuse}" ] && exit 1; done\nexec cc "$@"\n')
    script.chmod(0o700)
    return str(script)


@pytest.mark.parametrize("refuse,openmp", [("-march=native", True), ("-fopenmp", False)])
def test_flags_fall_back_when_the_compiler_refuses(kernel_dir, tmp_path, monkeypatch, refuse, openmp):
    monkeypatch.setenv("CC", _wrapper(tmp_path, refuse))
    cc = cpu_build.compiler()
    assert not isinstance(cc, str) and refuse not in cc.flags and cc.openmp == openmp
    kernel = cpu.build(VARIANTS[1], F32)
    assert kernel.openmp == openmp
    acts = random_acts(4, 60, 6, torch.float32)
    W, b = random_weights(60, 20, torch.float32)
    assert_matches_dense(_run(VARIANTS[1], acts, W, b), acts, W, b)


def _build_in_child(folder: str, queue) -> None:
    os.environ["SAE_TUNE_KERNEL_DIR"] = folder
    from sae_tune.targets import cpu as target

    acts = torch.zeros(1, 4)
    acts[0, 2] = 2.0
    W = torch.arange(8.0).reshape(4, 2)
    out = target.run(target.CpuVariant(d_tile=32), acts, W, None, torch.float32)
    queue.put(out.tolist())


def test_two_processes_building_the_same_kernel_both_succeed(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path / "k"), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results == [[[8.0, 10.0]]] * 2
    assert len(list((tmp_path / "k" / "c").glob("*.json"))) >= 1


# --- the whole space (slow) ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("variant", cpu.search_space(4099, 300, torch.float32), ids=lambda v: v.name)
def test_whole_space_matches_dense(variant, dtype):
    acts = random_acts(9, 4099, [1, 40, 2000, 0, 7, 7, 3, 60, 1], dtype, seed=11)
    W, b = random_weights(4099, 300, dtype)
    assert_matches_dense(_run(variant, acts, W, b), acts, W, b)
