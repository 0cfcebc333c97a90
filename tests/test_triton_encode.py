"""The Triton encode (GEMM + activation + compaction in the epilogue) in Triton's interpreter, against an
fp64 reference: the non-zero sets are equal exactly (inputs are built with no pre-activation within the
kernels' error band of the cut), values within the dtype's tolerance. Plus the target's contract members,
the variant's validation, the hash-checked module and one ahead-of-time compile for sm_90."""

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import TOLERANCE

from sae_tune.targets.base import ConfigFieldError, EncodeProblem, EncodeRequest
from sae_tune.targets.triton import TritonTarget
from sae_tune.targets.triton.encode import (
    _SPACE,
    TILE_ELEMS_PER_THREAD,
    EncodeVariant,
    encode_slots,
    encode_space,
    load_encode_module,
    rendered_encode,
    run_encode,
    shared_estimate,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATIONS = ["relu", "jumprelu"]
# slots=2 on 32-feature pairs: most pairs overflow (the finish kernel's recompute path)
SMALL = EncodeVariant(block_m=16, block_n=32, block_k=16, group_m=2, slots=2, num_stages=1, num_warps=1)
MID = EncodeVariant(block_m=32, block_n=64, block_k=32, group_m=3, slots=8, num_warps=2)
VARIANTS = [SMALL, MID, EncodeVariant()]
SHAPES = list(itertools.product((1, 5, 33), (256, 1000), (64, 200)))  # (B, F, D)
ALL_FIRED, EMPTY = 1, 2  # tokens driven far above / below every cut (when B > 2)


def build_case(
    B: int, F: int, D: int, dtype: torch.dtype, activation: str, seed: int = 0, thr_low: float = 0.0
):
    """Inputs in ``dtype`` and the fp64 pre-activations and cut, with no pre within the error band.

    Dimension 0 of x drives every feature (W_enc[0] = 1): token 1 gets +40 (all fired), token 2 gets -40
    (empty). The bias of a feature whose column comes near its cut is shifted until none does.
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen, dtype=torch.float64)
    x[:, 0] = 0
    if B > 2:
        x[ALL_FIRED, 0], x[EMPTY, 0] = 40.0, -40.0
    W = torch.randn(D, F, generator=gen, dtype=torch.float64) / math.sqrt(D)
    W[0] = 1.0
    b0 = torch.randn(F, generator=gen, dtype=torch.float64) * 0.2
    thr = None
    cut = torch.zeros(F, dtype=torch.float64)
    if activation == "jumprelu":
        thr = (thr_low + torch.rand(F, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
        thr[::7] = -0.125  # negative thresholds: the cut is max(threshold, 0)
        cut = thr.double().clamp_min(0)
    x, W = x.to(dtype), W.to(dtype)
    xw = x.double() @ W.double()
    xw_abs = x.double().abs() @ W.double().abs()
    eps32, eps, tiny = 2.0**-24, torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    b = torch.empty(F, dtype=dtype)
    done = torch.zeros(F, dtype=torch.bool)
    for step in range(41):
        delta = 0.03 * ((step + 1) // 2) * (1 if step % 2 else -1)
        b_try = (b0 + delta).to(dtype)
        pre = xw + b_try.double()
        scale = xw_abs + b_try.double().abs()
        # fp32 accumulation error, then rounding to dtype (which can meet a cut within one ulp of it)
        band = 4 * (D + 2) * eps32 * scale + 2 * eps * cut + tiny
        ok = ((pre - cut).abs() > band).all(0) & ~done
        b[ok] = b_try[ok]
        done |= ok
    assert done.all(), "could not build inputs without a pre-activation near the cut"
    pre = xw + b.double()
    scale = xw_abs + b.double().abs()
    return EncodeProblem(x, W, b, thr, None), pre, cut, scale


def check_encode(problem: EncodeProblem, variant: EncodeVariant, pre, cut, scale) -> torch.Tensor:
    """Run the encode and compare with fp64: CSR structure, exact non-zero sets, values. Returns offsets."""
    x = problem.x
    B = x.shape[0]
    offsets, indices, values = run_encode(problem, variant)
    assert offsets.dtype == indices.dtype == torch.int64 and values.dtype == x.dtype
    assert offsets.shape == (B + 1,) and offsets[0] == 0 and (offsets.diff() >= 0).all()
    assert indices.numel() == values.numel() == int(offsets[-1])
    fired = pre > cut
    for t in range(B):
        row = indices[offsets[t] : offsets[t + 1]]
        assert (row.diff() > 0).all(), f"token {t}: features not ascending"
        expected = fired[t].nonzero().squeeze(1)
        assert torch.equal(row, expected), f"token {t}: non-zero set differs"
        err = (values[offsets[t] : offsets[t + 1]].double() - pre[t, row]).abs()
        tol = TOLERANCE[x.dtype] * scale[t, row] + torch.finfo(x.dtype).tiny
        assert (err <= tol).all(), f"token {t}: value error {err.max().item():.3g}"
    return offsets


def _cases():
    combos = list(itertools.product(DTYPES, ACTIVATIONS, range(len(VARIANTS))))
    # every dtype x activation x variant once, the shapes cycled so that every B, F and D occurs
    return [(*SHAPES[(5 * i) % len(SHAPES)], dt, act, vi) for i, (dt, act, vi) in enumerate(combos)]


def _id(case) -> str:
    B, F, D, dt, act, vi = case
    return f"B{B}-F{F}-D{D}-{str(dt).removeprefix('torch.')}-{act}-v{vi}"


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_encode_matches_fp64(case):
    B, F, D, dtype, activation, vi = case
    problem, pre, cut, scale = build_case(B, F, D, dtype, activation, seed=vi)
    offsets = check_encode(problem, VARIANTS[vi], pre, cut, scale)
    if B > 2:
        assert int(offsets[ALL_FIRED + 1] - offsets[ALL_FIRED]) == F
        assert int(offsets[EMPTY + 1] - offsets[EMPTY]) == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [(*s, dt, act, vi) for s in SHAPES for dt in DTYPES for act in ACTIVATIONS for vi in range(3)],
    ids=_id,
)
def test_encode_matches_fp64_full_grid(case):
    B, F, D, dtype, activation, vi = case
    problem, pre, cut, scale = build_case(B, F, D, dtype, activation, seed=vi)
    check_encode(problem, VARIANTS[vi], pre, cut, scale)


def test_over_full_pairs_are_exact_and_the_path_runs():
    """Pairs with more non-zeros than slots (incl. exactly slots and slots + 1) lose none; high thresholds
    give every count from 0 up, the all-fired token full pairs."""
    problem, pre, cut, scale = build_case(33, 256, 64, torch.float32, "jumprelu", seed=3, thr_low=1.5)
    counts = encode_slots(problem, SMALL).counts
    assert (counts > SMALL.slots).any() and (counts == SMALL.slots).any()
    assert (counts == SMALL.slots + 1).any() and (counts < SMALL.slots).any()
    check_encode(problem, SMALL, pre, cut, scale)
    one = EncodeVariant(block_m=16, block_n=16, block_k=16, slots=1, num_warps=1)
    check_encode(problem, one, pre, cut, scale)


def test_deterministic_and_no_bias():
    problem, pre, cut, scale = build_case(5, 256, 64, torch.bfloat16, "jumprelu", seed=4)
    a, b = run_encode(problem, MID), run_encode(problem, MID)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[2].view(torch.int16), b[2].view(torch.int16))  # the same bits
    no_bias = EncodeProblem(problem.x, problem.W_enc, None, None, None)
    offsets, indices, values = run_encode(no_bias, MID)
    ref = problem.x.double() @ problem.W_enc.double()
    # every non-zero the kernel keeps is positive and close to the fp64 pre-activation
    rows = torch.repeat_interleave(torch.arange(5), offsets.diff())
    assert (values > 0).all()
    assert ((values.double() - ref[rows, indices]).abs() <= 8e-3 * (ref[rows, indices].abs() + 1)).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on NaN/inf
def test_nan_and_inf_keep_saelens_results():
    """relu(pre) * (pre > thr): NaN pre fires as NaN; +inf pre at an +inf threshold is inf * 0 = NaN."""
    x = torch.zeros(3, 16)
    x[0, 0] = float("nan")
    x[1, 1] = float("inf")
    x[2, 2] = 1.0
    W = torch.eye(16, 32)
    thr = torch.full((32,), 0.5)
    thr[1] = float("inf")
    problem = EncodeProblem(x, W, None, thr, None)
    pre = x @ W  # the expression SAELens evaluates
    expected = torch.relu(pre) * (pre > thr)
    offsets, indices, values = run_encode(problem, EncodeVariant(block_m=16, block_n=16, block_k=16, slots=4))
    dense = torch.zeros(3, 32)
    rows = torch.repeat_interleave(torch.arange(3), offsets.diff())
    dense[rows, indices] = values
    assert torch.equal((dense != 0), (expected != 0))
    assert torch.equal(dense.isnan(), expected.isnan())


def test_activation_reads_pre_rounded_to_the_dtype():
    """A positive fp32 pre-activation that rounds to 0 in the SAE's dtype is not a non-zero (SAELens's
    pre is in that dtype): no zero is ever stored in the CSR. (fp16: in bf16 such sums are fp32
    subnormals.)"""
    # 16 products of 2**-30: a sum of 2**-26, below half of fp16's smallest subnormal (2**-24)
    x = torch.full((2, 16), 2.0**-16, dtype=torch.float16)
    W = torch.full((16, 32), 2.0**-14, dtype=torch.float16)
    assert (x.float() @ W.float() > 0).all() and ((x @ W) == 0).all()
    offsets, indices, values = run_encode(EncodeProblem(x, W, None, None, None), SMALL)
    assert offsets.tolist() == [0, 0, 0] and values.numel() == 0


def test_empty_batch_and_zero_features():
    x, W = torch.zeros(0, 16), torch.ones(16, 64)
    offsets, indices, values = run_encode(EncodeProblem(x, W, None, None, None), EncodeVariant())
    assert offsets.tolist() == [0] and indices.numel() == values.numel() == 0
    offsets, _, _ = run_encode(EncodeProblem(torch.ones(3, 16), torch.ones(16, 0), None, None, None), SMALL)
    assert offsets.tolist() == [0, 0, 0, 0]


def test_variant_validation_names_the_field():
    with pytest.raises(ConfigFieldError, match="power of two") as err:
        EncodeVariant(block_m=24)
    assert err.value.field == "block_m"
    with pytest.raises(ConfigFieldError) as err:
        EncodeVariant(slots=256, block_n=128)
    assert err.value.field == "slots"
    with pytest.raises(ConfigFieldError) as err:
        EncodeVariant(num_warps=True)
    assert err.value.field == "num_warps"
    with pytest.raises(ConfigFieldError) as err:
        EncodeVariant.from_dict({"block_m": 64, "tile": 3})
    assert err.value.field == "tile"
    v = EncodeVariant(block_m=32, slots=8)
    assert EncodeVariant.from_dict(v.to_dict()) == v and v.name.startswith("enc-m32-n128")


def test_space_default_first_and_within_thread_budget():
    names = [v.name for v in _SPACE]
    assert len(set(names)) == len(names) and _SPACE[0] == EncodeVariant()
    for v in _SPACE:
        assert v.block_m * v.block_n <= TILE_ELEMS_PER_THREAD * 32 * v.num_warps, v.name
    cpu = EncodeRequest(64, 4096, 256, torch.float16, torch.device("cpu"), "relu")
    assert encode_space(cpu) == []  # the interpreter only when asked for explicitly
    assert encode_space(cpu, interpreter=True)[0] == EncodeVariant()
    assert encode_space(EncodeRequest(64, 4096, 256, torch.float16, torch.device("cpu"), "topk", 32)) == []


def test_space_leaves_out_tiles_past_the_gpus_shared_memory(monkeypatch):
    """sm_86/sm_89 give a block 99 KiB: 16x128x64 fp32 tiles in 4 stages (110,592 bytes compiled for
    sm_89) are left out there and refused by the gate; the default fits every GPU in every dtype."""
    from sae_tune.targets.triton import encode

    monkeypatch.setattr(encode, "shared_limit", lambda device: 101376)
    cuda = torch.device("cuda")
    request = EncodeRequest(4096, 65536, 2304, torch.float32, cuda, "relu")
    names = [v.name for v in encode_space(request)]
    big = EncodeVariant(block_m=16, block_n=128, block_k=64, num_warps=4, num_stages=4)
    assert names[0] == EncodeVariant().name and big.name not in names
    assert big.name in [v.name for v in encode_space(dataclasses.replace(request, dtype=torch.float16))]
    assert "shared memory" in encode.shared_reason(big, torch.float32, cuda)  # (fp32 drops its K tile too)
    for dtype in DTYPES:
        assert shared_estimate(EncodeVariant(), dtype) <= 101376


def test_fp32_space_keeps_k_tiles_that_do_not_spill_on_sm80(monkeypatch):
    """fp32 runs on FFMA: K tiles of 64 or more spilled 592-4,744 bytes on sm_80 (compile-check --op
    encode), so the fp32 space keeps BLOCK_K <= 32; 16-bit dtypes keep the whole space."""
    from sae_tune.targets.triton import encode

    monkeypatch.setattr(encode, "shared_limit", lambda device: None)
    monkeypatch.setattr(encode, "unsupported_reason", lambda request: None)
    request = EncodeRequest(4096, 65536, 2304, torch.float32, torch.device("cuda"), "relu")
    fp32 = encode_space(request)
    assert fp32[0] == EncodeVariant() and all(v.block_k <= 32 for v in fp32)
    assert fp32 == list(encode.all_variants(torch.float32))
    bf16 = encode_space(dataclasses.replace(request, dtype=torch.bfloat16))
    assert len(bf16) == len(_SPACE) > len(fp32)


def test_target_contract_members():
    target = TritonTarget()
    assert target.encode_impls == ("triton-encode",)
    cpu = torch.device("cpu")
    request = EncodeRequest(5, 256, 64, torch.float32, cpu, "jumprelu")
    assert target.encode_space(request) == []  # CPU timings are never speed
    config = EncodeVariant(slots=8).to_dict()
    assert target.encode_parse("triton-encode", config) == config
    with pytest.raises(ConfigFieldError):
        target.encode_parse("triton-encode", {**config, "block_k": 3})
    with pytest.raises(ValueError, match="no encode impl"):
        target.encode_parse("triton", config)
    assert target.encode_label("triton-encode", config) == f"triton-encode[{EncodeVariant(slots=8).name}]"
    assert target.encode_gate("triton-encode", config, request) is None
    topk = EncodeRequest(5, 256, 64, torch.float32, cpu, "topk", 8)
    assert "TopK" in target.encode_gate("triton-encode", config, topk)
    f64 = EncodeRequest(5, 256, 64, torch.float64, cpu, "relu")
    assert "float64" in target.encode_gate("triton-encode", config, f64)
    assert "not a valid encode variant" in target.encode_gate("triton-encode", {"slots": 3}, request)
    huge = EncodeRequest(1 << 40, 1 << 20, 64, torch.float32, cpu, "relu")
    assert "more than a grid takes" in target.encode_gate("triton-encode", config, huge)
    problem, pre, cut, scale = build_case(5, 256, 64, torch.float32, "jumprelu")
    got = target.encode("triton-encode", config, problem)
    want = run_encode(problem, EncodeVariant(slots=8))
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_planted_module_file_is_never_run(tmp_path, monkeypatch):
    from sae_tune.artefacts import ArtefactReplaced

    monkeypatch.setenv("SAE_TUNE_KERNEL_DIR", str(tmp_path))
    variant = EncodeVariant(block_m=16, block_n=16, block_k=16, slots=2, group_m=5)
    kernel = rendered_encode(variant)
    (tmp_path / f"{kernel.name}.py").write_text("raise SystemExit('planted')\n")
    load_encode_module.cache_clear()
    sys.modules.pop(kernel.name, None)
    with pytest.warns(ArtefactReplaced, match="edited or planted"):
        module = load_encode_module(variant)
    assert (tmp_path / f"{kernel.name}.py").read_text() == kernel.source
    assert hasattr(module, "encode_kernel") and hasattr(module, "finish_kernel")


def test_default_variant_compiles_for_sm90_fp16_without_spills_on_tensor_cores():
    code = (
        "import json, torch; from sae_tune.targets.triton.encode_compile import compile_encode; "
        "from sae_tune.targets.triton.encode import EncodeVariant; "
        "print(json.dumps(compile_encode(EncodeVariant(), 'sm_90', torch.float16).to_json()))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(done.stdout)
    assert row["ok"], row["error"]
    assert row["spills"] == 0 and row["fits"]
    assert row["shared"] <= shared_estimate(EncodeVariant(), torch.float16)
    kernels = {k["kernel"]: k["sass"] for k in row["kernels"]}
    assert set(kernels) == {"encode_kernel", "finish_kernel"}
    for sass in kernels.values():
        assert sass["mma"] and sass["ldgsts128"]
    # the finish kernel recomputes a tile with the same tensor-core instructions as the first kernel
    assert kernels["encode_kernel"]["mma_kind"] == kernels["finish_kernel"]["mma_kind"]
    assert kernels["encode_kernel"]["hgmma"] == kernels["finish_kernel"]["hgmma"]
