"""Ahead-of-time compilation for real GPU targets. It needs real Triton kernels, so it runs in a
child process without TRITON_INTERPRET (the test process uses the interpreter)."""

import json
import os
import subprocess
import sys

import pytest

from sae_tune.targets.triton.compile_check import ARCHS, parse_arch


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run(
        [sys.executable, "-m", "sae_tune.cli.main", *args], capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def small_space_results():
    """The default space of a small SAE (F=256, D=64), compiled for three architectures."""
    args = "compile-check --width 256 --d-model 64 --dtype bfloat16 --arch sm_80 --arch sm_89 --arch sm_90"
    done = run_cli(*args.split(), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_json_lists_every_variant_per_arch_with_resources(small_space_results):
    from sae_tune.targets.triton.variant import Variant

    space = Variant.search_space(256, 64)
    names = {v.name for v in space}
    for arch in ("sm_80", "sm_89", "sm_90"):
        rows = [r for r in small_space_results if r["arch"] == arch]
        assert {r["variant"] for r in rows} == names
        for r in rows:
            assert {"variant", "arch", "ok", "registers", "spills", "shared"} <= set(r)
            assert r["ok"] is True and r["spills"] == 0
            assert 0 < r["registers"] <= 255 and r["shared"] >= 0


def test_bf16_and_fp16_compile_on_sm80_and_sm90():
    code = (
        "import json, torch; from sae_tune.targets.triton.compile_check import compile_variant; "
        "from sae_tune.targets.triton.variant import Variant; "
        "vs = [Variant(alloc='fixed', overflow='fallback', block_d=512, block_l=16, num_warps=8), "
        "Variant(alloc='exact', block_l=1, block_d=64, num_warps=2), Variant(), "
        "Variant(alloc='fixed', overflow='fallback', block_f=4096, block_d=64, block_l=16, num_warps=2)]; "
        "print(json.dumps([compile_variant(v, a, d).to_json() for v in vs for a in ('sm_80', 'sm_90') "
        "for d in (torch.float16, torch.float32)]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    assert len(rows) == 16 and all(r["ok"] and r["spills"] == 0 for r in rows)
    assert {k["kernel"] for r in rows for k in r["kernels"]} == {
        "count_kernel",
        "fill_kernel",
        "fill_fixed_kernel",
        "fill_chunks_kernel",
        "decode_kernel",
        "reduce_kernel",
    }
    for r in rows:
        for k in r["kernels"]:
            assert {"ldg128", "barriers_in_loop"} <= set(k["sass"]), k


def test_unknown_arch_is_a_usage_error():
    with pytest.raises(ValueError, match="sm_75"):
        parse_arch("sm_75")
    done = run_cli("compile-check", "--arch", "sm_75")
    assert done.returncode == 2 and "sm_75" in done.stderr
    assert set(ARCHS) >= {"sm_80", "sm_89", "sm_90"}


def test_refuses_to_run_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sae_tune.cli.main", "compile-check"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 1 and "TRITON_INTERPRET" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_whole_default_space_compiles_without_spills(arch):
    """The gemma-2b-l20 default space, as `sae-tune compile-check` runs it."""
    done = run_cli("compile-check", "--arch", arch, "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(done.stdout)
    from sae_tune.targets.triton.variant import Variant

    assert len(rows) == len(Variant.search_space(65536, 2304))
    # a variant the compile facts record spilling with this Triton is pruned from the space: not a failure
    assert all(r["ok"] and (r["spills"] == 0 or r["status"] == "pruned") for r in rows)


def run_child(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def test_default_variant_gathers_with_128_bit_loads_and_no_barrier_in_its_loops():
    """The decode kernel of the default variant, specialised as launched for gemma-2b-l20 (fp32):
    LDG.E.128 W_dec gathers and slot loads, no BAR at all, no spills, on sm_90 and sm_89 (and sm_80)."""
    code = (
        "import json, torch; from sae_tune.targets.triton.compile_check import compile_variant; "
        "from sae_tune.targets.triton.variant import Variant; "
        "print(json.dumps([compile_variant(Variant(), a, torch.float32, 65536, 2304).to_json() "
        "for a in ('sm_90', 'sm_89', 'sm_80')]))"
    )
    done = run_child(code)
    assert done.returncode == 0, done.stderr[-2000:]
    for row in json.loads(done.stdout):
        assert row["ok"] and row["spills"] == 0, row
        decode = next(k for k in row["kernels"] if k["kernel"] == "decode_kernel")
        assert decode["sass"]["ldg128"] is True, (row["arch"], decode)
        assert decode["sass"]["barriers_in_loop"] == 0, (row["arch"], decode)
        # both warps along D: the final reduction stays in each thread (no barrier at all), and the slot
        # indices and values load as 128-bit vectors (the 16 x 256, 4-warp tile had 75 narrow loads)
        assert decode["sass"]["barriers"] == 0, (row["arch"], decode)
        assert decode["sass"]["ldg_narrow"] <= 24, (row["arch"], decode)


def test_compiled_arguments_carry_the_launch_specialisation():
    """Pointers, sizes and strides divisible by 16 are marked so, unit strides become constants:
    compiling without that (as before) reports code that never runs (scalar loads, other registers)."""
    code = (
        "import json, torch; from sae_tune.targets.triton.compile_check import specialised; "
        "from sae_tune.targets.triton.launch import module_for, representative_launches; "
        "from sae_tune.targets.triton.variant import Variant; v = Variant(alloc='exact'); "
        "out = {}\n"
        "for L in representative_launches(v, 65536, 2304, torch.float32):\n"
        "    fn = getattr(module_for(v), L.kernel); sig, ce, at = specialised(fn, L)\n"
        "    out[L.kernel] = [sig, {k: str(x) for k, x in ce.items()}, "
        "[fn.arg_names[i[0]] for i in at]]\n"
        "print(json.dumps(out))"
    )
    done = run_child(code)
    assert done.returncode == 0, done.stderr[-2000:]
    sig, consts, divisible = json.loads(done.stdout)["decode_kernel"]
    assert {"w_ptr", "cols_ptr", "out_ptr", "D", "stride_wf", "stride_ob"} <= set(divisible)
    assert sig["stride_wd"] == "constexpr" and consts["stride_wd"] == "1"
    assert sig["w_ptr"] == "*fp32" and sig["row_ptr_ptr"] == "*i64"


def test_sass_facts_find_barriers_inside_loops_only():
    from sae_tune.targets.triton.compile_check import sass_facts

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0040*/              @P0 BRA 0x20 ;
        /*0050*/                   EXIT ;
        /*0060*/                   BRA 0x60;
    """
    assert sass_facts(sass) == {
        "ldg128": True,
        "ldg_narrow": 0,
        "barriers": 2,
        "barriers_in_loop": 1,
        "loops": 1,
        "instructions": 7,
    }
    narrow = sass_facts(
        "/*0000*/ LDG.E.64 R4, desc[UR4][R2.64] ;\n/*0010*/ @!P5 LDG.E R5, desc[UR8][R8.64] ;"
    )
    assert narrow["ldg128"] is False and narrow["ldg_narrow"] == 2


def test_compile_check_op_encode_reports_every_encode_variant():
    """`compile-check --op encode` compiles the Triton encode's variants (here one, patched in a child
    process) and reports registers, spills, shared memory and the MMA kind as JSON."""
    code = (
        "import sys; import sae_tune.targets.triton.encode as e; "
        "e.all_variants = lambda dtype: (e.EncodeVariant(),); from sae_tune.cli.main import main; "
        "sys.argv = ['sae-tune', 'compile-check', '--op', 'encode', '--arch', 'sm_90', '--dtype', 'float16', "
        "'--json']; main()"
    )
    done = run_child(code)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(done.stdout)
    assert row["ok"] and row["fits"] and row["spills"] == 0, row
    assert {k["kernel"] for k in row["kernels"]} == {"encode_kernel", "finish_kernel"}
    assert all(k["sass"]["mma"] for k in row["kernels"]), row
    assert "sm_90: 1 of 1 encode variants compiled, fit, no spills" in done.stderr


def test_compile_check_op_encode_is_for_the_triton_target():
    from click.testing import CliRunner

    from sae_tune.cli.main import main

    result = CliRunner().invoke(main, ["compile-check", "--target", "cpu", "--op", "encode"])
    assert result.exit_code == 2 and "--op encode compiles the Triton encode" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_whole_encode_space_compiles_fits_and_does_not_spill(dtype):
    code = (
        "import sys; from sae_tune.cli.main import main; sys.argv = ['sae-tune', 'compile-check', '--op', "
        "'encode', '--arch', 'sm_80', '--arch', 'sm_89', '--arch', 'sm_90', "
        f"'--dtype', '{dtype}', '--json']; main()"
    )
    done = run_child(code)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    rows = json.loads(done.stdout)
    # a variant the compile facts record spilling with this Triton is pruned from the space: not a failure
    assert rows and all(r["ok"] and (r["status"] == "pruned" or r["fits"] and r["spills"] == 0) for r in rows)
