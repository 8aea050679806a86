"""The Optuna back-end (default, embedded).

The study lives in ``OUT/optuna.db`` (SQLite), so an interrupted study resumes: trials left
``RUNNING`` by a killed process are continued as the same trials. Early stopping uses Optuna's
successive-halving (ASHA) or Hyperband pruner on optimiser steps or on training seconds (reported
in milliseconds).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from qlrlab.engine.hashing import run_hash
from qlrlab.engine.models import RunSpec, TuneSpec, finite
from qlrlab.engine.overrides import apply_overrides
from qlrlab.engine.runner import RunInterrupted, RunResult
from qlrlab.engine.storage import RunStore
from qlrlab.engine.tuning._common import (
    Search,
    SearchOptions,
    _labels,
    _metric_from,
    _objective_value,
    _resource_fn,
)


class OptunaBackend:
    """The Optuna back-end (:class:`~qlrlab.engine.tuning._common.TuningBackend`)."""

    def search(
        self, spec: TuneSpec, base: RunSpec, store: RunStore, options: SearchOptions
    ) -> Search:
        """Run (or continue) the study in ``store``; the failures are read back from it."""
        assert options.run is not None
        params, value, n = _tune_optuna(spec, base, store, options.quiet, options.run)
        return Search(params, value, n, _optuna_failures(store, spec.name))


def _optuna_failures(store: RunStore, name: str) -> list[dict[str, Any]]:
    """The failed (not stale) trials of the Optuna study in ``store``."""
    import optuna
    from optuna.trial import TrialState

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{store.root / 'optuna.db'}")
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.user_attrs.get("stale"):
            continue
        h = t.user_attrs.get("run_hash")
        summary = (store.summary(h) if h else None) or {}
        out.append({"params": dict(t.params), "error": summary.get("error", "run failed")})
    return out


class _TrialFailed(RuntimeError):
    pass


class _TrialInterrupted(BaseException):
    """Ctrl-C/SIGTERM inside a trial. Neither an ``Exception`` nor a ``KeyboardInterrupt``, so
    Optuna does not mark the trial failed: it stays ``RUNNING`` and ``--resume`` continues it
    from its run's checkpoint."""


def _suggest(trial: Any, key: str, p: Any) -> Any:
    if p.type == "log_uniform":
        return trial.suggest_float(key, p.low, p.high, log=True)
    if p.type == "uniform":
        return trial.suggest_float(key, p.low, p.high)
    if p.type == "int":
        return trial.suggest_int(key, int(p.low), int(p.high))
    if p.type == "log_int":
        return trial.suggest_int(key, int(p.low), int(p.high), log=True)
    return trial.suggest_categorical(key, p.choices)


def _optuna_pruner(spec: TuneSpec, base: RunSpec) -> Any:
    import optuna

    sch = spec.scheduler
    scale = 1.0 if sch.resource == "steps" else 1000.0
    min_r = max(1, round(sch.min_resource * scale))
    if sch.type == "none":
        return optuna.pruners.NopPruner()
    if sch.type == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=min_r, reduction_factor=sch.reduction_factor, min_early_stopping_rate=0
        )
    max_r: Any = "auto"
    if sch.max_resource is not None:
        max_r = round(sch.max_resource * scale)
    elif sch.resource == "steps" and base.budget.steps:
        max_r = int(base.budget.steps)
    elif sch.resource == "seconds" and base.budget.seconds:
        max_r = int(base.budget.seconds * 1000)
    return optuna.pruners.HyperbandPruner(
        min_resource=min_r, max_resource=max_r, reduction_factor=sch.reduction_factor
    )


def _tune_optuna(
    spec: TuneSpec,
    base: RunSpec,
    store: RunStore,
    quiet: bool,
    run_safely: Callable[..., RunResult],
) -> tuple[dict[str, Any], float | None, int]:
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{store.root / 'optuna.db'}"
    storage = optuna.storages.RDBStorage(url)
    existing = []
    try:
        study_id = storage.get_study_id_from_name(spec.name)
        existing = storage.get_all_trials(study_id, deepcopy=False)
    except KeyError:
        study_id = None
    # Trials left RUNNING by a killed process are continued, as the same trials: their runs
    # resume from their checkpoints and keep the rung values they reached, so a retry is never
    # judged against stale values of its own earlier attempts.
    stale = [t for t in existing if t.state == TrialState.RUNNING]
    n_prev = len(existing)
    sampler: Any
    if spec.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=spec.sampler_seed + n_prev)
    else:
        sampler = optuna.samplers.TPESampler(seed=spec.sampler_seed + n_prev)
    study = optuna.create_study(
        study_name=spec.name,
        storage=storage,
        load_if_exists=True,
        direction="minimize",
        sampler=sampler,
        pruner=_optuna_pruner(spec, base),
    )

    def finished(t: Any) -> bool:
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            return True
        return t.state == TrialState.FAIL and not t.user_attrs.get("stale")

    base_dump = base.model_dump(mode="json")
    resource = _resource_fn(spec)

    def objective(trial: Any, last_reported: int = -1) -> float:
        params = {key: _suggest(trial, key, p) for key, p in spec.space.items()}
        run = apply_overrides(base_dump, spec.params_to_overrides(params))
        h = run_hash(run)
        trial.set_user_attr("run_hash", h)
        labels = _labels(run, kind="trial", variant="trial", trial=trial.number)
        store.add_entries([{"hash": h, "labels": labels}])
        if store.is_done(h):
            summary = store.summary(h)
            if summary and summary.get("status") == "pruned":
                raise optuna.TrialPruned()
            return _objective_value(spec, summary, store, h)
        last = [last_reported]  # a continued trial does not report its steps again

        def reporter(step: int, seconds: float, metrics: Mapping[str, float]) -> bool:
            value = _metric_from(spec, metrics)
            r = resource(step, seconds)
            if value is None or r <= last[0]:
                return False
            last[0] = r
            trial.report(value, r)
            return bool(trial.should_prune())

        try:
            res = run_safely(run, store, labels=labels, reporter=reporter)
        except (KeyboardInterrupt, RunInterrupted) as exc:
            raise _TrialInterrupted(str(exc) or "interrupted") from None
        if res.status == "pruned":
            raise optuna.TrialPruned()
        if res.status == "failed":
            raise _TrialFailed(res.summary.get("error", "run failed"))
        return _objective_value(spec, res.summary, store, h)

    try:
        for t in stale:
            if not t.params and spec.space:  # killed before its parameters were drawn
                storage.set_trial_user_attr(t._trial_id, "stale", True)
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                continue
            trial = optuna.trial.Trial(study, t._trial_id)
            try:
                value = objective(trial, max(t.intermediate_values, default=-1))
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
            except _TrialFailed:
                study.tell(trial, state=TrialState.FAIL)
            else:
                study.tell(trial, value)
        done = sum(1 for t in study.get_trials(deepcopy=False) if finished(t))
        remaining = max(0, spec.n_trials - done)
        if remaining:
            study.optimize(
                objective,
                n_trials=remaining,
                catch=(_TrialFailed,),
                show_progress_bar=False,
                gc_after_trial=False,
            )
    except _TrialInterrupted as exc:
        raise RunInterrupted(f"{exc}; the trial continues on --resume") from None
    n_finished = sum(1 for t in study.get_trials(deepcopy=False) if finished(t))
    complete = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if finite(t.value)
    ]
    if not complete:
        return {}, None, n_finished
    best = min(complete, key=lambda t: t.value)  # type: ignore[arg-type, return-value]
    return dict(best.params), float(best.value), n_finished  # type: ignore[arg-type]
