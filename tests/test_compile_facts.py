"""Compile facts per Triton version: the record of encode variants that spill, the space pruned by it on a
GPU, and compile-check rows whose word agrees with the exit code (a spilling variant is never "ok")."""

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from sae_tune.cli.main import main
from sae_tune.targets.base import EncodeRequest
from sae_tune.targets.triton import compile_facts, encode
from sae_tune.targets.triton.compile_check import CompileResult, KernelUsage
from sae_tune.targets.triton.encode_compile import EncodeCompileResult

SPILLER = "enc-m16-n128-k64-g8-s16-st4-w4"  # 8 bytes on sm_90 in bf16 with Triton 3.7.1 only


def _usage(kernel: str, spills: int, shared: int = 55296) -> KernelUsage:
    return KernelUsage(kernel, 96, spills, shared, {"mma_kind": "HGMMA"})


def _encode_result(
    name: str, spills: int, arch: str = "sm_90", dtype: str = "bfloat16"
) -> EncodeCompileResult:
    kernels = (_usage("encode_kernel", spills), _usage("finish_kernel", 0))
    return EncodeCompileResult(name, arch, dtype, True, kernels)


def test_the_record_names_only_measured_versions_archs_dtypes_and_variants_of_the_space():
    from sae_tune.targets.triton.variant import Variant

    for (version, arch, dtype), spills in compile_facts.ENCODE_SPILLS.items():
        assert version in compile_facts.MEASURED and arch in compile_facts.ARCHS
        names = {v.name for v in encode.all_variants(getattr(torch, dtype))}
        assert spills and set(spills) <= names, (version, arch, dtype, spills)
        assert all(size > 0 for size in spills.values())
    for measured, spills in compile_facts.DECODE_SPILLS.items():
        assert measured in compile_facts.DECODE_MEASURED
        space = Variant.search_space(65536, 2304, getattr(torch, measured[2]))
        assert spills and set(spills) <= {compile_facts.decode_key(v.name) for v in space}, spills


def test_a_variant_is_pruned_where_the_record_says_it_spills_and_where_nothing_was_measured():
    reason = compile_facts.pruned_reason(SPILLER, "3.7.1", "sm_90", "bfloat16")
    assert reason is not None and "8 bytes" in reason and "3.7.1" in reason
    assert "8 bytes" in (compile_facts.pruned_reason(SPILLER, "3.7.1+git0abc", "sm_90", "bfloat16") or "")
    # measured and clean: kept
    for version, arch, dtype in (("3.9.0", "sm_90", "bfloat16"), ("3.7.1", "sm_80", "bfloat16")):
        assert compile_facts.pruned_reason(SPILLER, version, arch, dtype) is None
    assert compile_facts.pruned_reason(SPILLER, "3.7.1", "sm_90", "float16") is None
    # not measured (a newer Triton, an architecture outside the record): what spilled anywhere is left out
    for version, arch in (("3.10.0", "sm_90"), ("3.9.0", "sm_86"), (None, "sm_90")):
        reason = compile_facts.pruned_reason(SPILLER, version, arch, "bfloat16")
        assert reason is not None and "not in the compile facts" in reason
    assert (
        compile_facts.pruned_reason("enc-m64-n128-k32-g8-s16-st3-w8", "3.10.0", "sm_90", "bfloat16") is None
    )
    assert compile_facts.arch_of((9, 0)) == "sm_90" and compile_facts.arch_of((8, 6)) == "sm_86"


def _cuda_space(monkeypatch, version: str, capability: tuple[int, int], dtype: torch.dtype) -> list[str]:
    """The encode space of a 4096-token request on a (pretended) CUDA device of ``capability`` with
    Triton ``version``: only the device facts are faked, the space and the pruning are the real code."""
    import sae_tune.device

    monkeypatch.setattr(encode, "unsupported_reason", lambda request: None)
    monkeypatch.setattr(encode, "shared_limit", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(sae_tune.device, "triton_version", lambda: version)
    request = EncodeRequest(4096, 65536, 2304, dtype, torch.device("cuda"), "jumprelu")
    return [v.name for v in encode.encode_space(request)]


def test_the_encode_space_on_a_gpu_leaves_out_what_spills_with_the_installed_triton(monkeypatch):
    full = [v.name for v in encode.all_variants(torch.bfloat16)]
    assert SPILLER in full
    assert _cuda_space(monkeypatch, "3.9.0", (9, 0), torch.bfloat16) == full
    assert _cuda_space(monkeypatch, "3.7.1", (9, 0), torch.bfloat16) == [n for n in full if n != SPILLER]
    assert _cuda_space(monkeypatch, "3.7.1", (8, 0), torch.bfloat16) == full
    assert SPILLER not in _cuda_space(monkeypatch, "3.10.0", (9, 0), torch.bfloat16)
    # Triton's interpreter (tests, on CPU) has no registers to spill: nothing is pruned there
    request = EncodeRequest(4096, 65536, 2304, torch.bfloat16, torch.device("cpu"), "jumprelu")
    assert [v.name for v in encode.encode_space(request, interpreter=True)] == full


def _encode_check(monkeypatch, version: str, spills: int):
    """`compile-check --op encode` over two variants, one of them spilling ``spills`` bytes (the compile
    is replaced by its result: this test is about the rows and the exit code)."""
    import sae_tune.device
    import sae_tune.targets.triton.encode_compile as ec

    variants = (encode.EncodeVariant(), encode.EncodeVariant.from_dict(_config(SPILLER)))
    monkeypatch.setattr(encode, "all_variants", lambda dtype: variants)
    monkeypatch.setattr(sae_tune.device, "triton_version", lambda: version)
    monkeypatch.setattr(
        ec,
        "compile_encode",
        lambda v, arch, dtype, F, D: _encode_result(v.name, spills if v.name == SPILLER else 0),
    )
    args = ["compile-check", "--op", "encode", "--arch", "sm_90", "--dtype", "bfloat16"]
    return CliRunner().invoke(main, args), CliRunner().invoke(main, [*args, "--json"])


def _config(name: str) -> dict[str, int]:
    return next(v.to_dict() for v in encode._SPACE if v.name == name)


def _row(output: str, name: str) -> list[str]:
    (line,) = [line for line in output.splitlines() if f" {name} " in line]
    return line.split()


def test_an_encode_variant_that_spills_is_not_ok_and_the_command_exits_1(monkeypatch):
    text, as_json = _encode_check(monkeypatch, "3.9.0", 8)  # not recorded for 3.9.0: a finding
    assert text.exit_code == 1 and as_json.exit_code == 1
    assert _row(text.stdout, SPILLER)[2] == "SPILLS" and "spills 8" in " ".join(_row(text.stdout, SPILLER))
    assert _row(text.stdout, "enc-m64-n128-k32-g8-s16-st3-w8")[2] == "ok"
    rows = {r["variant"]: r for r in json.loads(as_json.stdout)}
    assert rows[SPILLER]["status"] == "SPILLS" and rows[SPILLER]["pruned"] is None
    assert "sm_90: 1 of 2 encode variants compiled, fit, no spills" in text.stderr


def test_a_recorded_spill_is_pruned_not_ok_and_the_command_exits_0(monkeypatch):
    text, as_json = _encode_check(monkeypatch, "3.7.1", 8)
    assert text.exit_code == 0 and as_json.exit_code == 0, text.output
    assert _row(text.stdout, SPILLER)[2] == "pruned"
    rows = {r["variant"]: r for r in json.loads(as_json.stdout)}
    assert rows[SPILLER]["status"] == "pruned" and "3.7.1" in rows[SPILLER]["pruned"]
    assert (
        f"pruned from the space with Triton 3.7.1 by the compile facts: {SPILLER} (spills 8)" in text.stderr
    )


def test_a_decode_variant_that_spills_is_not_ok_and_the_command_exits_1(monkeypatch):
    import sae_tune.targets.triton.compile_check as cc
    import sae_tune.targets.triton.support as support

    def fake_check(space, arch, dtype, progress=iter, F=None, D=None):
        return [
            CompileResult(v.name, arch, "float32", True, (_usage("decode_kernel", 8 if i == 0 else 0),))
            for i, v in enumerate(progress(list(space)))
        ]

    monkeypatch.setattr(support, "interpreter_active", lambda: False)
    monkeypatch.setattr(cc, "compile_check", fake_check)
    result = CliRunner().invoke(
        main, ["compile-check", "--width", "256", "--d-model", "64", "--arch", "sm_80"]
    )
    assert result.exit_code == 1
    lines = [line.split() for line in result.output.splitlines() if line.startswith("sm_80 ")]
    assert lines[0][2] == "SPILLS" and all(line[2] == "ok" for line in lines[1:]), result.output
    assert f"sm_80: {len(lines) - 1} of {len(lines)} variants compiled without spills" in result.stderr


def test_the_decode_space_on_a_gpu_leaves_out_what_spills_with_the_installed_triton(monkeypatch):
    """Triton 3.7.1 on sm_90 spills 8 bytes in fp32 fixed-fallback variants with BLOCK_D=512, BLOCK_L=4 and
    8 warps, whatever their max_l0 (a runtime argument); 3.9.0 does not."""
    import sae_tune.device
    from sae_tune.targets import SpaceRequest
    from sae_tune.targets.triton import TritonTarget

    target = TritonTarget()
    monkeypatch.setattr(TritonTarget, "timed", lambda self, device: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    request = SpaceRequest(65536, 2304, torch.float32, torch.device("cuda"), batch_bucket=32, max_l0s=(208,))
    names = {}
    for version in ("3.9.0", "3.7.1"):
        monkeypatch.setattr(sae_tune.device, "triton_version", lambda version=version: version)
        names[version] = {target.label(impl, config) for impl, config in target.space(request)}
    gone = names["3.9.0"] - names["3.7.1"]
    assert gone and names["3.7.1"] < names["3.9.0"]
    assert all("fixed-fallback-m208-" in n and "-d512-l4-w8-wb4-s2" in n for n in gone), gone
    assert compile_facts.decode_key("fixed-fallback-m208-f1024-d512-l4-w8-wb4-s2") == (
        "fixed-fallback-f1024-d512-l4-w8-wb4-s2"
    )


def test_a_failed_compile_is_failed_and_a_clean_one_ok():
    assert CompileResult("v", "sm_90", "float32", False, error="boom").status == "FAILED"
    assert CompileResult("v", "sm_90", "float32", True, (_usage("k", 0),)).status == "ok"
    too_big = EncodeCompileResult("v", "sm_89", "float16", True, (_usage("k", 0, shared=200_000),))
    assert too_big.status == "TOO MUCH SHARED MEMORY" and not too_big.passed


@pytest.mark.slow
@pytest.mark.parametrize("dtype", compile_facts.DTYPES)
def test_the_record_agrees_with_the_installed_triton(dtype):
    """Compile the whole encode space for the recorded architectures with the installed Triton: where
    this version is measured, exactly the recorded variants spill, by the recorded bytes; where it is
    not, what spills must be pruned (else the record needs this version's facts)."""
    import triton

    version = compile_facts.base_version(triton.__version__)
    code = (
        "import json, sys, torch; from sae_tune.targets.triton.encode import all_variants; "
        "from sae_tune.targets.triton.encode_compile import compile_encode; "
        f"d = torch.{dtype}; "
        "rows = [compile_encode(v, a, d).to_json() for a in sys.argv[1:] for v in all_variants(d)]; "
        "print(json.dumps(rows))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", code, *compile_facts.ARCHS], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert all(r["ok"] and r["fits"] for r in rows), [r for r in rows if not (r["ok"] and r["fits"])]
    for arch in compile_facts.ARCHS:
        found = {r["variant"]: r["spills"] for r in rows if r["arch"] == arch and r["spills"]}
        if compile_facts.is_measured(version, arch):
            recorded = compile_facts.ENCODE_SPILLS.get((version, arch, dtype), {})
            assert found == recorded, (version, arch, found, recorded)
        else:
            assert all(r["status"] in ("ok", "pruned") for r in rows if r["arch"] == arch), found


def test_a_triton_without_the_launch_specialisation_api_is_named(monkeypatch):
    """Triton <= 3.5 has no native_specialize_impl: every compile fails with that reason, not an
    ImportError from inside Triton."""
    import triton.runtime.jit

    from sae_tune.targets.triton.compile_check import specialised

    monkeypatch.delattr(triton.runtime.jit, "native_specialize_impl")
    with pytest.raises(RuntimeError, match=r"needs Triton >= 3\.6 .* is installed"):
        specialised(None, None)
