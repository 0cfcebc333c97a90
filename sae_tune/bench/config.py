"""What ``sae-tune bench`` measures: shapes, sweep points and repeats, for the full and the quick run.

A config is plain numbers so that a test can shrink every shape (a tiny config runs the whole benchmark
end to end in seconds) without touching the measurement code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sae_tune.specs import SAESpec, get_spec, spec_from_shape


@dataclass(frozen=True)
class ShapeCase:
    """One real SAE shape of table 5: a label for the table and the spec measured."""

    label: str
    spec: SAESpec
    note: str = ""


def _preset(label: str, name: str) -> ShapeCase:
    return ShapeCase(label, get_spec(name))


# Gemma Scope 2 9B residual SAEs come in 16k, 131k and 1m widths: there is no 65k release, so the 9B L20
# 65k shape of the published table is an explicit shape (D of Gemma 2 9B, L0 of the 2B 65k SAEs).
REAL_SHAPES: tuple[ShapeCase, ...] = (
    _preset("Gemma Scope 2B L20 65k", "gemma-2b-l20"),
    ShapeCase(
        "Gemma Scope 9B L20 65k",
        spec_from_shape(65536, 3584, 72, name="gemma-9b-l20-65k-shape"),
        "explicit shape: Gemma Scope has no 9B 65k residual release; L0 72 assumed",
    ),
    _preset("Gemma Scope 2B L12 65k", "gemma-2b-l12-65k"),
    _preset("Gemma Scope 2B L12 262k", "gemma-2b-l12-262k"),
    _preset("Qwen Scope 2B 32k (TopK 50)", "qwen3.5-2b-topk50"),
)


@dataclass(frozen=True)
class ForwardCase:
    """One SAE shape of the SAE forward table: the batch sizes measured, and whether they are timed.

    timed=False measures extra peak memory only (one forward per mode instead of several): for shapes
    whose forward takes minutes on a CPU.
    """

    label: str
    spec: SAESpec
    batches: tuple[int, ...]
    timed: bool = True

    def __post_init__(self) -> None:
        if self.spec.arch != "jumprelu":
            raise ValueError(f"ForwardCase {self.label!r}: the SAE forward table builds JumpReLU SAEs only")
        if not self.batches or any(type(b) is not int or b < 1 for b in self.batches):
            raise ValueError(
                f"ForwardCase {self.label!r}: batches must be positive ints, got {self.batches!r}"
            )


# The goals are stated at gemma-2b-l20 (B=1024) and, for peaks, the 262k Gemma Scope 2B L12 shape
# at B=4096 (whose unpatched forward needs about 17 GB of dense activations).
FORWARD_CASES: tuple[ForwardCase, ...] = (
    ForwardCase("Gemma Scope 2B L20 65k", get_spec("gemma-2b-l20"), (32, 1024, 4096)),
    ForwardCase("Gemma Scope 2B L12 262k", get_spec("gemma-2b-l12-262k"), (4096,), timed=False),
)


@dataclass(frozen=True)
class BenchConfig:
    """Every size the benchmark uses.

    batch, width, d_model, l0   the reference shape of tables 1, 2, 6 and 7 (and the fixed axes of the
                                sweeps).
    rounds                      interleaved timing rounds per comparison (CPU: at least 3, fewer when a
                                round is slower than ``budget_s`` allows; CUDA: ``cuda_rounds`` do_bench
                                medians).
    copy_mib                    size of the tensor copied to measure the device's copy bandwidth.
    flush_mib                   CPU only: MiB rewritten before every timed call so that each starts with
                                a cold cache; None = twice the last-level cache (64 MiB .. 1 GiB), 0 = off.
    compile_dense               include ``torch.compile``d dense in table 1 (it compiles once per shape).
    forward_cases               the SAE forward table's shapes and batch sizes (SAELens JumpReLU SAEs).
    """

    batch: int = 32
    width: int = 65536
    d_model: int = 768
    l0: int = 64
    l0_sweep: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
    width_sweep: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536, 131072)
    shapes: tuple[ShapeCase, ...] = REAL_SHAPES
    memory_batches: tuple[int, ...] = (32, 256, 1024)
    memory_max_l0s: tuple[int, ...] = (128, 256)
    batch_sweep: tuple[int, ...] = (1, 4, 16, 32, 64, 256, 1024, 4096)
    rounds: int = 15
    cuda_rounds: int = 3
    budget_s: float = 10.0
    copy_mib: int = 512
    flush_mib: int | None = None
    compile_dense: bool = True
    forward_cases: tuple[ForwardCase, ...] = FORWARD_CASES
    seed: int = 0
    name: str = "full"

    def __post_init__(self) -> None:
        for field in ("batch", "width", "d_model", "l0", "rounds", "cuda_rounds", "copy_mib"):
            value = getattr(self, field)
            if type(value) is not int or value < 1:
                raise ValueError(f"BenchConfig.{field} must be a positive int, got {value!r}")
        if self.flush_mib is not None and (type(self.flush_mib) is not int or self.flush_mib < 0):
            raise ValueError(f"BenchConfig.flush_mib must be None or an int >= 0, got {self.flush_mib!r}")
        if self.l0 > self.width:
            raise ValueError(f"BenchConfig.l0 ({self.l0}) exceeds the width ({self.width})")
        if self.batch not in self.batch_sweep:
            raise ValueError("BenchConfig.batch_sweep must hold the reference batch (table 7 reads it)")
        sweeps = ("l0_sweep", "width_sweep", "memory_batches", "memory_max_l0s", "batch_sweep")
        for field in sweeps:
            values = getattr(self, field)
            if not values or any(type(v) is not int or v < 1 for v in values):
                raise ValueError(f"BenchConfig.{field} must be non-empty positive ints, got {values!r}")
        if any(v > self.width for v in self.l0_sweep):
            raise ValueError(f"BenchConfig.l0_sweep has an L0 above the width {self.width}")
        if any(self.l0 > w for w in self.width_sweep):
            raise ValueError(f"BenchConfig.width_sweep has a width below L0 {self.l0}")
        if any(not isinstance(c, ForwardCase) for c in self.forward_cases):
            raise ValueError("BenchConfig.forward_cases must hold ForwardCase values")


FULL = BenchConfig()

# Fewer sweep points, fewer rounds and a smaller time budget per comparison; every table and every real
# shape of table 5 is kept. The SAE forward table keeps gemma-2b-l20 at B=32 and 1024 only.
QUICK = replace(
    FULL,
    l0_sweep=(16, 64, 256, 1024, 4096, 16384),
    width_sweep=(4096, 16384, 65536, 131072),
    batch_sweep=(1, 32, 256, 1024),
    rounds=7,
    budget_s=3.0,
    copy_mib=256,
    forward_cases=(ForwardCase("Gemma Scope 2B L20 65k", get_spec("gemma-2b-l20"), (32, 1024)),),
    name="quick",
)
