"""Ahead-of-time compilation of generated kernels for real GPU targets, without a GPU.

Each kernel is compiled from the arguments the launcher passes for the shape checked (``launch.
representative_launches``, on meta tensors), specialised by Triton's own rule for launch arguments
(``native_specialize_impl``: integers equal to 1 become constants, pointers and integers divisible by 16
are marked so), so what is compiled is the code a GPU would run. ``triton.compile`` lowers each kernel to
a cubin for the requested architecture (Triton ships ptxas); ``cuobjdump -res-usage`` reports registers,
local memory (the templates use no local arrays, so it is spills) and shared memory, and ``cuobjdump
-sass`` the machine code, from which each kernel's ``sass`` facts are read: ``ldg128`` (128-bit global
loads, the W_dec gather's width), ``ldg_narrow`` (global loads narrower than 128 bits: scalar index and
value loads), ``barriers_in_loop`` (BAR instructions inside a loop of the kernel).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch

from sae_tune.targets.triton.compile_facts import pruned_reason
from sae_tune.targets.triton.launch import Launch, module_for, representative_launches
from sae_tune.targets.triton.render import module_digest
from sae_tune.targets.triton.support import interpreter_active
from sae_tune.targets.triton.variant import Variant

ARCHS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}
# The shape whose launch arguments are specialised when none is given (gemma-2b-l20, as the CLI's default)
DEFAULT_SHAPE = (65536, 2304)


@dataclass(frozen=True)
class KernelUsage:
    """Resources of one compiled kernel."""

    kernel: str
    registers: int
    spills: int
    shared: int
    sass: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class CompileResult:
    """Compile outcome of one variant for one architecture: its kernels, or the error (a compile error
    is a result of the check, not a crash of it). Registers, spills and shared memory are the kernels'
    worst case."""

    variant: str
    arch: str
    dtype: str
    ok: bool
    kernels: tuple[KernelUsage, ...] = ()
    error: str | None = None

    @property
    def registers(self) -> int | None:
        return max(k.registers for k in self.kernels) if self.ok else None

    @property
    def spills(self) -> int | None:
        return sum(k.spills for k in self.kernels) if self.ok else None

    @property
    def shared(self) -> int | None:
        return max(k.shared for k in self.kernels) if self.ok else None

    @property
    def pruned(self) -> str | None:
        """Why the tuner leaves this variant out with the installed Triton on this architecture (the
        compile facts record it spilling there), or None."""
        from sae_tune.device import triton_version

        return pruned_reason(self.variant, triton_version(), self.arch, self.dtype)

    @property
    def status(self) -> str:
        """The row's word, which agrees with compile-check's exit code: "ok" only for a variant that
        compiled without spills; "pruned" for one the compile facts leave out of the space here (whatever
        it spills); "SPILLS" and "FAILED" make the command exit 1."""
        if not self.ok:
            return "FAILED"
        if self.pruned is not None:
            return "pruned"
        return "SPILLS" if self.spills else "ok"

    @property
    def passed(self) -> bool:
        """Whether this result lets compile-check exit 0."""
        return self.status in ("ok", "pruned")

    def to_json(self) -> dict[str, object]:
        return {
            "variant": self.variant,
            "arch": self.arch,
            "dtype": self.dtype,
            "ok": self.ok,
            "status": self.status,
            "pruned": self.pruned,
            "registers": self.registers,
            "spills": self.spills,
            "shared": self.shared,
            "error": self.error,
            "kernels": [dict(k.__dict__) for k in self.kernels],
        }

    @classmethod
    def of(
        cls, variant: str, arch: str, dtype: torch.dtype, kernels: Callable[[], Iterable[KernelUsage]]
    ) -> Self:
        """The result of compiling ``kernels()``; an exception becomes a failed result naming it."""
        dtype_name = str(dtype).removeprefix("torch.")
        try:
            usages = tuple(kernels())
        except Exception as exc:
            first = " ".join(str(exc).strip().splitlines()[:3])
            return cls(variant, arch, dtype_name, False, error=f"{type(exc).__name__}: {first}")
        return cls(variant, arch, dtype_name, True, usages)


def parse_arch(arch: str) -> int:
    """'sm_90' -> 90, with a clear error for anything else."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def specialised(fn: Any, launch: Launch) -> tuple[dict[str, str], dict[str, object], dict]:
    """Signature, constants and attributes of ``launch``'s arguments, as Triton derives them at launch."""
    from triton.backends.compiler import BaseBackend

    try:
        from triton.runtime.jit import native_specialize_impl
    except ImportError:  # Triton <= 3.5 specialised in Python, with another API
        import triton

        raise RuntimeError(
            f"ahead-of-time compilation needs Triton >= 3.6 (its launch specialisation, "
            f"native_specialize_impl); Triton {triton.__version__} is installed"
        ) from None

    values = dict(zip(fn.arg_names, launch.args, strict=False))  # constexprs follow by name
    values.update(launch.constexprs)
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        value = values[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = spec
        elif spec and "D" in spec:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def cuobjdump_run(flag: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        return subprocess.run(
            [_cuobjdump(), flag, handle.name], capture_output=True, text=True, check=True
        ).stdout


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_BRANCH = re.compile(r"\bBRA\b.*?\b(0x[0-9a-f]+)")


def sass_facts(sass: str) -> dict[str, object]:
    """Facts of one kernel's SASS: 128-bit global loads, barriers inside loops (a loop is a branch back
    to an earlier address; its body is the addresses between the target and the branch)."""
    code = [(int(m.group(1), 16), m.group(2).strip()) for m in _SASS_LINE.finditer(sass)]
    loops = []
    for addr, op in code:
        branch = _BRANCH.search(op)
        if branch and int(branch.group(1), 16) < addr:  # a branch to itself is the trap after EXIT
            loops.append((int(branch.group(1), 16), addr))
    barriers = [addr for addr, op in code if re.search(r"\bBAR\b", op)]
    return {
        "ldg128": any(re.search(r"\bLDG\.E\.128\b", op) for _, op in code),
        "ldg_narrow": sum(
            bool(re.search(r"\bLDG\b", op) and not re.search(r"\.128\b", op)) for _, op in code
        ),
        "barriers": len(barriers),
        "barriers_in_loop": sum(any(lo <= a <= hi for lo, hi in loops) for a in barriers),
        "loops": len(loops),
        "instructions": len(code),
    }


def resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, local bytes, static shared bytes) of a single-kernel cubin, from cuobjdump."""
    report = cuobjdump_run("-res-usage", cubin)
    match = _RES_USAGE.search(report)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{report}")
    reg, stack, shared, local = (int(g) for g in match.groups())
    return reg, local + stack, shared


_compiled: dict[tuple, KernelUsage] = {}


def compile_kernel(
    fn: Any,
    launch: Launch,
    arch: str,
    spec: tuple[dict[str, str], dict[str, object], dict] | None = None,
    facts: Callable[[str], dict[str, object]] = sass_facts,
) -> KernelUsage:
    """Compile kernel ``fn`` for ``arch`` with ``launch``'s specialisation (``spec``: ``specialised(fn,
    launch)`` if the caller has it) and read its resources and, with ``facts``, its SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreter_active():
        raise RuntimeError(
            "ahead-of-time compilation needs real Triton kernels: run it without TRITON_INTERPRET"
        )
    signature, constexprs, attrs = spec if spec is not None else specialised(fn, launch)
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", parse_arch(arch), 32),
        options={"num_warps": launch.num_warps, "num_stages": launch.num_stages},
    )
    cubin = compiled.asm["cubin"]
    registers, spills, shared = resource_usage(cubin)
    sass = facts(cuobjdump_run("-sass", cubin))
    return KernelUsage(launch.kernel, registers, spills, max(shared, int(compiled.metadata.shared)), sass)


def compile_launch(variant: Variant, launch: Launch, arch: str) -> KernelUsage:
    """Compile one launch's kernel, specialised for its arguments, for ``arch``; cached per process."""
    fn = getattr(module_for(variant), launch.kernel)
    spec = specialised(fn, launch)
    key = (module_digest(variant), launch.kernel, arch, *map(repr, spec), launch.num_warps, launch.num_stages)
    if key not in _compiled:
        _compiled[key] = compile_kernel(fn, launch, arch, spec)
    return _compiled[key]


def compile_variant(
    variant: Variant,
    arch: str,
    dtype: torch.dtype = torch.float32,
    F: int | None = None,
    D: int | None = None,
) -> CompileResult:
    """Compile every kernel of ``variant`` as launched for an (F, D) SAE; a failure is reported."""
    F = DEFAULT_SHAPE[0] if F is None else F
    D = DEFAULT_SHAPE[1] if D is None else D

    def kernels() -> list[KernelUsage]:
        return [
            compile_launch(variant, launch, arch) for launch in representative_launches(variant, F, D, dtype)
        ]

    return CompileResult.of(variant.name, arch, dtype, kernels)


def compile_check(
    variants: Iterable[Variant],
    arch: str,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[Iterable[Variant]], Iterable[Variant]] = iter,
    F: int | None = None,
    D: int | None = None,
) -> list[CompileResult]:
    """Compile a set of variants for one architecture, specialised for an (F, D) SAE (default: the
    gemma-2b-l20 shape); kernels shared by variants compile once."""
    parse_arch(arch)
    return [compile_variant(v, arch, dtype, F, D) for v in progress(list(variants))]


def summary(results: list[CompileResult], arch: str, claim: str = "variants compiled without spills") -> str:
    """compile-check's closing line for one architecture: how many rows are "ok", and which the compile
    facts prune with the installed Triton (a pruned spill is stated, not hidden)."""
    from sae_tune.device import triton_version

    clean = sum(r.status == "ok" for r in results)
    line = f"{arch}: {clean} of {len(results)} {claim}"
    pruned = [r for r in results if r.status == "pruned"]
    if pruned:
        named = ", ".join(f"{r.variant} (spills {r.spills})" for r in pruned)
        line += f"; pruned from the space with Triton {triton_version()} by the compile facts: {named}"
    return line
