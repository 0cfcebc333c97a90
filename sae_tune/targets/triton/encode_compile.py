"""Ahead-of-time compilation of the encode kernels for real GPU targets, without a GPU.

Each kernel of an ``EncodeVariant`` is compiled from the arguments ``encode.representative_launches``
passes (meta tensors), specialised by Triton's own launch rule (``compile_check.specialised``), lowered to
a cubin by Triton's ptxas, and read back with cuobjdump: registers, spills (local memory), shared memory,
and from the SASS whether the GEMM runs on tensor cores (``HMMA`` on sm_80/sm_89, ``HGMMA`` or ``HMMA`` on
sm_90) and whether global loads are 128 bits wide (``LDG.E.128``). fp32 inputs are multiplied in IEEE
fp32 (never tf32), so their GEMM is FFMA, not MMA: ``mma`` is False for them by design.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sae_tune.targets.triton.compile_check import (
    CompileResult,
    KernelUsage,
    compile_kernel,
    sass_facts,
)
from sae_tune.targets.triton.encode import EncodeVariant, load_encode_module, representative_launches
from sae_tune.targets.triton.launch import Launch

# The shape whose launch arguments are specialised when none is given (gemma-2b-l20, as compile-check's)
DEFAULT_SHAPE = (65536, 2304)
# Shared memory one block may use (bytes), per architecture: a kernel above it compiles but cannot launch
SHARED_LIMIT = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}
_MMA = re.compile(r"\b(HGMMA|HMMA)\b")
_LDGSTS128 = re.compile(r"\bLDGSTS\.E\S*\.128\b")


def gemm_facts(sass: str) -> dict[str, object]:
    """Tensor-core instructions in one kernel's SASS (HGMMA: Hopper warpgroup MMA; HMMA) and 128-bit
    asynchronous global-to-shared copies (``LDGSTS...128``: how the pipelined GEMM loads its tiles)."""
    found = _MMA.findall(sass)
    hgmma, hmma = found.count("HGMMA"), found.count("HMMA")
    kind = "HGMMA" if hgmma else "HMMA" if hmma else None
    return {
        "mma": bool(found),
        "hgmma": hgmma,
        "hmma": hmma,
        "mma_kind": kind,
        "ldgsts128": bool(_LDGSTS128.search(sass)),
    }


@dataclass(frozen=True)
class EncodeCompileResult(CompileResult):
    """Compile outcome of one encode variant for one architecture and dtype, with ``fits``."""

    @property
    def fits(self) -> bool:
        """Compiled, and every kernel's shared memory within the architecture's per-block limit."""
        return self.ok and all(k.shared <= SHARED_LIMIT[self.arch] for k in self.kernels)

    @property
    def status(self) -> str:
        """The row's word: ok; pruned (the compile facts leave it out of the tuned space here, whatever
        it spills); or what makes compile-check exit 1: FAILED, TOO MUCH SHARED MEMORY, SPILLS."""
        if not self.ok:
            return "FAILED"
        if self.pruned is not None:
            return "pruned"
        if not self.fits:
            return "TOO MUCH SHARED MEMORY"
        return "SPILLS" if self.spills else "ok"

    def to_json(self) -> dict[str, object]:
        return {**super().to_json(), "fits": self.fits}


def encode_facts(sass: str) -> dict[str, object]:
    """The decode family's SASS facts and the GEMM's (tensor cores, asynchronous tile copies)."""
    return {**sass_facts(sass), **gemm_facts(sass)}


def compile_encode_launch(variant: EncodeVariant, launch: Launch, arch: str) -> KernelUsage:
    """Compile one encode launch's kernel, specialised for its arguments, for ``arch``."""
    return compile_kernel(
        getattr(load_encode_module(variant), launch.kernel), launch, arch, facts=encode_facts
    )


def compile_encode(
    variant: EncodeVariant,
    arch: str,
    dtype: torch.dtype = torch.float16,
    F: int | None = None,
    D: int | None = None,
    activation: str = "jumprelu",
) -> EncodeCompileResult:
    """Compile both kernels of ``variant`` as launched for an (F, D) SAE; a failure is reported."""
    F = DEFAULT_SHAPE[0] if F is None else F
    D = DEFAULT_SHAPE[1] if D is None else D

    def kernels() -> list[KernelUsage]:
        launches = representative_launches(variant, F, D, dtype, activation=activation)
        return [compile_encode_launch(variant, launch, arch) for launch in launches]

    return EncodeCompileResult.of(variant.name, arch, dtype, kernels)
