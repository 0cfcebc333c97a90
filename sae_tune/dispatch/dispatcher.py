"""The dispatcher: for each decode, the fastest correct path known for this device, dtype and shape.

Order of lookup for a call with N tokens (batch bucket = next power of two of N):

1. ``cache``   the local cache's winner for this device, dtype, F, D and batch bucket;
2. ``nearest`` the local winner of the nearest batch bucket (or measured with other software versions);
   for one key a time measured here ranks above an imported one;
3. ``shipped`` the shipped per-GPU configs of this device model (``sae_tune.cache.share.load_shipped``),
   only within a factor of 2 of their batch bucket;
4. ``model``   the cost model (``costmodel``), at the mean L0 of the first batch of that shape
               (``explain`` quotes the costs at the mean L0 of the batch it is given);
5. ``dense``   when nothing else applies.

The L0 bucket of a cache key is the tuned SAE's calibration L0, not a per-batch number. A call is matched
on the key without it; only when entries of several L0 buckets for the same shape and batch bucket name
different code is the batch's own mean L0 counted (one ``count_nonzero``) to pick the nearest bucket.

Everything is decided once per (device, dtype, F, D, batch bucket, promise) and kept in memory; the cache
file is read on first use and again only after ``reload()``. Each option is verified against the exact
product on first use; one that fails is skipped, with a ``DispatchWarning``, for the rest of the process.
A batch whose result overflows the output dtype cannot decide: it runs dense and the option is verified
again on the next call. An option whose error grows with the non-zeros per token (a 16-bit accumulation:
``Target.density_sensitive``) is trusted only up to the largest per-token L0 it was verified at; a denser
batch verifies it again (one count per call, only for such options).

Every combination the dense expression takes gets its result: a bias of another dtype than W_dec, or of
a shape that broadcasts (``()``, ``(1, D)``, ``(B, D)`` ...), is added by torch after the product, which
the chosen path computes in W_dec's dtype, exactly as ``acts @ W_dec + b_dec`` rounds and promotes. Other
device types than CPU and CUDA (``mps``, ``xpu``, ``meta`` ...) are left to torch, and ``explain`` says so.

Under ``torch.autocast`` a call gives the dtype ``acts @ W_dec`` gives there: the activations are cast as
autocast would cast them; when W_dec itself would need casting, the call is left to torch (autocast
caches that cast of a weight, a per-call cast would cost as much as the dense product).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_tune import forksafe
from sae_tune.dispatch import costmodel
from sae_tune.dispatch.decision import Decision, DispatchWarning, Option
from sae_tune.dispatch.grad import DecodeFn, needs_grad, with_dense_backward
from sae_tune.dispatch.identity import device_identity
from sae_tune.dispatch.runtime import build, gate, verify
from sae_tune.inputs import DecodeInputs, autocast_cast, autocast_dtype, bias_after, check_decode_inputs
from sae_tune.sparse_acts import SparseActs
from sae_tune.targets import GENERATED, TARGETS, CallFacts, target_of

log = logging.getLogger("sae_tune")

DENSE_CONFIG: dict[str, Any] = {}


def bypass_reason(*tensors: Any) -> str | None:
    """Why a call must be left to torch as written (``acts @ W_dec + b_dec``), or None.

    Tracing and function transforms need torch ops they can see through; tensor subclasses, sparse
    layouts and other device types keep their own matmul semantics.
    """
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and compiler.is_compiling():
        return "torch.compile is tracing"
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return "TorchScript is tracing"
    if getattr(torch._C, "_are_functorch_transforms_active", lambda: False)():
        return "a torch.func transform is active"
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:
        return "forward-mode AD is active"
    other_device = None
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue  # None bias, or a wrong type that the input checks report
        cls = type(t)
        if cls is not torch.Tensor and cls is not torch.nn.Parameter:
            return f"{cls.__name__} inputs"
        if t.layout is not torch.strided:
            return f"{t.layout} inputs"
        if not (t.is_cpu or t.is_cuda):
            other_device = f"device type {t.device.type}"
    # inputs on different devices are a ValueError naming them (the checks), not torch's error
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0}
    return other_device if len(devices) <= 1 else None


def _dense_expression(acts: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None) -> torch.Tensor:
    out = acts @ W_dec
    return out if b_dec is None else out + b_dec


def _empty(acts: Any) -> bool:
    """No tokens or no features: nothing to gather, so torch's own expression (and its errors) apply."""
    return isinstance(acts, torch.Tensor) and acts.numel() == 0


def _check_k(k: Any) -> int | None:
    if k is None:
        return None
    if type(k) is not int or k < 1:
        raise ValueError(f"k must be a positive int (no token has more than k non-zeros) or None, got {k!r}")
    return k


def _autocast_step(feature_acts: Any, W_dec: Any) -> tuple[Any, str | None]:
    """Under autocast: (activations cast as autocast would cast them, None), or (_, why the call is left
    to torch). Without autocast: (feature_acts, None)."""
    if not (isinstance(feature_acts, torch.Tensor) and isinstance(W_dec, torch.Tensor)):
        return feature_acts, None  # the input checks name what is wrong
    target = autocast_dtype(feature_acts)
    if target is None:
        return feature_acts, None
    if autocast_cast(W_dec, target) is not W_dec:
        return feature_acts, f"autocast casts W_dec to {str(target).removeprefix('torch.')}"
    return autocast_cast(feature_acts, target), None


@dataclass
class _Plan:
    """Decided once per call key: gated options by tier, then the model's choice, then dense."""

    tiers: list[tuple[Option, ...]]
    skipped: list[str]
    model: Option | None = None
    model_l0: float | None = None  # the mean L0 the model's choice was made at
    settled: Option | None = None  # the verified, unambiguous choice, once known
    lock: threading.Lock = field(default_factory=threading.Lock)


class Dispatcher:
    """Chooses and runs the decode path. ``sae_tune.sparse_decode`` uses a process-wide instance.

    cache            the SQLite cache to read (default: ``$SAE_TUNE_CACHE`` or the user cache dir).
    shipped_dir      folder of shipped per-GPU files (default: ``$SAE_TUNE_SHIPPED_DIR`` or the package's).
    local_records / shipped_records  winners given in Python instead of reading files (their configs are
                     validated like a file's; a Triton config on a CPU key runs only under Triton's
                     interpreter, i.e. in tests).
    """

    def __init__(
        self,
        cache: str | os.PathLike[str] | None = None,
        *,
        shipped_dir: str | os.PathLike[str] | None = None,
        local_records: Any = None,
        shipped_records: Any = None,
    ) -> None:
        self._cache = cache
        self._shipped_dir = shipped_dir
        self._given = (local_records, shipped_records)
        self._index: Any = None
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._trust: dict[tuple[Any, ...], bool] = {}
        self._trust_l0: dict[tuple[Any, ...], int] = {}  # density-sensitive options: L0 verified up to
        self._sensitive: dict[tuple[str, str, torch.dtype], bool] = {}
        self._fns: dict[tuple[str, str], DecodeFn] = {}
        self._checked: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    # --- the index ----------------------------------------------------------------------------------
    @property
    def cache_path(self) -> Path:
        from sae_tune.cache.store import resolve_cache_path

        return resolve_cache_path(self._cache)

    def index(self) -> Any:
        """The in-memory ``CacheIndex`` (read on first use)."""
        with self._lock:
            if self._index is None:
                self._index = self._load()
            return self._index

    def _load(self) -> Any:
        from sae_tune.cache.share import load_shipped
        from sae_tune.dispatch.index import CacheIndex, check_injected, read_local

        local_given, shipped_given = self._given
        local = check_injected(local_given) if local_given is not None else read_local(self.cache_path)
        if shipped_given is not None:
            shipped = check_injected(shipped_given)
        else:
            try:
                shipped = load_shipped(self._shipped_dir)
            except Exception as exc:  # a broken shipped folder must not stop a decode
                warnings.warn(f"shipped configs not loaded: {exc}", DispatchWarning, stacklevel=2)
                shipped = []
        log.debug("sae_tune dispatch: %d local and %d shipped winners loaded", len(local), len(shipped))
        return CacheIndex(local, shipped)

    # --- planning -----------------------------------------------------------------------------------
    def _plan(self, key: tuple[Any, ...], ctx: CallFacts, F: int, D: int, bucket: int) -> _Plan:
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        tiers, skipped = [], []
        ident = device_identity(ctx.device)
        dtype = str(ctx.dtype).removeprefix("torch.")
        for tier in self.index().tiers(ident, dtype, F, D, bucket):
            usable = []
            for option in tier.options:
                gated, why = gate(option, ctx)
                if gated is None:
                    skipped.append(f"{option.label} ({option.source}): {why}")
                else:
                    usable.append(gated)
            if usable:
                tiers.append(tuple(usable))
        return self._plans.setdefault(key, _Plan(tiers, skipped))

    def _trust_key(self, option: Option, inputs: DecodeInputs) -> tuple[Any, ...]:
        return (inputs.acts.device, inputs.acts.dtype, inputs.F, inputs.D, *option.what)

    def _density_sensitive(self, option: Option, dtype: torch.dtype) -> bool:
        key = (*option.what, dtype)
        known = self._sensitive.get(key)
        if known is None:
            try:
                known = target_of(option.impl).density_sensitive(option.impl, option.config, dtype)
            except ValueError:
                known = False
            self._sensitive[key] = known
        return known

    def _fn(self, option: Option) -> DecodeFn:
        fn = self._fns.get(option.what)
        if fn is None:
            fn = self._fns.setdefault(option.what, build(option))
        return fn

    def _model(self, plan: _Plan, inputs: DecodeInputs, ctx: CallFacts) -> Option:
        with plan.lock:
            if plan.model is None:
                plan.model_l0 = _mean_l0(inputs)
                plan.model = self._model_option(inputs, ctx, plan.model_l0)
            return plan.model

    @staticmethod
    def _model_option(inputs: DecodeInputs, ctx: CallFacts, mean_l0: float) -> Option:
        paths = {
            impl: config
            for target in TARGETS
            for impl, config in target.modelled(ctx.device, ctx.dtype, inputs.F, inputs.D)
        }
        try:
            rates = costmodel.measure_rates(ctx.device, ctx.dtype)
        except Exception as exc:  # measuring failed (e.g. out of memory): stay with what the user had
            return Option.of("dense", DENSE_CONFIG, "dense", f"cost model unavailable ({exc})")
        choice = costmodel.choose(
            paths,
            n_tokens=inputs.n_tokens,
            F=inputs.F,
            D=inputs.D,
            mean_l0=mean_l0,
            itemsize=inputs.acts.element_size(),
            rates=rates,
            has_bias=inputs.b_dec is not None,
        )
        return Option.of(choice.impl, choice.config, "model", choice.reason + _unavailable(ctx.device))

    # --- choosing -----------------------------------------------------------------------------------
    def _plan_for(self, inputs: DecodeInputs, ctx: CallFacts) -> tuple[_Plan, tuple[Any, ...]]:
        bucket = 1 << max(0, inputs.n_tokens - 1).bit_length()
        key = (ctx.device, ctx.dtype, inputs.F, inputs.D, bucket, ctx.k, ctx.allow_truncation)
        return self._plans.get(key) or self._plan(key, ctx, inputs.F, inputs.D, bucket), key

    def _choose(
        self, inputs: DecodeInputs, ctx: CallFacts, *, run: bool
    ) -> tuple[Option, torch.Tensor | None]:
        """The option for this call; with ``run``, unverified options are verified (their output is
        returned so the first call does not compute twice)."""
        plan, key = self._plan_for(inputs, ctx)
        settled = plan.settled
        if settled is not None:
            if not (run and self._density_sensitive(settled, inputs.acts.dtype)):
                return settled, None
            ok, out = self._trusted(settled, inputs, run)  # verified again if this batch is denser
            if ok is None:
                return _undecided(settled), None
            if ok:
                return settled, out
            plan.settled = None  # wrong on a denser batch: choose again without it
        for tier in plan.tiers:
            while True:
                live = [o for o in tier if self._trust.get(self._trust_key(o, inputs)) is not False]
                if not live:
                    break
                ambiguous = len({o.what for o in live}) > 1
                option = _nearest_l0(live, inputs) if ambiguous else live[0]
                ok, out = self._trusted(option, inputs, run)
                if ok is None:
                    return _undecided(option), None
                if ok:
                    if run and not ambiguous:
                        self._settle(plan, option, key)
                    return option, out
        option = _noting(self._model(plan, inputs, ctx), plan.skipped)
        if option.impl != "dense":
            ok, out = self._trusted(option, inputs, run)
            if ok is None:
                return _undecided(option), None
            if ok:
                if run:
                    self._settle(plan, option, key)
                return option, out
            reason = f"{option.label} from the cost model failed verification"
            option = Option.of("dense", DENSE_CONFIG, "dense", reason)
        if run:
            self._settle(plan, option, key)
        return option, None

    def _trusted(
        self, option: Option, inputs: DecodeInputs, run: bool
    ) -> tuple[bool | None, torch.Tensor | None]:
        """Whether ``option`` may be used; on first use (``run``) it is verified against dense. None: this
        batch could not decide (its result overflows), so the option stays unverified."""
        tkey = self._trust_key(option, inputs)
        known = self._trust.get(tkey)
        sensitive = self._density_sensitive(option, inputs.acts.dtype)
        if known and sensitive and run and _max_l0(inputs) > self._trust_l0.get(tkey, -1):
            known = None  # denser than any batch it was verified on: verify again
        if known is not None or not run:
            return known is not False, None
        try:
            fn = self._fn(option)
        except Exception as exc:
            out, why = None, f"cannot be built: {type(exc).__name__}: {exc}"
        else:
            result = verify(fn, inputs, densest=sensitive)
            if not result.decided:
                log.debug("sae_tune dispatch: %s unverified on this batch: %s", option.label, result.problem)
                return None, None
            out, why = result.out, result.problem
            if sensitive and not why and result.l0 is not None:
                self._trust_l0[tkey] = max(result.l0, self._trust_l0.get(tkey, -1))
        self._trust[tkey] = not why
        if why:
            warnings.warn(
                f"sae-tune: not using {option.label} ({option.source}) for {inputs.acts.dtype} "
                f"F={inputs.F} D={inputs.D}: {why}",
                DispatchWarning,
                stacklevel=4,
            )
        return not why, out

    @staticmethod
    def _settle(plan: _Plan, option: Option, key: tuple[Any, ...]) -> None:
        plan.settled = option
        if log.isEnabledFor(logging.DEBUG):
            device, dtype, F, D, bucket, k, allow = key
            log.debug(
                "sae_tune dispatch %s %s F=%d D=%d batch bucket %d%s: %s",
                device,
                str(dtype).removeprefix("torch."),
                F,
                D,
                bucket,
                f" k<={k}" if k is not None else "",
                option.decision(),
            )

    # --- public -------------------------------------------------------------------------------------
    def decode(
        self,
        feature_acts: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor | None = None,
        *,
        k: int | None = None,
        allow_truncation: bool = False,
    ) -> torch.Tensor:
        """``feature_acts @ W_dec (+ b_dec)`` through the chosen path (see the module docstring)."""
        k = _check_k(k)
        if bypass_reason(feature_acts, W_dec, b_dec) is not None or _empty(feature_acts):
            return _dense_expression(feature_acts, W_dec, b_dec)
        if isinstance(feature_acts, torch.Tensor) and bias_after(feature_acts.shape[:-1], W_dec, b_dec):
            # the product through the chosen path, then torch's own promoting, broadcasting add
            return self.decode(feature_acts, W_dec, None, k=k, allow_truncation=allow_truncation) + b_dec
        acts, autocast_why = _autocast_step(feature_acts, W_dec)
        if autocast_why is not None:
            return _dense_expression(feature_acts, W_dec, b_dec)
        if acts is not feature_acts:  # cast as autocast would; the paths then run in that dtype
            with torch.autocast(acts.device.type, enabled=False):
                return self._decode(acts, W_dec, b_dec, k, allow_truncation)
        return self._decode(feature_acts, W_dec, b_dec, k, allow_truncation)

    def _decode(
        self,
        feature_acts: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor | None,
        k: int | None,
        allow_truncation: bool,
    ) -> torch.Tensor:
        inputs = check_decode_inputs(feature_acts, W_dec, b_dec)
        ctx = CallFacts(inputs.acts.device, inputs.acts.dtype, k, bool(allow_truncation))
        option, out = self._choose(inputs, ctx, run=True)
        if option.impl == "dense":
            return _dense_expression(feature_acts, W_dec, b_dec)
        fn = self._fn(option)
        if needs_grad(feature_acts, W_dec, b_dec):
            out = with_dense_backward(fn, inputs.acts, inputs.W_dec, inputs.b_dec)
        elif out is None:
            run = self._checked.get(option.what)
            if run is None:
                target = target_of(option.impl)
                run = self._checked.setdefault(option.what, target.build_checked(option.impl, option.config))
            out = run(inputs)
        return out.reshape(*inputs.lead_shape, inputs.D)

    def explain(
        self,
        feature_acts: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor | None = None,
        *,
        k: int | None = None,
        allow_truncation: bool = False,
    ) -> Decision:
        """What ``decode`` would run for these inputs, from where, and why (also logged at DEBUG).

        It takes what ``sparse_decode`` takes, a ``SparseActs`` included (checked by the same code: it is
        decoded once, with the cost of the call it explains)."""
        k = _check_k(k)
        if isinstance(feature_acts, SparseActs):
            return _explain_sparse_acts(feature_acts, W_dec, b_dec, k, allow_truncation)
        why = bypass_reason(feature_acts, W_dec, b_dec)
        if why is None and not _empty(feature_acts) and isinstance(feature_acts, torch.Tensor):
            after = bias_after(feature_acts.shape[:-1], W_dec, b_dec)
            if after is not None:
                product = self.explain(feature_acts, W_dec, None, k=k, allow_truncation=allow_truncation)
                return dataclasses.replace(product, reason=f"{product.reason}; {after}")
        if why is None and not _empty(feature_acts):
            feature_acts, why = _autocast_step(feature_acts, W_dec)
        if why is not None:
            decision = Decision("dense", DENSE_CONFIG, "dense", f"left to torch: {why}")
        elif _empty(feature_acts):
            decision = Decision("dense", DENSE_CONFIG, "dense", "empty batch: nothing to gather")
        else:
            inputs = check_decode_inputs(feature_acts, W_dec, b_dec)
            ctx = CallFacts(inputs.acts.device, inputs.acts.dtype, k, bool(allow_truncation))
            option = self._choose(inputs, ctx, run=False)[0]
            if option.source == "model":
                option = self._model_for_batch(option, inputs, ctx)
            decision = option.decision()
            note = target_of(decision.implementation).build_note(inputs.acts.device)
            if note and option.source != "model":  # the model's reason already names every build note
                decision = dataclasses.replace(decision, reason=f"{decision.reason}; {note}")
            if decision.implementation != "dense" and needs_grad(feature_acts, W_dec, b_dec):
                note = "; gradients through the dense product's backward"
                decision = Decision(
                    decision.implementation, decision.config, decision.source, decision.reason + note
                )
            notes = []
            if self._density_sensitive(option, inputs.acts.dtype):
                l0 = self._trust_l0.get(self._trust_key(option, inputs))
                upto = f"verified up to {l0} non-zeros per token" if l0 is not None else "not verified yet"
                notes.append(
                    f"its 16-bit accumulation drifts with L0: {upto}, a denser batch is verified again"
                )
            if forksafe.reason() is not None and inputs.acts.is_cpu:
                notes.append(str(forksafe.reason()))
            if notes:
                decision = dataclasses.replace(decision, reason="; ".join((decision.reason, *notes)))
        log.debug("sae_tune explain: %s", decision)
        return decision

    def _model_for_batch(self, option: Option, inputs: DecodeInputs, ctx: CallFacts) -> Option:
        """The model's ``option`` with a reason that quotes this batch (its mean L0 and the predicted
        costs at it), not the first batch of the shape the choice was made for; explain may count."""
        plan, _ = self._plan_for(inputs, ctx)
        mean_l0 = _mean_l0(inputs)
        fresh = self._model_option(inputs, ctx, mean_l0)
        reason = fresh.reason
        if fresh.what != option.what:
            first = f" (mean L0 {plan.model_l0:.3g})" if plan.model_l0 is not None else ""
            reason += f"; decode keeps {option.label}, chosen for the first batch of this shape{first}"
        return _noting(dataclasses.replace(option, reason=reason), plan.skipped)


def _explain_sparse_acts(
    acts: SparseActs, W_dec: Any, b_dec: Any, k: int | None, allow_truncation: bool
) -> Decision:
    """A SparseActs is decoded straight from its CSR, whatever the dispatcher knows: the decision says so
    after the inputs passed the checks ``sparse_decode`` makes (by running it)."""
    from sae_tune.decode import sparse_decode

    if type(allow_truncation) is not bool:
        raise TypeError(f"allow_truncation must be True or False, got {allow_truncation!r}")
    with torch.no_grad():
        sparse_decode(acts, W_dec, b_dec)
    reason = (
        "a SparseActs is decoded straight from its CSR (F.embedding_bag over its offsets, indices and "
        "values): there is no scan to choose"
    )
    if k is not None or allow_truncation:
        reason += "; k and allow_truncation do not apply (every stored non-zero is summed)"
    after = bias_after(tuple(acts.lead_shape or ()), W_dec, b_dec)
    if after is not None:
        reason += f"; {after}"
    return Decision("embedding_bag_csr", DENSE_CONFIG, "csr", reason)


def _unavailable(device: torch.device) -> str:
    """Why generated targets meant for this device type cannot run here (e.g. "no C compiler: library paths
    only") or run limited (a serial build), for the cost model's reason; empty when they all run fully."""
    notes = []
    for target in GENERATED:
        if device.type in target.timed_kinds:
            reason, note = target.available(device), target.build_note(device)
            if reason is not None:
                detail = f"{target.name} target unavailable: {reason}"
                notes.append(f"{note} ({detail})" if note else detail)
            elif note:
                notes.append(note)
    return "".join(f"; {n}" for n in notes)


def _max_l0(inputs: DecodeInputs) -> int:
    """Most non-zeros of one token of the batch (one count; a host sync on CUDA)."""
    return int(torch.count_nonzero(inputs.acts, dim=1).max()) if inputs.n_tokens else 0


def _mean_l0(inputs: DecodeInputs) -> float:
    """Mean non-zeros per token of the batch (one count; a host sync on CUDA)."""
    return int(torch.count_nonzero(inputs.acts)) / max(1, inputs.n_tokens)


def _undecided(option: Option) -> Option:
    """Dense for one call whose batch could not verify ``option`` (it is verified again next call)."""
    reason = (
        f"{option.label} ({option.source}) is not verified yet: this batch's result overflows its dtype, "
        "so the dense product runs for this call"
    )
    return Option.of("dense", DENSE_CONFIG, "dense", reason)


def _noting(option: Option, skipped: list[str]) -> Option:
    """``option`` with the tuned entries that could not be used for this call named in its reason."""
    if not skipped:
        return option
    more = f" (+{len(skipped) - 2} more)" if len(skipped) > 2 else ""
    reason = f"{option.reason}; tuned entries not usable here: {'; '.join(skipped[:2])}{more}"
    return dataclasses.replace(option, reason=reason)


def _nearest_l0(options: list[Option], inputs: DecodeInputs) -> Option:
    """The option whose L0 bucket is nearest the batch's mean L0 (counted here: one pass over acts)."""
    mean = _mean_l0(inputs)
    target = math.log2(max(1.0, mean))
    return min(options, key=lambda o: abs(math.log2(o.l0_bucket or 1) - target))


# --- the process-wide dispatcher ------------------------------------------------------------------------

_default: Dispatcher | None = None
_default_lock = threading.Lock()


def get_dispatcher() -> Dispatcher:
    """The dispatcher ``sparse_decode`` uses (created, reading nothing yet, on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Dispatcher()
    return _default


def reload(
    cache: str | os.PathLike[str] | None = None, *, shipped_dir: str | os.PathLike[str] | None = None
) -> Dispatcher:
    """Forget every decision and re-read the cache (and shipped configs) on the next decode (and encode).

    Call it after tuning in the same process, or to point dispatch at another cache file.
    """
    global _default
    from sae_tune.dispatch.encode_choice import reload_encode

    reload_encode(cache, shipped_dir=shipped_dir)  # the encode choices read the same cache
    with _default_lock:
        _default = Dispatcher(cache, shipped_dir=shipped_dir)
    return _default


def set_dispatcher(dispatcher: Dispatcher) -> Dispatcher:
    """Make ``dispatcher`` (e.g. built from records in Python) the process-wide one; returns the one it
    replaces, so that it can be put back."""
    global _default
    if not isinstance(dispatcher, Dispatcher):
        raise TypeError(f"expected a Dispatcher, got {type(dispatcher).__name__}")
    with _default_lock:
        previous = _default if _default is not None else Dispatcher()
        _default = dispatcher
    return previous


def decode(
    feature_acts: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
    *,
    k: int | None = None,
    allow_truncation: bool = False,
) -> torch.Tensor:
    """``get_dispatcher().decode(...)``."""
    return get_dispatcher().decode(feature_acts, W_dec, b_dec, k=k, allow_truncation=allow_truncation)


def explain(
    feature_acts: torch.Tensor,
    W_dec: torch.Tensor,
    b_dec: torch.Tensor | None = None,
    *,
    k: int | None = None,
    allow_truncation: bool = False,
) -> Decision:
    """The decision ``sparse_decode(feature_acts, W_dec, b_dec)`` would take, with its source and reason."""
    return get_dispatcher().explain(feature_acts, W_dec, b_dec, k=k, allow_truncation=allow_truncation)
