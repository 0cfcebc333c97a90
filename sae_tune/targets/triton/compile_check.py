"""Ahead-of-time compilation of generated kernels for real GPU targets, without a GPU.

``triton.compile`` lowers each kernel to a cubin for the requested architecture (Triton ships ptxas);
``cuobjdump -res-usage`` then reports registers, local memory and shared memory per kernel. Local
memory is where ptxas puts spilled registers (the templates use no local arrays), so it is reported as
spill bytes.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from sae_tune.targets.triton.render import load_module, module_digest
from sae_tune.targets.triton.support import interpreter_active
from sae_tune.targets.triton.variant import Variant

ARCHS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# Pointer arguments by name; "act" means the activation / weight dtype.
_POINTERS = {
    "acts_ptr": "act",
    "vals_ptr": "act",
    "w_ptr": "act",
    "bias_ptr": "act",
    "out_ptr": "act",
    "cols_ptr": "i32",
    "counts_ptr": "i32",
    "block_counts_ptr": "i32",
    "slice_start_ptr": "i64",
    "row_ptr_ptr": "i64",
}
# Strides that are 1 for contiguous tensors: Triton specializes those at launch, so compile them so.
_UNIT_STRIDES = ("stride_af", "stride_wd", "stride_bias")


@dataclass(frozen=True)
class KernelUsage:
    """Resources of one compiled kernel."""

    kernel: str
    registers: int
    spills: int
    shared: int


@dataclass(frozen=True)
class CompileResult:
    """Compile outcome of one variant for one architecture (its kernels' worst case)."""

    variant: str
    arch: str
    dtype: str
    ok: bool
    registers: int | None
    spills: int | None
    shared: int | None
    error: str | None = None
    kernels: tuple[KernelUsage, ...] = ()

    def to_json(self) -> dict[str, object]:
        return {
            "variant": self.variant,
            "arch": self.arch,
            "dtype": self.dtype,
            "ok": self.ok,
            "registers": self.registers,
            "spills": self.spills,
            "shared": self.shared,
            "error": self.error,
            "kernels": [k.__dict__ for k in self.kernels],
        }


def parse_arch(arch: str) -> int:
    """'sm_90' -> 90, with a clear error for anything else."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def _kernel_names(variant: Variant) -> tuple[str, ...]:
    build = ("count_kernel", "fill_kernel") if variant.alloc == "exact" else ("fill_fixed_kernel",)
    return (*build, "decode_kernel")


def _signature(fn: object, dtype: str) -> tuple[dict[str, str], dict[str, object]]:
    signature: dict[str, str] = {}
    constexprs: dict[str, object] = {}
    for name in fn.arg_names:  # type: ignore[attr-defined]
        if name in _POINTERS:
            kind = _POINTERS[name]
            signature[name] = "*" + (dtype if kind == "act" else kind)
        elif name in _UNIT_STRIDES or name == "HAS_BIAS":
            signature[name] = "constexpr"
            constexprs[name] = True if name == "HAS_BIAS" else 1
        else:
            signature[name] = "i32"
    return signature, constexprs


_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """(registers, local bytes, static shared bytes) of a single-kernel cubin, from cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run(
            [_cuobjdump(), "-res-usage", handle.name], capture_output=True, text=True, check=True
        ).stdout
    match = _RES_USAGE.search(report)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{report}")
    reg, stack, shared, local = (int(g) for g in match.groups())
    return reg, local + stack, shared


_compiled: dict[tuple, KernelUsage] = {}


def compile_kernel(
    variant: Variant, kernel: str, arch: str, dtype: torch.dtype, num_warps: int, num_stages: int
) -> KernelUsage:
    """Compile one kernel of the variant's module for ``arch``; cached per process."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreter_active():
        raise RuntimeError(
            "ahead-of-time compilation needs real Triton kernels: run it without TRITON_INTERPRET"
        )
    key = (module_digest(variant), kernel, arch, dtype, num_warps, num_stages)
    if key in _compiled:
        return _compiled[key]
    fn = getattr(load_module(variant), kernel)
    signature, constexprs = _signature(fn, _TRITON_DTYPES[dtype])
    pointer_args = [i for i, name in enumerate(signature) if signature[name].startswith("*")]
    attrs = {(i,): [["tt.divisibility", 16]] for i in pointer_args}  # torch allocations are aligned
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
        target=GPUTarget("cuda", parse_arch(arch), 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    registers, spills, shared = resource_usage(compiled.asm["cubin"])
    usage = KernelUsage(kernel, registers, spills, max(shared, int(compiled.metadata.shared)))
    _compiled[key] = usage
    return usage


def compile_variant(variant: Variant, arch: str, dtype: torch.dtype = torch.float32) -> CompileResult:
    """Compile every kernel of ``variant``; a failure is reported, not raised."""
    dtype_name = str(dtype).removeprefix("torch.")
    try:
        usages = []
        for kernel in _kernel_names(variant):
            decode = kernel == "decode_kernel"
            warps = variant.num_warps if decode else variant.num_warps_build
            stages = variant.num_stages if decode else 1
            usages.append(compile_kernel(variant, kernel, arch, dtype, warps, stages))
    except Exception as exc:  # a compile error is a result of the check, not a crash of it
        first = str(exc).strip().splitlines()[:3]
        return CompileResult(
            variant.name,
            arch,
            dtype_name,
            False,
            None,
            None,
            None,
            f"{type(exc).__name__}: {' '.join(first)}",
        )
    return CompileResult(
        variant.name,
        arch,
        dtype_name,
        True,
        max(u.registers for u in usages),
        sum(u.spills for u in usages),
        max(u.shared for u in usages),
        kernels=tuple(usages),
    )


def compile_check(
    variants: Iterable[Variant],
    arch: str,
    dtype: torch.dtype = torch.float32,
    progress: Callable[[Iterable[Variant]], Iterable[Variant]] = iter,
) -> list[CompileResult]:
    """Compile a set of variants for one architecture; kernels shared by variants compile once."""
    parse_arch(arch)
    return [compile_variant(v, arch, dtype) for v in progress(list(variants))]
