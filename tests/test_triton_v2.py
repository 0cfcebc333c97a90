"""Triton family v2: chunk-local slots without a host sync, rounding of the output, launches (device
guard, grid limits, cached launchers), and the cases the interpreter grid did not check before."""

import contextlib

import pytest
import torch
from conftest import DTYPES, assert_matches_dense, random_acts, random_weights
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_tune import sparse_decode
from sae_tune.inputs import check_decode_inputs
from sae_tune.targets.triton import TritonTarget
from sae_tune.targets.triton import launch as launch_mod
from sae_tune.targets.triton.launch import (
    GRID_YZ_LIMIT,
    build_sparse,
    decode_launches,
    representative_launches,
    run_variant,
)
from sae_tune.targets.triton.variant import Variant

CHUNKED = [
    Variant(),
    Variant(block_f=256, chunk_slots=2, unit_chunks=1, block_l=8, block_d=64),
    Variant(block_f=256, chunk_slots=4, unit_chunks=2, block_l=32, block_d=1024, num_warps=8),
    Variant(block_f=512, chunk_slots=1, unit_chunks=4, block_l=4, block_d=32, num_warps=2),
]


# --- host sync ----------------------------------------------------------------------------------------
class HostSync(AssertionError):
    """A device tensor was turned into a Python value on a path that promised not to."""


@contextlib.contextmanager
def no_host_sync():
    """Every conversion of a tensor to a Python value raises: on a GPU each one waits for the device."""
    names = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(name):
        def convert(self, *args, **kwargs):
            raise HostSync(f"torch.Tensor.{name} called on the path")

        return convert

    for name in names:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def overfull_inputs(dtype=torch.float32):
    """Token 1 fires 40 features in a 512-wide SAE: above every cap used below."""
    acts = random_acts(3, 512, [5, 40, 8], dtype, seed=3)
    W, b = random_weights(512, 64, dtype, seed=4)
    return acts, W, b


@pytest.mark.parametrize(
    "variant",
    [CHUNKED[0], CHUNKED[1], Variant(alloc="fixed", overflow="fallback", max_l0=16)],
    ids=lambda v: v.name,
)
def test_variants_without_host_sync_convert_no_device_tensor(variant):
    """The whole built path (checks, build, decode) of a host_sync=False variant, with over-full tokens."""
    assert not variant.host_sync
    acts, W, b = overfull_inputs()
    run = TritonTarget().build("triton", variant.to_dict())
    with no_host_sync():
        out = run(acts, W, b)
    assert_matches_dense(out, acts, W, b)


@pytest.mark.parametrize(
    "variant",
    [Variant(alloc="exact"), Variant(alloc="fixed", overflow="validate", max_l0=64)],
    ids=lambda v: v.name,
)
def test_the_no_sync_check_catches_the_variants_that_sync(variant):
    assert variant.host_sync
    acts, W, b = overfull_inputs()
    with pytest.raises(HostSync), no_host_sync():
        run_variant(check_decode_inputs(acts, W, b), variant)


def test_default_variant_is_chunked_and_in_the_default_space():
    v = Variant()
    assert v.alloc == "chunked" and not v.host_sync and not v.can_truncate
    assert TritonTarget().default(65536, 2304, torch.float32) == ("triton", v.to_dict())
    assert v in Variant.search_space(65536, 2304)


# --- chunk-local slots --------------------------------------------------------------------------------
def test_chunk_slots_hold_each_chunks_first_features_in_order():
    v = Variant(block_f=256, chunk_slots=4, unit_chunks=2, block_l=8, block_d=64)
    acts = random_acts(3, 700, [0, 9, 300], torch.float32, seed=5)
    view = build_sparse(acts, v)
    n_chunks, slots = 3, 4
    assert view.offsets.shape == (3 * n_chunks,) and view.cols.shape == (3 * n_chunks * slots,)
    for t in range(3):
        for c in range(n_chunks):
            fired = acts[t, c * 256 : (c + 1) * 256].nonzero().flatten() + c * 256
            i = t * n_chunks + c
            assert int(view.offsets[i]) == len(fired), "the count is the chunk's true count"
            kept = min(len(fired), slots)
            got = view.cols[i * slots : (i + 1) * slots]
            vals = view.vals[i * slots : (i + 1) * slots]
            assert torch.equal(got[:kept].long(), fired[:kept])
            assert torch.equal(vals[:kept], acts[t, fired[:kept]])
            assert bool((vals[kept:] == 0).all()), "empty slots hold value 0"


@pytest.mark.parametrize("variant", CHUNKED, ids=lambda v: v.name)
def test_chunked_is_exact_for_tokens_far_above_any_cap(variant, dtype):
    """All-zero tokens, a token with every feature fired, chunks full and over-full, ragged F and D."""
    F, D = 1100, 70
    acts = random_acts(5, F, [0, 3, F, 600, 17], dtype, seed=11)
    W, b = random_weights(F, D, dtype)
    out = run_variant(check_decode_inputs(acts, W, b), variant)
    assert_matches_dense(out, acts, W, b)
    assert torch.equal(out[0], b.to(out.dtype))


def test_chunked_is_deterministic_and_agrees_with_exact_and_fixed():
    acts = random_acts(6, 2048, [1, 30, 200, 0, 2048, 64], torch.float32, seed=2)
    W, b = random_weights(2048, 96, torch.float32)
    inputs = check_decode_inputs(acts, W, b)
    v = Variant(block_f=256, chunk_slots=8, unit_chunks=2, block_l=16, block_d=64)
    first = run_variant(inputs, v)
    assert torch.equal(first, run_variant(inputs, v)), "unit partials are added in a fixed order"
    exact = run_variant(inputs, Variant(alloc="exact", block_d=64))
    fixed = run_variant(inputs, Variant(alloc="fixed", overflow="fallback", max_l0=64, block_d=64))
    scale = acts.double().abs() @ W.double().abs() + b.double().abs()
    for other in (exact, fixed):
        assert bool(((first.double() - other.double()).abs() <= 4e-6 * scale).all())


def test_units_split_a_heavy_token_and_reduce_in_order():
    """F=2048 in 256-wide chunks, 2 chunks per unit: 4 units per token, 4 partial rows per token."""
    v = Variant(block_f=256, chunk_slots=4, unit_chunks=2, block_l=8, block_d=64)
    view = build_sparse(random_acts(3, 2048, 50, torch.float32), v)
    W = torch.zeros(2048, 200)
    out = torch.empty(3, 200)
    decode, reduce = decode_launches(view, W, None, out)
    assert (decode.kernel, decode.grid, decode.constexprs["DIRECT"]) == ("decode_kernel", (12, 4), False)
    assert (reduce.kernel, reduce.grid) == ("reduce_kernel", (3, 4))
    (direct,) = decode_launches(build_sparse(torch.zeros(3, 500), v), W[:500], None, out)
    assert direct.constexprs["DIRECT"] is True and direct.grid == (3, 4)


def test_w_dec_offsets_are_int32_only_where_they_fit():
    """The chunked decode multiplies W_dec offsets in 32 bits only when every (f, d) offset fits."""
    v = Variant(block_f=256, chunk_slots=4, unit_chunks=2, block_l=8, block_d=64)
    view = build_sparse(random_acts(2, 512, 5, torch.float32), v)
    W = torch.empty(512, 64, device="meta")
    decode = decode_launches(view, W, None, torch.empty(2, 64))[0]
    assert decode.constexprs["WIDE"] is False
    assert launch_mod.fits_int32(2**31 // 4096 + 1, 4096, torch.empty(1, 4096, device="meta")) is False
    assert launch_mod.fits_int32(2**31 // 4096, 4096, torch.empty(1, 4096, device="meta")) is True
    # a 1M x 4096 W_dec (2**32 elements) and its transposed view both need int64
    big = torch.empty(2**20, 4096, device="meta")
    assert not launch_mod.fits_int32(2**20, 4096, big)
    assert not launch_mod.fits_int32(2**20, 4096, big.t().contiguous().t())


@pytest.mark.parametrize("wide", [False, True])
def test_both_offset_widths_decode_exactly(monkeypatch, wide, dtype):
    """The int64 path (F x D too large for int32) decodes the same as the int32 one: forced here, as
    no test machine holds a W_dec of 2**31 elements."""
    monkeypatch.setattr(launch_mod, "fits_int32", lambda F, D, W: not wide)
    acts = random_acts(3, 1100, [0, 40, 1100], dtype, seed=5)
    W, b = random_weights(1100, 70, dtype)
    v = Variant(block_f=256, chunk_slots=4, unit_chunks=2, block_l=8, block_d=64)
    view = build_sparse(acts, v)
    assert decode_launches(view, W, b, torch.empty(3, 70, dtype=dtype))[0].constexprs["WIDE"] is wide
    assert_matches_dense(run_variant(check_decode_inputs(acts, W, b), v), acts, W, b)


# --- rounding of the output ---------------------------------------------------------------------------
def dyadic_case(dtype):
    """Outputs 1 + j * 2**-12 (and their negatives), exact in fp32: about half of them sit above the
    midpoint of two output values, the rest below or on it, so truncation and rounding differ."""
    F, D = 256, 128
    acts = torch.zeros(2, F, dtype=dtype)
    acts[0, 3] = acts[0, 200] = 1.0
    acts[1, 3] = acts[1, 200] = -1.0
    W = torch.zeros(F, D, dtype=dtype)
    W[3] = 1.0
    W[200] = torch.arange(D, dtype=torch.float64).mul(2.0**-12).to(dtype)
    assert torch.equal(W[200].double(), torch.arange(D, dtype=torch.float64) * 2.0**-12)
    return acts, W


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "variant",
    [Variant(), Variant(alloc="exact", block_d=64), Variant(alloc="fixed", block_l=1, block_d=32)],
    ids=lambda v: v.name,
)
def test_output_rounds_to_nearest_even_like_torch(variant, dtype):
    acts, W = dyadic_case(dtype)
    out = run_variant(check_decode_inputs(acts, W, None), variant)
    expected = (acts.double() @ W.double()).to(dtype)  # torch rounds to nearest even
    truncated = (acts.float() @ W.float()).view(torch.int32) >> 16 << 16
    if dtype == torch.bfloat16:  # the case tells rounding from truncation
        assert not torch.equal(truncated.view(torch.float32).to(dtype), expected)
    assert torch.equal(out, expected), (out - expected).abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "variant", [CHUNKED[0], CHUNKED[2], Variant(alloc="exact", block_d=64)], ids=lambda v: v.name
)
def test_error_is_half_an_output_ulp(variant, dtype):
    """Each output is as close to the fp64 result as torch's own rounding of it, up to the fp32
    accumulation error; a truncating cast is up to a whole ulp off and fails."""
    acts = random_acts(8, 1024, [1, 5, 20, 60, 100, 3, 7, 300], dtype, seed=9)
    W, b = random_weights(1024, 96, dtype, seed=10)
    out = run_variant(check_decode_inputs(acts, W, b), variant).double()
    ref = acts.double() @ W.double() + b.double()
    scale = acts.double().abs() @ W.double().abs() + b.double().abs()
    torch_error = (ref.to(dtype).double() - ref).abs()
    assert bool(((out - ref).abs() <= torch_error + 4e-6 * scale).all())


@pytest.mark.parametrize(
    "variant", [Variant(), Variant(alloc="fixed", max_l0=4, block_d=64)], ids=lambda v: v.name
)
@pytest.mark.filterwarnings("ignore:(invalid value|overflow) encountered:RuntimeWarning")
def test_bf16_rounding_keeps_nan_and_inf(variant):
    acts = torch.zeros(3, 256, dtype=torch.bfloat16)
    acts[0, 1], acts[1, 2], acts[2, 3] = float("nan"), float("inf"), 3.0e38
    W = torch.ones(256, 32, dtype=torch.bfloat16)
    W[3] = 2.0  # 6e38 overflows bf16's range: rounds to inf, as torch does
    out = run_variant(check_decode_inputs(acts, W, None), variant)
    ref = (acts.double() @ W.double()).to(torch.bfloat16)
    assert bool(out[0].isnan().all()) and torch.equal(out[1:], ref[1:])


# --- launches -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "variant",
    [Variant(block_f=256), Variant(alloc="exact", block_f=256), Variant(alloc="fixed", block_f=256)],
    ids=lambda v: v.alloc,
)
def test_grids_stay_within_cuda_limits_for_the_widest_saes(variant):
    """F = 2**24 in 256-wide slices is 65,536 slices: a grid's 2nd dimension takes at most 65,535."""
    for launch in representative_launches(variant, 2**24, 64, torch.float32, B=3):
        assert all(0 < g <= GRID_YZ_LIMIT for g in launch.grid[1:]), (launch.kernel, launch.grid)
        assert launch.grid[0] < 2**31


def test_too_many_output_tiles_is_a_clear_error():
    view = build_sparse(torch.zeros(1, 256), Variant(block_d=16))
    W = torch.empty(256, 16 * 65536 + 1, device="meta")
    with pytest.raises(ValueError, match="block_d"):
        decode_launches(view, W, None, torch.empty(1, W.shape[1], device="meta"))


def test_device_guard_makes_the_tensors_device_current(monkeypatch):
    entered = []

    class Recorder:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with launch_mod.device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with launch_mod.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)], "no CUDA call for CPU tensors"


def test_every_launch_runs_under_the_device_guard(monkeypatch):
    guarded, launched = [], []
    real_guard, real_run = launch_mod.device_guard, launch_mod._run

    @contextlib.contextmanager
    def guard(device):
        guarded.append(device)
        with real_guard(device):
            yield
        guarded.pop()

    def run(variant, launch):
        launched.append((launch.kernel, list(guarded)))
        real_run(variant, launch)

    monkeypatch.setattr(launch_mod, "device_guard", guard)
    monkeypatch.setattr(launch_mod, "_run", run)
    acts, W, b = overfull_inputs()
    for v in (Variant(block_f=256, unit_chunks=1), Variant(alloc="exact"), Variant(alloc="fixed")):
        run_variant(check_decode_inputs(acts, W, b), v)
    assert len(launched) >= 6 and all(devices == [acts.device] for _, devices in launched)


def test_launchers_are_cached_per_variant(monkeypatch):
    """The render check and module lookup (tens of microseconds) run once per variant, not per call."""
    calls = []
    real = launch_mod.load_module
    monkeypatch.setattr(launch_mod, "load_module", lambda v: calls.append(v) or real(v))
    v = Variant(block_d=128, block_l=32, unit_chunks=4)
    acts, W, b = overfull_inputs()
    inputs = check_decode_inputs(acts, W, b)
    for _ in range(3):
        run_variant(inputs, v)
    assert len(calls) <= 1


# --- inputs the grid did not cover --------------------------------------------------------------------
def test_requires_grad_is_refused_outside_no_grad_and_runs_under_it():
    acts, W, b = overfull_inputs()
    W = W.clone().requires_grad_(True)  # an SAELens parameter
    with pytest.raises(RuntimeError, match="no_grad"):
        sparse_decode(acts, W, b, variant=Variant())
    with torch.no_grad():
        out = sparse_decode(acts, W, b, variant=Variant())
    assert_matches_dense(out, acts, W.detach(), b)


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    dtype=st.sampled_from(DTYPES),
    F=st.integers(1, 65536),
    D=st.integers(1, 1024),
    variant=st.sampled_from(
        [*CHUNKED, Variant(alloc="exact", block_d=128), Variant(alloc="fixed", max_l0=64)]
    ),
)
def test_fuzz_wide_shapes(data, dtype, F, D, variant):
    """Shapes up to F = 65536, D = 1024 and L0 up to F."""
    B = data.draw(st.integers(0, 3), label="B")
    l0 = data.draw(st.lists(st.integers(0, F), min_size=B, max_size=B), label="l0")
    acts = random_acts(B, F, l0, dtype, seed=F + D)
    W, b = random_weights(F, D, dtype)
    out = run_variant(check_decode_inputs(acts, W, b), variant)
    assert_matches_dense(out, acts, W, b)
