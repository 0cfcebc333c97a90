"""The search: one Optuna study per (device, op, dtype, F, D, batch bucket, L0 bucket).

For each batch size: build the workload, compute the exact reference once, time the library baselines,
then let Optuna propose candidates. Each proposal is verified against the reference before it is timed;
a wrong result, a compile error or an out-of-memory is a failed trial, recorded, and the search goes on.
The best few are re-timed interleaved with dense at the end, and the winner goes to the cache.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch

from sae_tune.artefacts import UnsafeArtefactDir
from sae_tune.autotune.candidates import Candidate, SearchSpace, baselines, search_space
from sae_tune.autotune.timing import (
    NOISY_RETRIES,
    Timing,
    busy_reason,
    quietest,
    time_fn,
    time_interleaved,
    timing_noise,
)
from sae_tune.autotune.verify import Reference, check
from sae_tune.autotune.workload import (
    L0Stats,
    calibrate_l0,
    max_l0_candidates,
    random_weights,
    synthetic_acts,
)
from sae_tune.cache.store import CacheKey, Store, WinnerRecord, is_noisy
from sae_tune.cpu_identity import bounded_name
from sae_tune.device import describe_device
from sae_tune.specs import SAESpec
from sae_tune.targets import templates_hash

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = {"cpu": (1, 32, 256), "cuda": (1, 32, 256, 1024, 4096)}
CALIBRATION_TOKENS = 4096
FINALISTS = 3


class CandidateFailed(Exception):
    """A candidate crashed or returned a wrong result: the trial fails, the search continues."""


class TuneError(RuntimeError):
    """A batch size cannot be tuned at all (the dense product itself failed); the message says why."""


class WorkloadTooLarge(ValueError):
    """The activations of one batch size do not fit on the device; the message names the batch size."""


def spread_of(timing: Timing | None) -> float | None:
    """The relative IQR of a timing's samples, or None where there is no timing or a single sample."""
    if timing is None or len(timing.samples) < 2:
        return None
    return timing.spread


@dataclass(frozen=True)
class TuneResult:
    """What one batch size's search found."""

    batch_size: int
    key: CacheKey
    best: Candidate
    best_ms: float
    dense_ms: float
    baselines: dict[str, float]
    trials: int
    failed: int
    l0: L0Stats
    study: str
    best_spread: float | None = None
    dense_spread: float | None = None

    @property
    def noisy(self) -> bool:
        """The winner's or dense's final timing was noisy: its time and speedup are not speeds."""
        return is_noisy(self.best_spread) or is_noisy(self.dense_spread)

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.best_ms

    def versus(self, impl: str) -> float | None:
        ms = self.baselines.get(impl)
        return None if ms is None else ms / self.best_ms

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "batch_bucket": self.key.batch_bucket,
            "best_impl": self.best.impl,
            "best_config": self.best.config,
            "best_label": self.best.label,
            "best_ms": self.best_ms,
            "dense_ms": self.dense_ms,
            "speedup": self.speedup,
            "baselines_ms": self.baselines,
            "trials": self.trials,
            "failed_trials": self.failed,
            "l0": {"mean": self.l0.mean, "p99": self.l0.p99, "max": self.l0.max},
            "study": self.study,
            "best_spread": self.best_spread,
            "dense_spread": self.dense_spread,
            "noisy": self.noisy,
        }


@dataclass
class Workload:
    """Tensors of one tuning job; W_dec and b_dec are random (timings do not depend on their values)."""

    acts: torch.Tensor
    W_dec: torch.Tensor
    b_dec: torch.Tensor
    reference: Reference = field(init=False)

    def __post_init__(self) -> None:
        # the exact product only needs the rows of features fired somewhere in the batch
        fired = (self.acts != 0).any(0).nonzero().flatten()
        self.reference = Reference.of(self.acts[:, fired], self.W_dec[fired], self.b_dec)

    def run(self, fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return fn(self.acts, self.W_dec, self.b_dec)


def _not_a_journal(path: str) -> str | None:
    """Why an existing, non-empty file is not an Optuna journal (its first line is not a JSON log entry),
    or None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read it: {exc.strerror or exc}"
    if not head:
        return None
    line = head.split(b"\n", 1)[0]
    if b"\n" not in head:  # a first entry another process is still writing: judge its start only
        return None if line.startswith(b'{"op_code"') else "its first line is not a JSON log entry"
    try:
        entry = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return "its first line is not a JSON log entry"
    return None if isinstance(entry, dict) and "op_code" in entry else "its first line is not a log entry"


def optuna_storage(url: str | None) -> optuna.storages.BaseStorage | None:
    """``None`` (in memory), ``journal:PATH`` / a ``.log``/``.journal`` path, or a database URL.

    Raises ValueError naming the URL and what is wrong with it (unknown scheme, missing driver, a folder
    that does not exist, a database that cannot be opened), so that callers can report it as a usage error.
    """
    if url is None:
        return None
    if url.startswith("journal:") or url.endswith((".log", ".journal")):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = url.removeprefix("journal:")
        if not path:
            raise ValueError(f"--storage {url!r}: give a file after journal:, such as journal:study.log")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ValueError(f"--storage {url!r}: no such directory: {parent}")
        if os.path.isdir(path):
            raise ValueError(f"--storage {url!r}: {path} is a directory; give a file name")
        problem = _not_a_journal(path)
        if problem is not None:  # Optuna would append to any file, then fail on reading it back
            raise ValueError(
                f"--storage {url!r}: {path} is not an Optuna journal ({problem}); nothing written"
            )
        try:
            return JournalStorage(JournalFileBackend(path))
        except OSError as exc:
            raise ValueError(f"--storage {url!r}: cannot open the journal file: {exc}") from exc
    if "://" in url:
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
            )
        except Exception as exc:  # unknown dialect, missing driver, unreachable server, unopenable file
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"--storage {url!r}: cannot open this database: {reason}") from exc
    raise ValueError(f"--storage {url!r}: use journal:PATH or a database URL such as sqlite:///study.db")


STUDY_NAME_MAX = 160  # within the cache's text fields and any database's name columns


def study_name(key: CacheKey) -> str:
    """The Optuna study of ``key``: readable, and bounded whatever the device's name (a long name keeps a
    digest of the whole, so distinct keys keep distinct studies)."""
    return bounded_name(
        f"sae-tune:{key.op}:{key.device_name}:{key.capability or 'cpu'}:{key.dtype}:"
        f"F{key.F}:D{key.D}:B{key.batch_bucket}:L0{key.l0_bucket}:{key.template_hash[:12]}",
        STUDY_NAME_MAX,
    )


class Tuner:
    """Tunes one SAE on one device and dtype; one ``tune_batch`` per batch size."""

    def __init__(
        self,
        spec: SAESpec,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        store: Store,
        acts: torch.Tensor | None = None,
        seed: int = 0,
        storage: str | optuna.storages.BaseStorage | None = None,
        progress: Callable[[int, str], Any] | None = None,
        phase: Callable[[str], Any] | None = None,
        retune: bool = False,
        notice: Callable[[str], Any] | None = None,
    ) -> None:
        self.spec, self.device, self.dtype, self.store = spec, torch.device(device), dtype, store
        self.info = describe_device(self.device)
        self.seed = seed
        self.real_acts = acts
        self.storage = optuna_storage(storage) if storage is None or isinstance(storage, str) else storage
        self.progress = progress
        self.phase = phase  # told each phase of a batch size (baselines, search, final re-timing)
        self.retune = retune  # forget what is stored for a key before tuning it (once per key)
        self.notice = notice  # told once if the machine looks busy (default: a logged warning)
        self._busy_said = False
        self._forgotten: set[CacheKey] = set()
        self.W_dec, self.b_dec = random_weights(
            spec.width, spec.d_model, dtype=dtype, device=self.device, seed=seed
        )
        calibration = acts if acts is not None else self._synthetic(CALIBRATION_TOKENS, seed + 7)
        self.l0 = calibrate_l0(calibration)
        self.max_l0s = max_l0_candidates(self.l0, limit=spec.width)

    def _synthetic(self, n: int, seed: int) -> torch.Tensor:
        return synthetic_acts(self.spec, n, dtype=self.dtype, device=self.device, seed=seed)

    def _say(self, message: str) -> None:
        if self.phase is not None:
            self.phase(message)

    def _check_busy(self, baselines: Iterable[Timing]) -> None:
        """Say once per tuner when the machine looks busy: its timings will be noisy."""
        if self._busy_said:
            return
        reason = busy_reason(baselines)
        if reason is None:
            return
        self._busy_said = True
        message = (
            f"the machine looks busy ({reason}): timings will be noisy. A noisy measurement is re-measured; "
            "a winner still noisy is stored flagged (noisy) and replaced by the next quiet measurement."
        )
        if self.notice is not None:
            self.notice(message)
        else:
            log.warning("sae-tune: %s", message)

    def workload(self, batch_size: int) -> Workload:
        if self.real_acts is None:
            acts = self._synthetic(batch_size, self.seed)
        else:
            reps = -(-batch_size // self.real_acts.shape[0])
            acts = self.real_acts.repeat(reps, 1)[:batch_size]
            acts = acts.to(device=self.device, dtype=self.dtype)
        return Workload(acts, self.W_dec, self.b_dec)

    def key(self, batch_size: int, mean_l0: float) -> CacheKey:
        return CacheKey.for_device(
            self.info,
            template_hash=templates_hash(),
            dtype=self.dtype,
            F=self.spec.width,
            D=self.spec.d_model,
            batch_size=batch_size,
            mean_l0=max(1.0, mean_l0),
        )

    # --- one candidate ------------------------------------------------------------------------------
    def measure(self, cand: Candidate, work: Workload) -> Timing:
        """Verify, then time; raises CandidateFailed with the reason."""
        try:
            fn = cand.build()
            out = work.run(fn)
        except UnsafeArtefactDir:
            raise  # the folder of generated code is unsafe: no candidate of a generated target can run
        except Exception as exc:  # compile errors, out of memory, unsupported dtype: a failed candidate
            raise CandidateFailed(f"{type(exc).__name__}: {exc}"[:2000]) from exc
        expected = torch.promote_types(work.W_dec.dtype, work.b_dec.dtype)
        verdict = check(out, work.reference, expected)
        if not verdict.ok:
            raise CandidateFailed(f"wrong result: {verdict.reason}")
        return quietest(lambda: time_fn(lambda: work.run(fn), self.device), timing_noise)

    # --- one batch size -----------------------------------------------------------------------------
    def tune_batch(
        self, batch_size: int, *, trials: int = 20, time_budget: float | None = None
    ) -> TuneResult:
        try:
            work = self.workload(batch_size)
        except (RuntimeError, MemoryError) as exc:  # out of memory for B x F activations
            raise WorkloadTooLarge(
                f"batch size {batch_size}: the workload ({batch_size} x {self.spec.width} activations) "
                f"cannot be built on {self.device}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
            ) from exc
        stats = calibrate_l0(work.acts)
        key = self.key(batch_size, self.l0.mean)  # the calibration sample's L0, not this batch's
        space = search_space(self.spec, key.batch_bucket, self.dtype, self.device, self.max_l0s)
        name = study_name(key)
        if self.retune and key not in self._forgotten:
            self._forget(key, name)
        measured: dict[Candidate, float] = {}
        failures: dict[Candidate, str] = {}
        failed = 0

        def record(cand: Candidate, timing: Timing | None, error: str | None, number: int | None) -> None:
            self.store.record_trial(
                key,
                cand.impl,
                cand.config,
                None if timing is None else timing.ms,
                ok=error is None,
                error=error,
                study=name,
                trial_number=number,
                spread=spread_of(timing),
            )

        reference: dict[str, float] = {}
        library = baselines(self.dtype, self.device)
        self._say(f"B={batch_size}: baselines ({len(library)} library paths)")
        baseline_timings: list[Timing] = []
        for cand in library:
            try:
                timing = self.measure(cand, work)
            except CandidateFailed as exc:
                record(cand, None, str(exc), None)
                failures[cand] = str(exc)
                failed += 1
                continue
            reference[cand.impl] = measured[cand] = timing.ms
            baseline_timings.append(timing)
            record(cand, timing, None, None)
            self.store.record_baseline(key, cand.impl, timing.ms, spread=spread_of(timing))
        self._check_busy(baseline_timings)
        if "dense" not in reference:
            reason = failures.get(Candidate.of("dense", {}), "unknown")
            raise TuneError(
                f"batch size {batch_size}: the dense product failed on this workload ({reason}); "
                "nothing can be tuned against it"
            )

        study = optuna.create_study(
            study_name=name,
            storage=self.storage,
            load_if_exists=True,
            direction="minimize",
            sampler=make_sampler(self.seed, trials),
        )
        for params in self._warm_starts(space, key):
            study.enqueue_trial(params, skip_if_exists=True)

        searched = 0  # distinct candidates this study measured (or saw fail): what --trials counts

        def objective(trial: optuna.Trial) -> float:
            nonlocal failed, searched
            cand = suggest(trial, space)
            if cand in measured:
                trial.set_user_attr("repeat", True)
                return measured[cand]
            if cand in failures:
                trial.set_user_attr("repeat", True)
                raise CandidateFailed(f"failed before: {failures[cand]}")
            trial.set_user_attr("candidate", cand.label)
            searched += 1
            try:
                timing = self.measure(cand, work)
            except CandidateFailed as exc:
                failed += 1
                failures[cand] = str(exc)
                record(cand, None, str(exc), trial.number)
                raise
            record(cand, timing, None, trial.number)
            measured[cand] = timing.ms
            return timing.ms

        def on_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if self.progress is not None and not trial.user_attrs.get("repeat"):
                best = min(measured.values()) if measured else float("nan")
                self.progress(1, f"best {best:.3f} ms")
            if searched >= trials or len(measured) + len(failures) >= space.size():
                study.stop()  # the budget of measurements is spent, or every candidate was tried

        budget = f"{trials} trials" + (f" or {time_budget:g} s" if time_budget is not None else "")
        self._say(f"B={batch_size}: search ({budget}, {space.size()} candidates)")
        study.optimize(
            objective,
            n_trials=trials * SUGGESTIONS_PER_TRIAL,  # a repeated suggestion costs no measurement
            timeout=time_budget,
            catch=(CandidateFailed,),
            callbacks=[on_trial],
            gc_after_trial=False,
        )
        self._say(f"B={batch_size}: final re-timing (up to {FINALISTS} best and the baselines, interleaved)")
        best, final = self._final(measured, work, reference, f"B={batch_size}")
        dense = Candidate.of("dense", {})
        final_baselines = {impl: final[Candidate.of(impl, {})].ms for impl in reference}
        dense_ms = final_baselines["dense"]
        self.store.set_winner_if_faster(
            key, best.impl, best.config, final[best].ms, dense_ms, spread=spread_of(final[best])
        )
        flag = ", noisy" if final[best].noisy or final[dense].noisy else ""
        done = f"{best.label} {final[best].ms:.3f} ms (dense {dense_ms:.3f} ms{flag})"
        self._say(f"B={batch_size}: done, {done}")
        return TuneResult(
            batch_size,
            key,
            best,
            final[best].ms,
            dense_ms,
            final_baselines,
            len(measured),
            failed,
            stats,
            name,
            spread_of(final[best]),
            spread_of(final[dense]),
        )

    def _forget(self, key: CacheKey, name: str) -> None:
        """--retune: drop what is stored for ``key`` and its old Optuna study, so old timings are gone."""
        self._forgotten.add(key)
        removed = self.store.forget_key(key)
        if self.storage is not None:
            try:
                optuna.delete_study(study_name=name, storage=self.storage)
            except KeyError:  # no study of that name yet
                pass
        self._say(f"B={key.batch_bucket} bucket: --retune removed {removed} stored record(s) of this key")

    def _final(
        self, measured: dict[Candidate, float], work: Workload, baselines: Iterable[str], label: str = ""
    ) -> tuple[Candidate, dict[Candidate, Timing]]:
        """Re-time the finalists and the baselines interleaved, so that every ratio comes from one run.

        A run in which the winner's or dense's timing is noisy is repeated (NOISY_RETRIES more at most) and
        the quietest run is kept whole, so that the ratios still come from one run; each repeat is told to
        ``phase`` (``label`` names the batch size), so a long re-timing is never silent."""
        finalists = sorted(measured, key=measured.__getitem__)[:FINALISTS]
        for impl in baselines:
            if Candidate.of(impl, {}) not in finalists:
                finalists.append(Candidate.of(impl, {}))
        fns = {c: c.build() for c in finalists}
        runs = {c.label: (lambda fn=fns[c]: work.run(fn)) for c in finalists}
        dense = Candidate.of("dense", {})

        runs_done = 0

        def one_run() -> tuple[Candidate, dict[Candidate, Timing]]:
            nonlocal runs_done
            if runs_done:
                self._say(
                    f"{label}: final re-timing was noisy, run {runs_done + 1} of up to {NOISY_RETRIES + 1}"
                )
            runs_done += 1
            timings = time_interleaved(runs, self.device)
            by_cand = {c: timings[c.label] for c in finalists}
            return min(by_cand, key=lambda c: by_cand[c].ms), by_cand

        def noise(run: tuple[Candidate, dict[Candidate, Timing]]) -> float:
            best, by_cand = run
            return max(timing_noise(by_cand[c]) for c in (best, dense) if c in by_cand)

        return quietest(one_run, noise)

    def _warm_starts(self, space: SearchSpace, key: CacheKey) -> Iterable[dict[str, Any]]:
        """The targets' default variants, and the winners of neighbouring shapes and batch sizes here."""
        starts: list[Candidate] = space.warm_starts()
        neighbours: list[WinnerRecord] = [
            w
            for w in self.store.winners(self.info.name)
            if w.key.dtype == key.dtype and w.key.capability == key.capability and w.key != key
        ]
        neighbours.sort(
            key=lambda w: (
                abs(math.log2(w.key.F / key.F)) + abs(math.log2(w.key.D / key.D)),
                abs(math.log2(w.key.batch_bucket / key.batch_bucket)),
            )
        )
        starts += [Candidate.of(w.impl, w.config) for w in neighbours[:4]]
        for cand in starts:
            if space.contains(cand):
                yield params_of(cand, space)


# --- Optuna parameters <-> candidates -------------------------------------------------------------------
# Define-by-run: the implementation, then each field of its config in the variant's order, asked only
# while the configs left differ in it (so exact allocation never asks for an overflow policy). The first
# field is the structure (alloc, family): later parameters are named per structure, so their choices are
# the values that structure takes. A pick that no config left has is skipped (the next fields decide),
# so every trial measures a real candidate instead of being pruned.


def _walk(space: SearchSpace, impl: str, pick: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Narrow the configs of ``impl`` field by field with ``pick(param, choices)``: the config reached
    and the parameters that were asked."""
    configs = space.configs[impl]
    left = list(configs)
    asked: dict[str, Any] = {}
    prefix = impl
    for position, name in enumerate(space.fields(impl)):
        values = {c.get(name) for c in left}
        if len(values) > 1:
            param = f"{prefix}.{name}"
            choices = list(dict.fromkeys(c.get(name) for c in configs if _same_structure(c, left[0], prefix)))
            asked[param] = value = pick(param, choices)
            narrowed = [c for c in left if c.get(name) == value]
            left = narrowed or left
        if position == 0:
            prefix = f"{impl}.{left[0].get(name)}"
    return left[0], asked


def _same_structure(config: dict[str, Any], reference: dict[str, Any], prefix: str) -> bool:
    """Whether ``config`` has the structure (first field value) named in ``prefix``."""
    if "." not in prefix:
        return True
    first = next(iter(reference))
    return str(config.get(first)) == prefix.split(".", 1)[1]


# Suggestions allowed per measured candidate: TPE repeats good candidates as it converges, and a repeat
# costs nothing (its time is known), so it does not count against --trials; this bounds the loop.
SUGGESTIONS_PER_TRIAL = 4


def make_sampler(seed: int, trials: int = 20) -> optuna.samplers.BaseSampler:
    """The study's sampler: multivariate TPE with groups, which suits a conditional space. Its random
    start is a quarter of the budget (4..10 trials), so a short study spends most trials on the model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        startup = max(4, min(10, trials // 4))
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=startup)


def suggest(trial: optuna.Trial, space: SearchSpace) -> Candidate:
    """The candidate of one trial: the target, its implementation, then that implementation's parameters
    (choosing the target first gives a generated family as many random starts as all library paths)."""
    group = trial.suggest_categorical("target", list(space.groups))
    impls = space.groups[group]
    impl = impls[0] if len(impls) == 1 else trial.suggest_categorical(f"{group}.impl", list(impls))
    config, _ = _walk(space, impl, trial.suggest_categorical)
    return Candidate.of(impl, config)


def params_of(cand: Candidate, space: SearchSpace) -> dict[str, Any]:
    """The Optuna parameters that make ``suggest`` return ``cand`` (for warm starts)."""
    group = space.group_of(cand.impl)
    params: dict[str, Any] = {"target": group}
    if len(space.groups[group]) > 1:
        params[f"{group}.impl"] = cand.impl
    config = cand.config
    _, asked = _walk(space, cand.impl, lambda param, choices: config.get(param.rsplit(".", 1)[1]))
    return {**params, **asked}


def default_batch_sizes(device: torch.device) -> tuple[int, ...]:
    return DEFAULT_BATCH_SIZES.get(device.type, DEFAULT_BATCH_SIZES["cpu"])


def quiet_optuna() -> None:
    """Optuna logs every trial at INFO; the progress bar and the final table say what matters."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if os.environ.get("SAE_TUNE_DEBUG"):
        optuna.logging.set_verbosity(optuna.logging.DEBUG)
