"""Which encode ``sparse_encode`` runs when no ``chunk=`` is given: the tuned winner, else the default.

The winner for (device, dtype, F, D, batch bucket, op) is looked up as decode winners are: a time measured
here, then an imported one, then a shipped one; the call's own batch bucket first, then the neighbouring
ones (a factor of 2, no further: the memory of an encode grows with B x chunk, so a chunk tuned for other
batch sizes is not carried further); an entry measured with other software ranks after a current one.
For "encode_topk" the L0 bucket of k is matched, else the nearest.

A stored entry whose implementation is unknown here, whose config its target no longer parses, or which
its target gates for this request, is skipped (the reason is kept for ``explain_encode``) and the next
applies; when none does, the default runs: the first candidate of the first target with encode code (the
library's chunked torch encode, what ``sparse_encode`` ran before tuning existed). Never an error.

The cache is read once per process (``reload_encode`` reads it again); each choice is kept per request
key, so a call does no store query and no host sync. An entry of a target other than the default's is
checked against the default on the first use of its key (at most 64 tokens, one host sync); one that
raises or disagrees warns and is not used again in the process.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_tune.targets import TARGETS, Target
from sae_tune.targets.base import EncodeProblem, EncodeRequest, EncodeResult

# A stored winner applies to its own batch bucket and the neighbouring ones (a factor of 2), no further.
MAX_BUCKET_STEPS = 1
SOURCE_RANK = {"measured": 0, "imported": 1, "shipped": 2}
VERIFY_TOKENS = 64


@dataclass(frozen=True)
class EncodeChoice:
    """The encode a request runs: its target, impl and canonical config, where it came from and why.

    ``source``: "cache" (tuned here for this batch bucket), "nearest" (another batch bucket or software
    version), "imported", "shipped", or "default" (nothing tuned applies).
    """

    target: Target
    impl: str
    config: dict[str, Any]
    source: str
    reason: str

    @property
    def label(self) -> str:
        return f"{self.target.name}:{self.target.encode_label(self.impl, self.config)}"

    def as_tuple(self) -> tuple[Target, str, dict[str, Any], str]:
        return self.target, self.impl, self.config, self.reason


def encode_op(request: EncodeRequest) -> str:
    """The cache op of a request: "encode_topk" for TopK, "encode" for ReLU and JumpReLU."""
    return "encode_topk" if request.activation == "topk" else "encode"


def bucket_of(n_tokens: int) -> int:
    return 1 << max(0, n_tokens - 1).bit_length()


def default_choice(request: EncodeRequest, note: str = "") -> EncodeChoice:
    """The first candidate of the first target that can run ``request`` (the library encode)."""
    for target in TARGETS:
        if not target.encode_impls or target.available(request.device) is not None:
            continue
        for impl, config in target.encode_space(request):
            if target.encode_gate(impl, config, request) is None:
                canon = target.encode_parse(impl, config)
                reason = f"untuned: the default for batch bucket {bucket_of(request.n_tokens)}{note}"
                return EncodeChoice(target, impl, canon, "default", reason)
    raise RuntimeError(f"no target can encode {request}")  # the library target runs every request


def _owner(impl: str) -> Target | None:
    return next((t for t in TARGETS if impl in t.encode_impls), None)


class EncodeChooser:
    """Encode winners of one cache (and the shipped configs), read once; choices kept per request key.

    ``local_records`` / ``shipped_records``: winners given in Python instead of reading files (validated
    like a file's).
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
        self._records: list[tuple[Any, bool]] | None = None
        self._choices: dict[tuple[Any, ...], EncodeChoice] = {}
        self._bad: set[tuple[Any, ...]] = set()
        self._verified: set[tuple[Any, ...]] = set()
        self._defaults: dict[tuple[Any, ...], EncodeChoice] = {}
        self._lock = threading.Lock()

    @property
    def cache_path(self) -> Path:
        from sae_tune.cache.store import resolve_cache_path

        return resolve_cache_path(self._cache)

    def records(self) -> list[tuple[Any, bool]]:
        """(WinnerRecord, shipped) of every encode winner, read on first use."""
        with self._lock:
            if self._records is None:
                self._records = self._load()
            return self._records

    def _load(self) -> list[tuple[Any, bool]]:
        from sae_tune.cache.share import load_shipped
        from sae_tune.cache.store import ENCODE_OPS, FieldError, check_winner
        from sae_tune.dispatch.decision import DispatchWarning
        from sae_tune.dispatch.index import read_local

        local_given, shipped_given = self._given
        out: list[tuple[Any, bool]] = []
        for given, shipped in ((local_given, False), (shipped_given, True)):
            if given is None:
                if shipped:
                    try:
                        records = load_shipped(self._shipped_dir)
                    except Exception as exc:  # a broken shipped folder must not stop an encode
                        warnings.warn(f"shipped configs not loaded: {exc}", DispatchWarning, stacklevel=3)
                        records = []
                else:
                    records = read_local(self.cache_path)
            else:
                records = []
                for rec in given:
                    try:
                        check_winner(rec.key, rec.impl, dict(rec.config), rec.ms, rec.dense_ms)
                    except FieldError as exc:
                        raise ValueError(f"invalid encode record {rec.impl!r}: {exc}") from None
                    records.append(rec)
            out += [(rec, shipped) for rec in records if rec.key.op in ENCODE_OPS]
        return out

    # --- choosing ---------------------------------------------------------------------------------
    def choose(self, request: EncodeRequest) -> EncodeChoice:
        """The encode ``request`` runs (memoised per device, dtype, shape, batch bucket, activation, k)."""
        key = _request_key(request)
        choice = self._choices.get(key)
        if choice is None:
            choice = self._choices.setdefault(key, self._decide(request))
        return choice

    def _decide(self, request: EncodeRequest) -> EncodeChoice:
        from sae_tune.cache.store import encode_l0_bucket
        from sae_tune.dispatch.identity import device_identity

        try:
            ident = device_identity(request.device)
        except ValueError as exc:
            return default_choice(request, f"; no tuned configs here ({exc})")
        bucket = bucket_of(request.n_tokens)
        dtype = str(request.dtype).removeprefix("torch.")
        op = encode_op(request)
        want_l0 = encode_l0_bucket(request.k, request.F)
        matching = []
        for rec, shipped in self.records():
            k = rec.key
            if (k.device_name, k.capability, k.dtype, k.F, k.D, k.op) != (
                ident.device_name,
                ident.capability,
                dtype,
                request.F,
                request.D,
                op,
            ):
                continue
            steps = abs(math.log2(k.batch_bucket / bucket))
            if steps > MAX_BUCKET_STEPS:
                continue
            stale = _stale(rec, ident)
            l0_steps = abs(math.log2(max(k.l0_bucket, 1) / max(want_l0, 1)))
            source = "shipped" if shipped else rec.provenance.source
            rank = (shipped, steps, bool(stale), l0_steps, SOURCE_RANK.get(source, 0), rec.ms)
            matching.append((rank, rec, shipped, stale))
        skipped: list[str] = []
        for _, rec, shipped, stale in sorted(matching, key=lambda m: m[0]):
            owner = _owner(rec.impl)
            what = f"{rec.impl} {rec.config} ({'shipped' if shipped else rec.provenance.source})"
            if owner is None:
                skipped.append(f"{what}: unknown implementation")
                continue
            try:
                config = owner.encode_parse(rec.impl, rec.config)
            except (TypeError, ValueError) as exc:
                skipped.append(f"{what}: invalid config: {exc}")
                continue
            why = owner.available(request.device) or owner.encode_gate(rec.impl, config, request)
            if why is None and (owner.name, rec.impl, _dump(config), *_call_key(request)) in self._bad:
                why = "failed its check against the default earlier in this process"
            if why is not None:
                skipped.append(f"{what}: {why}")
                continue
            source = "shipped" if shipped else rec.provenance.source
            if source == "measured":
                source = "cache" if rec.key.batch_bucket == bucket and not stale else "nearest"
            reason = _reason(rec, bucket, stale, shipped) + _skipped_note(skipped)
            return EncodeChoice(owner, rec.impl, config, source, reason)
        return default_choice(request, _skipped_note(skipped))

    # --- running ----------------------------------------------------------------------------------
    def run(self, request: EncodeRequest, problem: EncodeProblem) -> EncodeResult:
        """Encode ``problem`` with the choice for ``request``; an entry of another target than the
        default's is checked against the default on its first use (falls back if wrong)."""
        choice = self.choose(request)
        if choice.source == "default":
            return choice.target.encode(choice.impl, choice.config, problem)
        default = self._defaults.get(_request_key(request))
        if default is None:
            default = self._defaults.setdefault(_request_key(request), default_choice(request))
        if choice.target is default.target:  # the default's own code, another config: exact by design
            return choice.target.encode(choice.impl, choice.config, problem)
        check = (choice.target.name, choice.impl, _dump(choice.config), *_call_key(request))
        if check not in self._verified:
            problem_why = self._check(choice, default, problem)
            if problem_why is not None:
                from sae_tune.dispatch.decision import DispatchWarning

                warnings.warn(
                    f"sae-tune: not using encode {choice.label} ({choice.source}) for {request.dtype} "
                    f"F={request.F} D={request.D}: {problem_why}",
                    DispatchWarning,
                    stacklevel=4,
                )
                self._bad.add(check)
                self._choices.pop(_request_key(request), None)
                return self.run(request, problem)
            self._verified.add(check)
        return choice.target.encode(choice.impl, choice.config, problem)

    @staticmethod
    def _check(choice: EncodeChoice, default: EncodeChoice, problem: EncodeProblem) -> str | None:
        from sae_tune.autotune.encode_search import disagreement

        part = EncodeProblem(
            problem.x[:VERIFY_TOKENS], problem.W_enc, problem.b_enc, problem.threshold, problem.k
        )
        try:
            got = choice.target.encode(choice.impl, choice.config, part)
        except Exception as exc:
            return f"raised {type(exc).__name__}: {str(exc)[:300]}"
        ref = default.target.encode(default.impl, default.config, part)
        why = disagreement(got, ref, part, exact=part.x.device.type == "cpu")
        return None if why is None else f"wrong result against the default encode: {why}"


def _dump(config: dict[str, Any]) -> str:
    import json

    return json.dumps(config, sort_keys=True)


def _call_key(request: EncodeRequest) -> tuple[Any, ...]:
    return request.device, request.dtype, request.F, request.D


def _request_key(request: EncodeRequest) -> tuple[Any, ...]:
    return (*_call_key(request), bucket_of(request.n_tokens), request.activation, request.k)


def _stale(rec: Any, ident: Any) -> list[str]:
    out = []
    if rec.key.torch_version != ident.torch_version:
        out.append(f"torch {rec.key.torch_version}")
    owner = _owner(rec.impl)
    if owner is not None:
        out += owner.stale(rec.key, ident)
    return out


def _reason(rec: Any, bucket: int, stale: list[str], shipped: bool) -> str:
    from sae_tune.cache.store import format_ms

    key = rec.key
    date = rec.provenance.date[:10]
    if shipped:
        where = f"shipped (measured {date}) for"
    elif rec.provenance.source == "imported":
        where = f"imported from {rec.origin or 'a shared file'} (measured {date}) for"
    else:
        where = f"measured here ({date}) on"
    text = (
        f"{where} {key.device_name}, {key.op} {key.dtype} F={key.F} D={key.D} batch bucket "
        f"{key.batch_bucket}: {format_ms(rec.ms, rec.spread, '.3g')}"
    )
    if key.batch_bucket != bucket:
        text += f"; nearest to this batch bucket {bucket}"
    if stale:
        text += f"; measured with {', '.join(stale)}"
    return text


def _skipped_note(skipped: list[str]) -> str:
    if not skipped:
        return ""
    more = f" (+{len(skipped) - 2} more)" if len(skipped) > 2 else ""
    return f"; tuned entries not usable here: {'; '.join(skipped[:2])}{more}"


# --- the process-wide chooser -------------------------------------------------------------------------

_default: EncodeChooser | None = None
_default_lock = threading.Lock()


def get_encode_chooser() -> EncodeChooser:
    """The chooser ``sparse_encode`` uses (created, reading nothing yet, on first use)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = EncodeChooser()
    return _default


def reload_encode(
    cache: str | os.PathLike[str] | None = None, *, shipped_dir: str | os.PathLike[str] | None = None
) -> EncodeChooser:
    """Forget every encode choice and re-read the cache (and shipped configs) on the next encode."""
    global _default
    with _default_lock:
        _default = EncodeChooser(cache, shipped_dir=shipped_dir)
    return _default


def set_encode_chooser(chooser: EncodeChooser) -> EncodeChooser:
    """Make ``chooser`` the process-wide one; returns the one it replaces, so it can be put back."""
    global _default
    if not isinstance(chooser, EncodeChooser):
        raise TypeError(f"expected an EncodeChooser, got {type(chooser).__name__}")
    with _default_lock:
        previous = _default if _default is not None else EncodeChooser()
        _default = chooser
    return previous


def choose_encode(request: EncodeRequest) -> tuple[Target, str, dict[str, Any], str]:
    """(target, impl, config, reason) of the encode ``request`` runs (see the module docstring)."""
    return get_encode_chooser().choose(request).as_tuple()


def explain_encode(request: EncodeRequest) -> EncodeChoice:
    """The encode ``request`` runs, with its source and reason."""
    return get_encode_chooser().choose(request)


def run_encode(request: EncodeRequest, problem: EncodeProblem) -> EncodeResult:
    """``sparse_encode``'s untuned-chunk path: the chosen encode of ``problem``."""
    return get_encode_chooser().run(request, problem)


__all__ = [
    "EncodeChoice",
    "EncodeChooser",
    "choose_encode",
    "explain_encode",
    "get_encode_chooser",
    "reload_encode",
    "run_encode",
    "set_encode_chooser",
]
