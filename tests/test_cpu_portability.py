"""The C target away from this machine: built objects keyed by the CPU, gcc and clang with and without
OpenMP, no compiler, a compiler that hangs or crashes, and the rendered kernels on aarch64.

The aarch64 tests cross-compile the real rendered kernels with ``aarch64-linux-gnu-gcc`` together with a
small driver (tests/cpu_driver/driver.c), statically, and run them under ``qemu-aarch64``: inputs go in as
raw files, outputs come back and are compared with torch's fp64 result (or bit for bit where the fast CPU
tests compare bits). This proves the kernels' correctness on aarch64, not their speed there.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCE, assert_matches_dense, random_acts, random_weights, require, require_tool

from sae_tune.targets import cpu

cpu_build = importlib.import_module("sae_tune.targets.cpu.build")
launch = importlib.import_module("sae_tune.targets.cpu.launch")
cpu_render = importlib.import_module("sae_tune.targets.cpu.render")

V = cpu.CpuVariant
FUSED = V("fused", 1, 128, 2, 0, 16, 0, "guided")
TWOPHASE = V("twophase", 2, 64, 4, 3, 32, 0, "dynamic")
F32 = (torch.float32, None, torch.float32)
DRIVER = Path(__file__).parent / "cpu_driver" / "driver.c"


@pytest.fixture
def kernel_dir(tmp_path, monkeypatch):
    """A fresh kernel folder, a fresh probe per compiler, and an empty in-process table."""
    monkeypatch.setenv("SAE_TUNE_KERNEL_DIR", str(tmp_path / "kernels"))
    launch.forget_built()
    cpu_build._probe.cache_clear()
    yield tmp_path / "kernels" / "c"
    launch.forget_built()
    cpu_build._probe.cache_clear()


def _manifests(folder: Path) -> list[dict]:
    return [
        json.loads(p.read_text()) for p in sorted(folder.glob("*.json")) if not p.name.startswith("probe-")
    ]


def _decodes_exactly(variant: V = TWOPHASE, dtype: torch.dtype = torch.float32) -> None:
    acts = random_acts(5, 300, 12, dtype, seed=2)
    W, b = random_weights(300, 70, dtype)
    assert_matches_dense(cpu.run(variant, acts, W, b, dtype), acts, W, b)


def _script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o700)
    return str(path)


# --- the CPU identity in every built object's key ----------------------------------------------------------


def test_an_object_built_for_another_cpu_is_rebuilt_not_loaded(kernel_dir, monkeypatch):
    """An AVX-512 object in a kernel folder shared with an AVX2 node must never be loaded there."""
    compiled: list[str] = []
    real_compile = cpu_build._compile

    def spy(command, flags, source, folder):
        compiled.append(source)
        return real_compile(command, flags, source, folder)

    monkeypatch.setattr(cpu_build, "_compile", spy)
    monkeypatch.setattr(cpu_build, "cpu_identity", lambda: "x86_64 Intel Xeon [x86_64 0000avx512f]")
    first = cpu.build(TWOPHASE, F32)
    assert any("sae_tune_decode" in s for s in compiled)
    (manifest,) = _manifests(kernel_dir)
    assert manifest["cpu"] == "x86_64 Intel Xeon [x86_64 0000avx512f]"

    launch.forget_built()
    compiled.clear()
    monkeypatch.setattr(cpu_build, "cpu_identity", lambda: "x86_64 AMD EPYC [x86_64 1111avx2]")
    second = cpu.build(TWOPHASE, F32)
    assert second.key != first.key
    assert any("sae_tune_decode" in s for s in compiled), "the other CPU's object was loaded"
    assert sorted(m["cpu"] for m in _manifests(kernel_dir)) == [
        "x86_64 AMD EPYC [x86_64 1111avx2]",
        "x86_64 Intel Xeon [x86_64 0000avx512f]",
    ]
    _decodes_exactly()

    launch.forget_built()  # back on the first CPU: its own object is found on disk, nothing compiles
    compiled.clear()
    monkeypatch.setattr(cpu_build, "cpu_identity", lambda: "x86_64 Intel Xeon [x86_64 0000avx512f]")
    assert cpu.build(TWOPHASE, F32).key == first.key and compiled == []


def test_a_manifest_naming_another_cpu_is_not_trusted(kernel_dir):
    cpu.build(TWOPHASE, F32)
    (path,) = [p for p in kernel_dir.glob("*.json") if not p.name.startswith("probe-")]
    record = json.loads(path.read_text())
    record["cpu"] = "x86_64 Some Other CPU [x86_64 222222222222]"
    path.write_text(json.dumps(record))
    launch.forget_built()
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        cpu.build(TWOPHASE, F32)
    assert json.loads(path.read_text())["cpu"] == cpu_build.cpu_identity()
    _decodes_exactly()


def test_a_probe_record_of_another_cpu_is_not_trusted(kernel_dir, monkeypatch):
    monkeypatch.setattr(cpu_build, "cpu_identity", lambda: "x86_64 CPU B [x86_64 bbbbbbbbbbbb]")
    probed = cpu_build.compiler()
    assert not isinstance(probed, str) and probed.cpu == "x86_64 CPU B [x86_64 bbbbbbbbbbbb]"
    (record_path,) = kernel_dir.glob("probe-*.json")
    record = json.loads(record_path.read_text())
    serial = list(cpu_build.FLAG_SETS[-1])
    assert record["flags"] == list(probed.flags) != serial

    # a record of this compiler naming this CPU is trusted (the control) ...
    record_path.write_text(json.dumps({**record, "flags": serial}))
    cpu_build._probe.cache_clear()
    assert cpu_build.compiler().flags == tuple(serial)
    # ... one naming another CPU is not: the compiler is probed again
    record_path.write_text(
        json.dumps({**record, "flags": serial, "cpu": "x86_64 CPU A [x86_64 aaaaaaaaaaaa]"})
    )
    cpu_build._probe.cache_clear()
    assert cpu_build.compiler().flags == probed.flags


def test_native_flags_per_architecture():
    assert cpu_build.native_flag("x86_64") == "-march=native"
    assert cpu_build.native_flag("aarch64") == cpu_build.native_flag("arm64") == "-mcpu=native"
    assert cpu_build.native_flag("ppc64le") == "-mcpu=native"
    assert cpu_build.native_flag("riscv64") is None
    arm = cpu_build.flag_sets("aarch64")
    assert [("-mcpu=native" in s, "-fopenmp" in s) for s in arm] == [
        (True, True),
        (False, True),
        (True, False),
        (False, False),
    ]
    assert not any("-march=native" in s for s in arm)
    assert all("-mcpu=native" not in s and "-march=native" not in s for s in cpu_build.flag_sets("riscv64"))
    assert cpu_build.FLAG_SETS == cpu_build.flag_sets()


def test_a_probe_record_cannot_select_another_architectures_flags(kernel_dir):
    """The record on disk may only select one of this machine's own flag sets."""
    probed = cpu_build.compiler()
    (record_path,) = kernel_dir.glob("probe-*.json")
    foreign = "aarch64" if cpu_build.native_flag() != "-mcpu=native" else "x86_64"
    flags = cpu_build.flag_sets(foreign)[0]
    assert flags not in cpu_build.FLAG_SETS
    record_path.write_text(json.dumps({**json.loads(record_path.read_text()), "flags": list(flags)}))
    cpu_build._probe.cache_clear()
    assert cpu_build.compiler().flags == probed.flags


# --- compilers: gcc, clang, with and without OpenMP, none, hanging, crashing -------------------------------


@functools.cache
def _clang_openmp_works(clang: str) -> bool:
    probe = "#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n"
    done = subprocess.run(
        [clang, "-fopenmp", "-x", "c", "-", "-o", os.devnull], input=probe, capture_output=True, text=True
    )
    return done.returncode == 0


@pytest.mark.parametrize("name", ["gcc", "clang"])
def test_gcc_and_clang_build_native_openmp_kernels_with_exact_results(kernel_dir, monkeypatch, name):
    tool = require_tool(name)
    if name == "clang":
        require(_clang_openmp_works(tool), "clang's OpenMP needs libomp-dev (.ci/run installs it)")
    monkeypatch.setenv("CC", tool)
    cc = cpu_build.compiler()
    assert not isinstance(cc, str) and cc.command[0] == tool
    assert cc.openmp and cc.flags == cpu_build.FLAG_SETS[0]
    native = cpu_build.native_flag()
    assert native is None or native in cc.flags
    for variant, dtype in ((TWOPHASE, torch.float16), (FUSED, torch.bfloat16)):
        assert cpu.build(variant, (dtype, dtype, dtype)).openmp
        _decodes_exactly(variant, dtype)
    assert {m["compiler"] for m in _manifests(kernel_dir)} == {cc.identity}


def _explain_on_cpu(monkeypatch) -> str:
    from sae_tune import explain
    from sae_tune.dispatch import costmodel

    rates = costmodel.Rates(bandwidth=20e9, op_overhead=5e-6, scan=2e9, flops=100e9)
    monkeypatch.setattr(costmodel, "measure_rates", lambda device, dtype=torch.float32: rates)
    W, b = random_weights(16384, 512, torch.float32)
    acts = random_acts(32, 16384, 16, torch.float32)
    return explain(acts, W, b).reason


@pytest.mark.parametrize("name", ["gcc", "clang"])
def test_without_openmp_the_build_is_serial_with_one_thread_and_explain_says_so(
    kernel_dir, tmp_path, monkeypatch, isolated_dispatch, name
):
    """A compiler whose OpenMP does not work (clang without libomp-dev fails to link -fopenmp): a serial
    build, still with the native flag, one thread whatever a variant asks, exact results."""
    tool = require_tool(name)
    body = (
        'for a in "$@"; do\n'
        '  [ "$a" = "-fopenmp" ] && echo "ld: error: unable to find library -lomp" >&2 && exit 1\n'
        "done\n"
        f'exec {tool} "$@"\n'
    )
    monkeypatch.setenv("CC", _script(tmp_path, f"{name}-without-libomp", body))
    cc = cpu_build.compiler()
    native = cpu_build.native_flag()
    assert not isinstance(cc, str) and not cc.openmp
    assert cc.flags == cpu_build.BASE_FLAGS + ((native,) if native else ())
    for variant, dtype in ((TWOPHASE, torch.float32), (FUSED, torch.float16)):
        assert not cpu.build(variant, (dtype, dtype, dtype)).openmp
        _decodes_exactly(variant, dtype)
        _decodes_exactly(V(**{**variant.to_dict(), "threads": 3}), dtype)

    from sae_tune.targets.base import SpaceRequest
    from sae_tune.targets.cpu.target import CpuTarget

    request = SpaceRequest(4096, 256, torch.float32, torch.device("cpu"), 32, (64,))
    space = CpuTarget().space(request)
    assert space and {config["threads"] for _, config in space} == {1}
    assert len(space) == len({json.dumps(c, sort_keys=True) for _, c in space})
    assert all(w["threads"] == 1 and ("cpu", w) in space for w in CpuTarget().warm_starts(request))
    assert "serial build (no OpenMP): 1 thread" in _explain_on_cpu(monkeypatch)
    # a tuned C winner from the cache says it too
    from sae_tune import explain
    from sae_tune.cache.store import CacheKey, Store
    from sae_tune.device import describe_device
    from sae_tune.dispatch import reload
    from sae_tune.targets import templates_hash

    key = CacheKey.for_device(
        describe_device(torch.device("cpu")),
        template_hash=templates_hash(),
        dtype="float32",
        F=512,
        D=48,
        batch_size=8,
        mean_l0=8,
    )
    with Store(tmp_path / "cache.sqlite") as store:
        store.set_winner_if_faster(key, "cpu", {**TWOPHASE.to_dict(), "threads": 1}, 1.0, 10.0)
    reload()
    W, b = random_weights(512, 48, torch.float32)
    decision = explain(random_acts(8, 512, 8, torch.float32), W, b)
    assert decision.source == "cache" and decision.implementation == "cpu", decision
    assert decision.reason.endswith("; serial build (no OpenMP): 1 thread")


def test_without_a_compiler_explain_says_library_paths_only(monkeypatch, isolated_dispatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    reason = _explain_on_cpu(monkeypatch)
    assert "no C compiler: library paths only" in reason and "$CC" in reason


def _failing_compiler(tmp_path: Path, how: str) -> str:
    """A compiler that builds the flag probe (so the target is available) but hangs or crashes on kernels:
    ``sleep`` runs as a child, as cc1 does under a compiler driver."""
    action = {
        "hang": f'sleep 60 &\necho $! > "{tmp_path}/child.pid"\nwait\n',  # the child hangs, as cc1 would
        "segv": "kill -SEGV $$\n",
        "status139": "exit 139\n",
    }[how]
    body = (
        'for a in "$@"; do last="$a"; done\n'
        'if [ "$1" = "--version" ] || grep -q sae_tune_probe "$last" 2>/dev/null; then exec cc "$@"; fi\n'
        + action
    )
    return _script(tmp_path, f"cc-{how}", body)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.parametrize(
    "how,message",
    [
        ("hang", "ran for more than 0.5 s and was killed"),
        ("segv", "was killed by SIGSEGV (it crashed)"),
        ("status139", "exited with status 139 (a crash: SIGSEGV)"),
    ],
)
def test_a_hanging_or_crashing_compiler_fails_the_build_with_its_message(
    kernel_dir, tmp_path, monkeypatch, how, message
):
    monkeypatch.setattr(cpu_build, "COMPILE_TIMEOUT_S", 0.5)
    monkeypatch.setenv("CC", _failing_compiler(tmp_path, how))
    assert cpu.available("cpu") is None  # the probe builds: the kernels are what fails
    start = time.monotonic()
    with pytest.raises(cpu.CpuBuildError, match="failed to compile") as info:
        cpu.build(TWOPHASE, F32)
    assert message in str(info.value)
    assert time.monotonic() - start < 10  # the compiler and its child were killed, not waited for
    if how == "hang":  # ... both of them: no hanging compiler is left behind by a failed trial
        pid = int((tmp_path / "child.pid").read_text())
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(pid), "the compiler's child still runs"
    assert not list(kernel_dir.glob("*.so")) and not list(kernel_dir.glob(".tmp-*"))


def test_a_hanging_compiler_is_a_failed_trial_and_the_library_paths_still_race(
    kernel_dir, tmp_path, monkeypatch
):
    from sae_tune.autotune.search import Tuner, quiet_optuna
    from sae_tune.cache.store import Store
    from sae_tune.specs import spec_from_shape

    quiet_optuna()
    monkeypatch.setattr(cpu_build, "COMPILE_TIMEOUT_S", 0.5)
    monkeypatch.setenv("CC", _failing_compiler(tmp_path, "hang"))
    with Store(tmp_path / "cache.sqlite") as store:
        result = Tuner(spec_from_shape(2048, 32, 8), store=store).tune_batch(8, trials=2)
        trials = store.trials(result.key)
    failed = [t for t in trials if t.impl == "cpu"]
    assert failed and all(not t.ok and "ran for more than 0.5 s" in t.error for t in failed)
    assert result.best.impl != "cpu" and result.baselines["dense"] > 0
    assert {t.impl for t in trials if t.ok} >= {"dense", "embedding_bag_csr"}


# --- aarch64: the rendered kernels cross-compiled and run under qemu ----------------------------------------

# a real aarch64 core (this host cannot say -mcpu=native for it): SVE, fp16 and bf16 instructions, so the
# compiler vectorises as it would on a Graviton 3; qemu-aarch64 emulates all of them
AARCH64_CPUS = ("neoverse-v1",)
AARCH64_CPUS_SLOW = ("generic", "neoverse-n1")


def _aarch64_tools() -> tuple[str, str]:
    return require_tool("aarch64-linux-gnu-gcc"), require_tool("qemu-aarch64")


@functools.cache
def _openmp_flag(cross: str) -> tuple[str, ...]:
    """-fopenmp when the cross compiler has a static libgomp (gcc-aarch64-linux-gnu ships one)."""
    done = subprocess.run([cross, "-print-file-name=libgomp.a"], capture_output=True, text=True)
    return ("-fopenmp",) if os.path.isabs(done.stdout.strip()) else ()


_EXES: dict[tuple[str, str], Path] = {}


def _cross_build(source: str, mcpu: str, folder: Path) -> Path:
    """A static aarch64 executable of the driver and one rendered kernel (kept for the session)."""
    cached = _EXES.get((source, mcpu))
    if cached is not None and cached.exists():
        return cached
    cross, _ = _aarch64_tools()
    folder.mkdir(parents=True, exist_ok=True)
    n = len(_EXES)
    (folder / f"kernel{n}.c").write_text(source)
    exe = folder / f"kernel{n}"
    flags = ["-O3", f"-mcpu={mcpu}", "-std=c11", "-Wall", "-Werror", "-static", *_openmp_flag(cross)]
    args = [cross, *flags, "-o", str(exe), str(DRIVER), str(folder / f"kernel{n}.c")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _EXES[(source, mcpu)] = exe
    return exe


def _qemu(exe: Path, *args: object) -> str:
    _, qemu = _aarch64_tools()
    done = subprocess.run([qemu, str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{exe.name} {args}: {done.stderr[-2000:]}"
    return done.stdout


def _storage_file(t: torch.Tensor | None, path: Path) -> tuple[str, tuple[int, ...]]:
    """The memory a strided tensor spans (from its first element), as a raw file; and its strides."""
    if t is None:
        return "-", (0,)
    t = t.resolve_neg().resolve_conj()
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True)) if t.numel() else 0
    span = t.as_strided((extent,), (1,), t.storage_offset()).contiguous()
    path.write_bytes(span.view(torch.uint8).numpy().tobytes())
    return str(path), tuple(t.stride())


def _run_aarch64(variant: V, acts, W, b, folder: Path, mcpu: str, threads: int = 2) -> torch.Tensor:
    """The kernel of ``variant`` for these dtypes, on aarch64 under qemu: out = acts @ W (+ b)."""
    out_dtype = W.dtype if b is None else torch.promote_types(W.dtype, b.dtype)
    dtypes = (W.dtype, None if b is None else b.dtype, out_dtype)
    exe = _cross_build(cpu.render(variant, dtypes), mcpu, folder / "bin")
    (B, F), D = acts.shape, W.shape[1]
    a_file, (ars, acs) = _storage_file(acts, folder / "acts.bin")
    w_file, (wrs, wcs) = _storage_file(W, folder / "W.bin")
    b_file, (bs,) = _storage_file(b, folder / "b.bin")
    out_file = folder / "out.bin"
    size = out_dtype.itemsize
    _qemu(exe, "decode", B, F, D, ars, acs, wrs, wcs, bs, size, threads, a_file, w_file, b_file, out_file)
    data = out_file.read_bytes()
    assert len(data) == B * D * size
    return torch.frombuffer(bytearray(data), dtype=out_dtype).reshape(B, D)


def _decode_cases(dtype: torch.dtype) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """The fast CPU tests' edge cases (tests/test_cpu_target.py) at tiny sizes."""
    cases = []
    for B, F, D, l0 in ((5, 300, 70, 12), (1, 1000, 257, 40), (3, 97, 1, 9)):
        acts = random_acts(B, F, l0, dtype, seed=F + D)
        acts[0, 0], acts[-1, F - 1] = 1.5, -0.75  # first and last feature
        W, b = random_weights(F, D, dtype)
        cases.append((f"B{B}-F{F}-D{D}", acts, W, b))
    acts = random_acts(6, 512, [3, 256, 0, 1, 5, 512], dtype, seed=3)  # a heavy token and an empty row
    W, b = random_weights(512, 96, dtype)
    cases.append(("heavy and empty rows", acts, W, b))
    acts = random_acts(5, 300, 11, dtype, seed=5)
    W, b = random_weights(300, 70, dtype)
    cases += [
        ("transposed acts", acts.t().contiguous().t(), W, b),
        ("transposed W", acts, W.t().contiguous().t(), b),
        ("column slices", torch.cat([acts, acts], 1)[:, ::2], torch.stack([W, W], 2)[:, :, 1],
         torch.stack([b, b], 1)[:, 0]),
        ("row slices", torch.cat([acts, acts])[::2], torch.stack([W, W], 1)[:, 0], b),
        ("broadcast acts", acts[:1].expand(5, 300), W, b),
        ("neg views", torch._neg_view(acts), torch._neg_view(W), torch._neg_view(b)),
    ]  # fmt: skip
    return cases


def _check_special_values(variant: V, dtype: torch.dtype, folder: Path, mcpu: str) -> None:
    """NaN and Inf activations propagate like dense; a row only a -0.0 points at is never read; every half
    value converts exactly; fp32 sums round to nearest even, overflow to Inf, subnormals as torch does."""
    acts = random_acts(4, 200, 10, dtype, seed=4)
    unfired = int((acts == 0).all(0).nonzero()[0])
    acts[1, 7], acts[2, 150], acts[3, unfired] = float("nan"), float("inf"), -0.0
    W, b = random_weights(200, 40, dtype)
    W[unfired] = float("inf")
    out = _run_aarch64(variant, acts, W, b, folder, mcpu).double()
    W_read = W.double().clone()
    W_read[unfired] = 0.0
    ref = acts.double() @ W_read + b.double()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert torch.equal(out[2].sign(), ref[2].sign())
    finite = ref.isfinite()
    scale = (acts.double().abs() @ W_read.abs() + b.double().abs())[finite]
    assert bool(((out[finite] - ref[finite]).abs() <= 2 * TOLERANCE[dtype] * scale).all())

    if dtype == torch.float16:  # every half value to fp32 and back: both conversions are exact on them
        halves = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.float16)
        one, zeros = torch.ones(1, 1, dtype=dtype), torch.zeros(65536, dtype=dtype)
        got = _run_aarch64(variant, one, halves.reshape(1, -1), zeros, folder, mcpu)[0]
        nan = halves.isnan()
        assert torch.equal(got.isnan(), nan)
        dense = (halves.float() + 0.0).to(dtype)  # x + 0: -0.0 becomes +0.0
        assert torch.equal(got[~nan].view(torch.int16), dense[~nan].view(torch.int16))
    if dtype != torch.float32:  # fp32 sums of two exact values of ``dtype``, rounded once to ``dtype``
        gen = torch.Generator().manual_seed(1)
        bits = torch.randint(-(2**31), 2**31 - 1, (4000,), generator=gen, dtype=torch.int64).to(torch.int32)
        specials = torch.tensor(
            [65504.0, 65519.0, 65520.0, 1e30, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 1.5 * 2.0**-24, 1e-40, -0.0,
             3.3895e38, 1.0 + 2.0**-8, 2.0**-14 - 2.0**-25],
            dtype=torch.float32,
        )  # fmt: skip
        x = torch.cat([bits.view(torch.float32), specials])
        hi = x.to(dtype)
        lo = (x.double() - hi.double()).to(dtype)
        exact = hi.double() + lo.double()
        ok = hi.isfinite() & lo.isfinite() & (exact.float().double() == exact)
        W, zeros = torch.stack([hi[ok], lo[ok]]), torch.zeros(int(ok.sum()), dtype=dtype)
        got = _run_aarch64(variant, torch.ones(1, 2, dtype=dtype), W, zeros, folder, mcpu)[0]
        assert torch.equal(got, exact[ok].to(dtype))
        b = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e-40, -0.0], dtype=dtype)
        zeros = torch.zeros(1, 5, dtype=dtype)
        got = _run_aarch64(variant, torch.zeros(1, 1, dtype=dtype), zeros, b, folder, mcpu)[0]
        dense = (torch.zeros(1, 5) + b.float()).to(dtype)[0]  # 0 + -0.0 is +0.0
        assert torch.equal(got.isnan(), dense.isnan()) and bool((got[:2] == dense[:2]).all())
        assert torch.equal(got[3:].view(torch.int16), dense[3:].view(torch.int16))  # subnormal, +0.0


# the cases the default tier runs (qemu is slow; the slow tier runs them all)
FAST_CASES = ("B5-F300-D70", "B3-F97-D1", "heavy and empty rows", "column slices", "broadcast acts")


def _check_decode_on_aarch64(variant: V, dtype: torch.dtype, folder: Path, mcpu: str, every: bool) -> None:
    """Every case with one kernel (bias of the inputs' dtype): a single cross-compilation."""
    for name, acts, W, b in _decode_cases(dtype):
        if not every and name not in FAST_CASES:
            continue
        expected = (acts.resolve_neg(), W.resolve_neg(), b.resolve_neg())
        out = _run_aarch64(variant, acts, W, b, folder, mcpu, threads=2 if name != "broadcast acts" else 3)
        try:
            assert_matches_dense(out, *expected)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None
    _check_special_values(variant, dtype, folder, mcpu)


DTYPE_IDS = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
@pytest.mark.parametrize("variant", [FUSED, TWOPHASE], ids=lambda v: v.family)
def test_decode_kernels_are_exact_on_aarch64(variant, dtype, tmp_path):
    _aarch64_tools()
    for mcpu in AARCH64_CPUS:
        _check_decode_on_aarch64(variant, dtype, tmp_path, mcpu, every=False)


@pytest.mark.slow
@pytest.mark.parametrize("mcpu", AARCH64_CPUS + AARCH64_CPUS_SLOW)
@pytest.mark.parametrize(
    "variant",
    [V("twophase", 1, 256, 4, 8, 64, 0, "static"), V("twophase", 4, 16, 1, 0, 8, 2, "dynamic"),
     V("fused", 4, 4096, 4, 0, 64, 1, "static"), V("fused", 1, 32, 1, 0, 8, 0, "dynamic")],
    ids=lambda v: v.name,
)  # fmt: skip
@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
def test_more_decode_kernels_on_aarch64(variant, dtype, mcpu, tmp_path):
    _aarch64_tools()
    _check_decode_on_aarch64(variant, dtype, tmp_path, mcpu, every=True)
    acts = random_acts(4, 150, 9, dtype, seed=9)
    W = random_weights(150, 33, dtype)[0]
    assert_matches_dense(_run_aarch64(variant, acts, W, None, tmp_path, mcpu), acts, W)  # no bias
    other = torch.float32 if dtype != torch.float32 else torch.float16
    b = random_weights(150, 33, other, seed=2)[1]  # a bias of another dtype promotes like dense
    assert_matches_dense(_run_aarch64(variant, acts, W, b, tmp_path, mcpu), acts, W, b)


def _encode_aarch64(
    pre: torch.Tensor, thr: torch.Tensor | None, chunk: int, cap: int, threads: int, folder: Path, mcpu: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    exe = _cross_build(cpu_render.render_encode(pre.dtype), mcpu, folder / "bin")
    B, F = pre.shape
    pre_file, _ = _storage_file(pre.contiguous(), folder / "pre.bin")
    thr_file = "-"
    if thr is not None:  # as the product passes it: clamped at 0 in the dtype, then exactly in fp32
        thr_file, _ = _storage_file(torch.clamp_min(thr, 0).float().contiguous(), folder / "thr.bin")
    prefix = folder / "encoded"
    _qemu(exe, "encode", B, F, chunk, cap, threads, pre_file, thr_file, prefix)

    def read(suffix: str, dtype: torch.dtype) -> torch.Tensor:
        data = Path(f"{prefix}{suffix}").read_bytes()
        return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.zeros(0, dtype=dtype)

    offsets = read(".offsets", torch.int64)
    nnz = int(offsets[-1])
    idx, val = read(".idx", torch.int64)[:nnz], read(".val", pre.dtype)[:nnz]
    return offsets, idx, val, read(".status", torch.int32).tolist()


def _expected_encode(pre: torch.Tensor, thr: torch.Tensor | None, chunk: int):
    """The fired (pre > threshold clamped at 0, compared in fp32; a NaN threshold never fires) features of
    every chunk without a NaN or Inf, per row in feature order, with the pre-activations' bits."""
    B, F = pre.shape
    t = torch.zeros(F) if thr is None else torch.clamp_min(thr, 0).float()
    fired = pre.float() > t
    statuses = []
    for s in range(0, F, chunk):
        bad = not bool(pre[:, s : s + chunk].isfinite().all())
        statuses.append(1 if bad else None)
        if bad:
            fired[:, s : s + chunk] = False
    rows, cols = fired.nonzero(as_tuple=True)
    offsets = torch.zeros(B + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.bincount(rows, minlength=B), 0)
    return offsets, cols, pre[rows, cols], statuses


def _encode_cases(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(7)
    B, F = 7, 1000
    pre = torch.randn(B, F, generator=gen, dtype=torch.float64).to(dtype)
    thr = (torch.rand(F, generator=gen, dtype=torch.float64) * 0.8 - 0.1).to(dtype)  # some below 0
    pre[2] = pre[2].abs() + 1  # every feature of this row fires
    pre[4] = -1.0  # none of this one
    pre[1, 10:20] = thr[10:20]  # equal to the threshold: does not fire
    thr[30] = float("nan")  # a NaN threshold never fires
    pre[:, 30] = 5.0
    pre[0, 255], pre[6, 256] = 2.0, 3.0  # the last feature of one chunk and the first of the next
    with_nan = pre.clone()
    with_nan[3, 600] = float("nan")
    with_nan[5, 900] = float("inf")
    return pre, thr, with_nan


@pytest.mark.parametrize("dtype", list(DTYPE_IDS), ids=list(DTYPE_IDS.values()))
def test_encode_kernels_are_exact_on_aarch64(dtype, tmp_path):
    """The compaction bit for bit: ReLU and JumpReLU, slots enough, too few (the exact second pass) and
    none (a count), NaN and Inf chunks reported, ties with the threshold, threads 1 to 3."""
    _aarch64_tools()
    pre, thr, with_nan = _encode_cases(dtype)
    runs = [(pre, thr, 256, 7 * 256, 2), (pre, None, 256, 40, 3), (with_nan, thr, 256, 0, 1),
            (with_nan, None, 512, 100, 2)]  # fmt: skip
    seen: set[int] = set()
    for mcpu in AARCH64_CPUS:
        for p, t, chunk, cap, threads in runs:
            offsets, idx, val, status = _encode_aarch64(p, t, chunk, cap, threads, tmp_path, mcpu)
            e_offsets, e_idx, e_val, e_status = _expected_encode(p, t, chunk)
            assert [s == 1 for s in status] == [s == 1 for s in e_status]
            assert torch.equal(offsets, e_offsets) and torch.equal(idx, e_idx)
            bits = torch.int32 if dtype == torch.float32 else torch.int16
            assert torch.equal(val.view(bits), e_val.contiguous().view(bits))
            seen.update(status)
    assert seen == {0, 1, 2}  # slots enough, NaN or Inf, too few (the exact second pass)


def test_fp16_kernels_build_for_aarch64_without_the_x86_path(tmp_path):
    """The fp16 kernels' F16C path is guarded; on aarch64 the portable conversions build, with OpenMP."""
    cross, _ = _aarch64_tools()
    source = cpu.render(TWOPHASE, (torch.float16, torch.float16, torch.float16))
    assert "#if defined(__F16C__) && defined(__AVX__)" in source
    said = _qemu(_cross_build(source, AARCH64_CPUS[0], tmp_path / "bin"), "name")
    assert said.startswith(TWOPHASE.name) and ("openmp=1" in said) == bool(_openmp_flag(cross))
