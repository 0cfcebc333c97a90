"""The decode paths the benchmark compares, each as a full pipeline and (where it has one) split into
preparing the sparse structure and the kernel that consumes it.

Library paths come from ``sae_tune.targets.library.paths`` (the same callables the tuner races); the
Triton modes use the launchers of ``sae_tune.targets.triton.launch`` with default block sizes; the
dispatcher row calls ``sae_tune.sparse_decode`` without a variant, and is reported as not available
while that needs one.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sae_tune.autotune.workload import max_l0_candidates
from sae_tune.bench.problem import Problem
from sae_tune.targets import GENERATED, Target
from sae_tune.targets.library.paths import TORCH_PATHS
from sae_tune.targets.triton.variant import Variant

Full = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Prepare = Callable[[torch.Tensor], Any]
Kernel = Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]

DENSE = "dense"
COMPILED = "dense (torch.compile)"
SPARSE_CSR = "torch.sparse.mm (CSR)"
EMBEDDING_BAG = "embedding_bag"
EMBEDDING_BAG_CROW = "embedding_bag (CSR bags)"
DISPATCHER = "dispatcher"
EXACT = "triton exact"
VALIDATE = "triton fixed+validate"
FALLBACK = "triton fixed+fallback"
UNCHECKED = "triton fixed unchecked"
TRITON_MODES = (EXACT, VALIDATE, FALLBACK, UNCHECKED)


@dataclass(frozen=True)
class BenchPath:
    """One row of a table. ``unavailable`` says why it cannot run here (the row is reported, not timed)."""

    name: str
    full: Full | None
    prepare: Prepare | None = None
    kernel: Kernel | None = None
    max_l0: int | None = None
    triton: bool = False
    unavailable: str | None = None
    note: str = ""

    @property
    def splits(self) -> bool:
        return self.prepare is not None and self.kernel is not None


def _csr(acts: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return acts.to_sparse_csr()


def _bags(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(feature ids, bag offsets, weights) of the non-zeros, as ``embedding_bag_csr`` builds them."""
    token, feature = acts.nonzero().unbind(1)
    counts = torch.bincount(token, minlength=acts.shape[0])
    offsets = torch.zeros(acts.shape[0] + 1, dtype=torch.int64, device=acts.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return feature, offsets, acts[token, feature]


def _bag_kernel(bags: tuple[torch.Tensor, torch.Tensor, torch.Tensor], W: torch.Tensor, b: torch.Tensor):
    feature, offsets, weights = bags
    out = F.embedding_bag(
        feature, W, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True
    )
    return out + b


def _crow_bags(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    csr = _csr(acts)
    return csr.col_indices(), csr.crow_indices(), csr.values()


def library_paths(device: torch.device, dtype: torch.dtype, *, split_extras: bool = False) -> list[BenchPath]:
    """Dense, torch.sparse.mm on CSR and embedding_bag; ``split_extras`` adds embedding_bag fed from
    ``to_sparse_csr()`` (table 2 shows what the preparation costs for each way to build the bags)."""
    paths = [BenchPath(DENSE, TORCH_PATHS["dense"].build())]
    if TORCH_PATHS["sparse_csr"].supports(dtype, device):
        paths.append(
            BenchPath(
                SPARSE_CSR,
                TORCH_PATHS["sparse_csr"].build(),
                prepare=_csr,
                kernel=lambda csr, W, b: torch.sparse.mm(csr, W) + b,
            )
        )
    else:
        reason = f"torch.sparse.mm has no CSR kernel for {dtype} on {device.type}"
        paths.append(BenchPath(SPARSE_CSR, None, unavailable=reason))
    paths.append(
        BenchPath(EMBEDDING_BAG, TORCH_PATHS["embedding_bag_csr"].build(), prepare=_bags, kernel=_bag_kernel)
    )
    paths += generated_paths(device, dtype)
    if split_extras:
        paths.append(
            BenchPath(
                EMBEDDING_BAG_CROW,
                TORCH_PATHS["embedding_bag_crow"].build(),
                prepare=_crow_bags,
                kernel=_bag_kernel,
            )
        )
    return paths


def generated_paths(device: torch.device, dtype: torch.dtype) -> list[BenchPath]:
    """The default variant of every generated target that runs for real here (the C kernels on CPU; on
    CUDA the Triton default, beside the Triton modes below). One fused pass: no prepare/kernel split."""
    rows = []
    for target in GENERATED:
        name = f"{target.name} (generated default)"
        if not target.timed(device):
            continue
        if dtype not in target.dtypes():
            rows.append(BenchPath(name, None, unavailable=f"the {target.name} kernels do not take {dtype}"))
            continue
        rows.append(BenchPath(name, _default_variant_of(target, dtype)))
    return rows


def _default_variant_of(target: Target, dtype: torch.dtype) -> Full:
    """Runs the target's default variant for the shape of W_dec (built on the warm-up call, not timed)."""
    built: dict[tuple[int, int], Full] = {}

    def full(a: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        fn = built.get(tuple(W.shape))
        if fn is None:
            default = target.default(W.shape[0], W.shape[1], dtype)
            if default is None:
                raise RuntimeError(f"the {target.name} target has no default variant for {dtype}")
            fn = built[tuple(W.shape)] = target.build(*default)
        return fn(a, W, b)

    return full


def compiled_dense_path() -> BenchPath:
    """``torch.compile`` of the dense expression; compiling happens on the first call, which the
    benchmark makes before timing (a compiler failure there becomes an error row)."""
    try:
        compiled = torch.compile(lambda a, W, b: a @ W + b, dynamic=False)
    except Exception as exc:  # torch.compile itself refused (no compiler backend on this platform)
        return BenchPath(COMPILED, None, unavailable=f"torch.compile: {type(exc).__name__}: {exc}")
    return BenchPath(COMPILED, compiled)


# --- Triton modes -------------------------------------------------------------------------------------


def triton_caps(problem: Problem) -> tuple[int, int]:
    """(p99 cap, max cap) of the problem's per-token L0, rounded up to 16 and capped by the width."""
    caps = max_l0_candidates(problem.stats, limit=problem.spec.width)
    return caps[0], caps[-1]


def _triton_path(name: str, variant: Variant, allow_truncation: bool, note: str) -> BenchPath:
    from sae_tune.decode import sparse_decode
    from sae_tune.targets.triton.launch import build_sparse, check_overflow, decode_sparse

    def full(a: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sparse_decode(a, W, b, variant=variant, allow_truncation=allow_truncation)

    def prepare(a: torch.Tensor):
        view = build_sparse(a, variant)
        check_overflow(view, allow_truncation=allow_truncation)
        return view

    def kernel(view, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return decode_sparse(view, W, b, torch.promote_types(W.dtype, b.dtype))

    max_l0 = variant.max_l0 if variant.alloc == "fixed" else None
    return BenchPath(name, full, prepare, kernel, max_l0=max_l0, triton=True, note=note)


def triton_paths(problem: Problem) -> list[BenchPath]:
    """The four kernel modes at default block sizes. fixed+fallback gets the p99 cap (over-full tokens
    take its exact fallback), validate and unchecked get the largest count of the batch (no token may
    exceed it: unchecked would truncate, validate would raise)."""
    p99, top = triton_caps(problem)
    paths = [
        _triton_path(EXACT, Variant(), False, "exact allocation (one host sync for the size)"),
        _triton_path(
            VALIDATE,
            Variant(alloc="fixed", overflow="validate", max_l0=top),
            False,
            "cap = largest count of the batch",
        ),
        _triton_path(
            FALLBACK,
            Variant(alloc="fixed", overflow="fallback", max_l0=p99),
            False,
            "cap = p99 of the batch; heavier tokens take the no-sync fallback",
        ),
    ]
    if problem.stats.max <= top:
        paths.append(
            _triton_path(
                UNCHECKED,
                Variant(alloc="fixed", overflow="unchecked", max_l0=top),
                True,
                "allow_truncation=True; no token of this batch exceeds the cap",
            )
        )
    else:  # pragma: no cover - top is the rounded-up maximum, so this only guards later edits
        paths.append(BenchPath(UNCHECKED, None, unavailable="a token exceeds every cap: it would truncate"))
    return paths


# --- the dispatcher -----------------------------------------------------------------------------------


def dispatcher_unavailable_reason() -> str | None:
    """None when ``sae_tune.sparse_decode`` can be called without a variant (the dispatcher decides)."""
    import sae_tune

    try:
        params = inspect.signature(sae_tune.sparse_decode).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
        return "cannot inspect sae_tune.sparse_decode"
    variant = params.get("variant")
    if variant is not None and variant.default is inspect.Parameter.empty:
        return "sae_tune.sparse_decode still requires variant= (the dispatcher has not landed)"
    return None


def explain_choice(problem: Problem) -> str:
    """What ``sae_tune.explain`` says it chose for this problem, on one short line ("" if it cannot)."""
    import sae_tune

    explain = getattr(sae_tune, "explain", None)
    if explain is None:
        return ""
    try:
        text = str(explain(problem.acts, problem.W_dec, problem.b_dec))
    except Exception as exc:  # explain is informative only; its failure must not stop the benchmark
        return f"explain() failed: {type(exc).__name__}: {exc}"[:200]
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def dispatcher_path(problem: Problem) -> BenchPath:
    """``sae_tune.sparse_decode(acts, W_dec, b_dec)`` with no variant; its note is ``explain``'s answer."""
    reason = dispatcher_unavailable_reason()
    if reason is not None:
        return BenchPath(DISPATCHER, None, unavailable=reason)
    import sae_tune
    from sae_tune.dispatch import reload

    # Each bench problem stands for another SAE; the dispatcher keeps one decision per (device, dtype,
    # F, D, batch bucket), so an L0 sweep at one shape would otherwise reuse the first point's choice.
    reload()

    def full(a: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return sae_tune.sparse_decode(a, W, b)

    return BenchPath(DISPATCHER, full, note=explain_choice(problem))


def comparison_paths(problem: Problem, *, triton: bool, dispatcher: bool = True) -> list[BenchPath]:
    """The rows of a sweep point: library paths, the Triton modes where they run, the dispatcher."""
    device, dtype = problem.acts.device, problem.acts.dtype
    paths = library_paths(device, dtype)
    if triton:
        paths += triton_paths(problem)
    if dispatcher:
        paths.append(dispatcher_path(problem))
    return paths
