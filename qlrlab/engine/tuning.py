"""Hyperparameter tuning (paper §3.4): a search, early stopping, then repeats of the best.

Two back-ends run the same :class:`~qlrlab.engine.specs.TuneSpec`:

* **Optuna** (default, embedded): the study lives in ``OUT/optuna.db`` (SQLite), so an interrupted
  study resumes: trials left ``RUNNING`` by a killed process are continued as the same trials
  (their runs continue from their checkpoints, their rung values stay theirs), however often the
  study was killed. Early stopping uses Optuna's successive-halving (ASHA) or Hyperband pruner on
  optimiser steps or on training seconds (reported in milliseconds). One ``qlrlab tune`` process
  per study directory (a second one is refused).
* **Ray Tune** (clusters): ``ASHAScheduler`` with ``time_attr`` = steps or training seconds, on
  a Ray cluster (``--address``) or a local Ray instance; resumes with ``Tuner.restore``.

Trial runs are stored like any run (label ``kind: trial``); the best configuration is re-run with
``repeats`` seeds (label ``kind: repeat``, ``variant: best``) and written to ``OUT/best.json``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlrlab.engine.ablation import AblationResult, execute_planned, preflight, prepare_output
from qlrlab.engine.runner import RunInterrupted, run_safely
from qlrlab.engine.specs import (
    PlannedRun,
    RunSpec,
    SpecError,
    TuneSpec,
    apply_overrides,
    finite,
    run_hash,
)
from qlrlab.engine.storage import RunStore, atomic_write_json

__all__ = ["TrialsFailed", "TuneResult", "run_tune", "trial_base", "validate_space"]

_METRIC_COLUMN = {
    "val_loss": "val_loss",
    "train_loss": "train_loss",
    "test_loss": "test_loss",
    "batch_loss": "loss",
}
_SUMMARY_KEY = {
    "val_loss": "final_val_loss",
    "train_loss": "final_train_loss",
    "test_loss": "final_test_loss",
    "batch_loss": "final_batch_loss",
}


@dataclass
class TuneResult:
    """Outcome of a study.

    Attributes:
        out_dir: the output directory.
        best_params: the best trial's parameters (keyed as in the search space).
        best_value: its objective value.
        n_trials: trials finished (complete, pruned or failed).
        repeats: the outcome of the repeats of the best configuration.
        best_overrides: the dotted overrides the best parameters stand for.
        failures: the failed trials (an exception, not a divergence or pruning), each
            ``{"params": ..., "error": ...}``, in the order they were collected.
    """

    out_dir: Path
    best_params: dict[str, Any]
    best_value: float | None
    n_trials: int
    repeats: AblationResult | None = None
    best_overrides: list[tuple[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)


class TrialsFailed(RuntimeError):
    """Every trial of a study failed: nothing to report, no best configuration written.

    Attributes:
        failures: the failed trials (``{"params": ..., "error": ...}``).
        n_trials: trials finished.
        out_dir: the output directory (the failed runs' ``summary.json`` hold the tracebacks).
    """

    def __init__(self, failures: list[dict[str, Any]], n_trials: int, out_dir: Path) -> None:
        self.failures, self.n_trials, self.out_dir = failures, n_trials, out_dir
        super().__init__(failure_summary(failures, n_trials))


def failure_summary(failures: list[dict[str, Any]], n_trials: int) -> str:
    """One paragraph on failed trials: the first one's error and configuration, then a count."""
    if not failures:
        return ""
    first = failures[0]
    params = ", ".join(f"{k}={v!r}" for k, v in first["params"].items()) or "-"
    text = f"{len(failures)} of {n_trials} trials failed; the first: {first['error']}\n"
    text += f"  its configuration: {params}"
    if len(failures) > 1:
        text += f"\n  ... and {len(failures) - 1} more failed trial(s)"
    return text


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


def trial_base(spec: TuneSpec, base_overrides: list[tuple[str, Any]] = ()) -> RunSpec:  # type: ignore[assignment]
    """The run every trial starts from: ``base`` + ``trial_overrides`` + ``--set base.*``."""
    base = apply_overrides(spec.base, [])
    over = list(spec.trial_overrides.items()) + list(base_overrides)
    return apply_overrides(base.model_dump(mode="json"), over, source="trial_overrides")


def validate_space(spec: TuneSpec, base: RunSpec) -> None:
    """Check every search dimension's bounds and that its dotted key exists and accepts the
    bounds' values.

    Raises:
        SpecError: naming the dimension and the fix.
    """
    for key, p in spec.space.items():
        try:
            p.check()
        except ValueError as exc:
            raise SpecError(str(exc), field=f"space.{key}") from None
        samples = p.choices if p.type == "choice" else [p.low, p.high]
        for v in samples or []:
            if p.type in ("int", "log_int"):
                v = int(v)
            try:
                apply_overrides(base.model_dump(mode="json"), spec.params_to_overrides({key: v}))
            except SpecError as exc:
                raise SpecError(
                    f"search dimension {key!r} with value {v!r}: {exc.message}",
                    field=f"space.{key}",
                    fix=exc.fix,
                ) from None
    never_mid_run = base.eval.every is None and base.eval.every_seconds is None
    if spec.scheduler.type != "none" and never_mid_run and spec.metric != "batch_loss":
        raise SpecError(
            "the scheduler needs intermediate results but trials only evaluate at the end",
            field="trial_overrides",
            fix="set trial_overrides: {eval.every: K} or {eval.every_seconds: S} "
            "(or scheduler.type: none)",
        )
    if spec.metric == "batch_loss" and spec.scheduler.type != "none" and never_mid_run:
        raise SpecError(
            "metric batch_loss is reported at evaluations; trials never evaluate mid-run",
            field="trial_overrides",
            fix="set trial_overrides: {eval.every: K} or {eval.every_seconds: S}",
        )


def _objective_value(
    spec: TuneSpec, summary: Mapping[str, Any] | None, store: RunStore, h: str
) -> float:
    if not summary:
        return math.inf
    if spec.scope == "last":
        if summary.get("status") == "diverged":
            return math.inf
        v = summary.get(_SUMMARY_KEY[spec.metric])
        return float(v) if finite(v) else math.inf
    df = store.metrics(h)
    col = _METRIC_COLUMN[spec.metric]
    if df is None or col not in df:
        return math.inf
    vals = [float(x) for x in df[col] if finite(x)]
    return min(vals) if vals else math.inf


def _resource_fn(spec: TuneSpec) -> Any:
    if spec.scheduler.resource == "steps":
        return lambda step, seconds: int(step)
    return lambda step, seconds: round(seconds * 1000.0)


def _metric_from(spec: TuneSpec, metrics: Mapping[str, float]) -> float | None:
    key = {"val_loss": "val_loss", "train_loss": "train_loss", "test_loss": "test_loss"}.get(
        spec.metric, "batch_loss"
    )
    v = metrics.get(key)
    return float(v) if finite(v) else None


def _labels(run: RunSpec, **extra: Any) -> dict[str, Any]:
    return {"task": run.task["name"], "seed": run.seed, **extra}


# --------------------------------------------------------------------------------------------
# Optuna
# --------------------------------------------------------------------------------------------


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
    spec: TuneSpec, base: RunSpec, store: RunStore, quiet: bool
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
    best = min(complete, key=lambda t: t.value)
    return dict(best.params), float(best.value), n_finished


# --------------------------------------------------------------------------------------------
# Ray Tune
# --------------------------------------------------------------------------------------------


def _ray_trainable(config: dict[str, Any], ctx: dict[str, Any]) -> None:
    """The Ray Tune function trainable: one trial = one run, reporting at each evaluation.

    It runs with the driver's settings (``ctx["env"]``), skips a run that is already done
    (a resumed study), and reports a failed run as a result (``failed: 1``, ``error``) instead of
    raising, so that the driver prints one summary rather than a traceback per trial.
    """
    from ray import tune

    from qlrlab.engine.cluster import apply_job_environment, node_label

    apply_job_environment(ctx["env"])
    spec = TuneSpec.model_validate(ctx["spec"])
    params = {key: config[f"p{i}"] for i, key in enumerate(ctx["keys"])}
    run = apply_overrides(ctx["base"], spec.params_to_overrides(params))
    store = RunStore(ctx["root"])
    h = run_hash(run)

    def reporter(step: int, seconds: float, metrics: Mapping[str, float]) -> bool:
        value = _metric_from(spec, metrics)
        if value is None:
            return False
        tune.report({"objective": value, "step": step, "train_seconds": seconds})
        return False

    if store.is_done(h):  # finished before the driver was interrupted: never run twice
        summary: Mapping[str, Any] = store.summary(h) or {}
    else:
        labels = _labels(run, kind="trial", variant="trial")
        res = run_safely(run, store, labels=labels, reporter=reporter)
        summary = res.summary
        if res.status == "failed":
            tune.report(
                {
                    "objective": 1e300,
                    "step": summary.get("steps", 0) or 0,
                    "train_seconds": summary.get("train_time", 0.0) or 0.0,
                    "failed": 1,
                    "error": f"on node {node_label()}: {summary.get('error', 'run failed')}",
                    "run_hash": h,
                }
            )
            return
    value = _objective_value(spec, summary, store, h)
    tune.report(
        {
            "objective": value if finite(value) else 1e300,
            "step": summary.get("steps", 0),
            "train_seconds": summary.get("train_time", 0.0),
            "done_value": value if finite(value) else 1e300,
            "failed": 0,
            "run_hash": h,
        }
    )


def _tune_ray(
    spec: TuneSpec,
    base: RunSpec,
    store: RunStore,
    address: str | None,
    resume: bool,
    failures: list[dict[str, Any]],
) -> tuple[dict[str, Any], float | None, int]:
    try:
        import ray
        from ray import tune
        from ray.tune.schedulers import ASHAScheduler
        from ray.tune.search import BasicVariantGenerator
    except ImportError as exc:
        raise SpecError(
            f"the ray back-end needs Ray Tune: {exc}", fix="pip install 'qlrlab[ray]'"
        ) from None
    keys = list(spec.space)
    space: dict[str, Any] = {}
    for i, key in enumerate(keys):
        p = spec.space[key]
        if p.type == "log_uniform":
            space[f"p{i}"] = tune.loguniform(p.low, p.high)
        elif p.type == "uniform":
            space[f"p{i}"] = tune.uniform(p.low, p.high)
        elif p.type == "int":
            space[f"p{i}"] = tune.randint(int(p.low), int(p.high) + 1)
        elif p.type == "log_int":
            space[f"p{i}"] = tune.lograndint(int(p.low), int(p.high) + 1)
        else:
            space[f"p{i}"] = tune.choice(p.choices)
    sch = spec.scheduler
    time_attr = "step" if sch.resource == "steps" else "train_seconds"
    max_t = sch.max_resource
    if max_t is None:
        max_t = (base.budget.steps if sch.resource == "steps" else base.budget.seconds) or 10**9
    scheduler = None
    if sch.type != "none":
        scheduler = ASHAScheduler(
            time_attr=time_attr,
            max_t=max_t,
            grace_period=sch.min_resource,
            reduction_factor=sch.reduction_factor,
        )
    from qlrlab.engine.ablation import ensure_ray
    from qlrlab.engine.cluster import check_cluster, job_environment

    env = job_environment(threads=1)
    ctx = {
        "spec": spec.model_dump(mode="json"),
        "keys": keys,
        "base": base.model_dump(mode="json"),
        "root": str(store.root),
        "env": env,
    }
    started = ensure_ray(address)
    try:
        check_cluster(env, [base], store.root)  # before any trial: versions, data, output
        trainable = tune.with_resources(tune.with_parameters(_ray_trainable, ctx=ctx), {"cpu": 1})
        exp_dir = store.root / "ray" / spec.name
        if resume and tune.Tuner.can_restore(str(exp_dir)):
            tuner = tune.Tuner.restore(
                str(exp_dir), trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric="objective",
                    mode="min",
                    num_samples=spec.n_trials,
                    scheduler=scheduler,
                    # seeded: a study restarted after its driver died samples the same trials,
                    # so finished runs are found in the store and never run twice
                    search_alg=BasicVariantGenerator(random_state=spec.sampler_seed),
                ),
                run_config=tune.RunConfig(
                    name=spec.name, storage_path=str(store.root / "ray"), verbose=0
                ),
            )
        results = tuner.fit()
        entries = []
        best_params: dict[str, Any] = {}
        best_value: float | None = None
        n = 0
        for r in results:
            n += 1
            if r.config is None:
                continue
            params = {key: r.config[f"p{i}"] for i, key in enumerate(keys)}
            run = apply_overrides(ctx["base"], spec.params_to_overrides(params))
            entries.append(
                {"hash": run_hash(run), "labels": _labels(run, kind="trial", variant="trial")}
            )
            metrics = r.metrics or {}
            value = metrics.get("objective")
            if r.error is not None or metrics.get("failed"):
                if r.error is not None:  # Ray's own failure (the worker died, ...)
                    lines = [ln for ln in str(r.error).splitlines() if ln.strip()]
                    error = f"{type(r.error).__name__}: {lines[-1] if lines else r.error}"
                else:
                    error = str(metrics.get("error", "run failed"))
                failures.append({"params": params, "error": error})
                continue
            if finite(value) and value < 1e299:
                if best_value is None or value < best_value:
                    best_params, best_value = params, float(value)
        store.add_entries(entries)
        return best_params, best_value, n
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def run_tune(
    spec: TuneSpec,
    out_dir: str | Path,
    *,
    base_overrides: list[tuple[str, Any]] = (),  # type: ignore[assignment]
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    backend: str = "optuna",
    address: str | None = None,
    workers: int = 1,
    check_data: bool = True,
) -> TuneResult:
    """Run a study, then the repeats of its best configuration.

    Args:
        spec: the study.
        out_dir: the output directory (holds ``optuna.db``, ``runs/``, ``best.json``).
        base_overrides: dotted overrides applied to every trial and repeat.
        resume: continue a previous study in ``out_dir``.
        overwrite: start again in a directory that holds results.
        quiet: no progress bars.
        backend: ``optuna`` or ``ray``.
        address: Ray cluster address (``ray`` back-end).
        workers: parallel processes for the repeats.
        check_data: check datasets before starting.

    Returns:
        The :class:`TuneResult`.

    Raises:
        SpecError: bad input, before any trial starts.
    """
    base = trial_base(spec, list(base_overrides))
    validate_space(spec, base)
    base_plain = apply_overrides(spec.base, list(base_overrides))
    repeat_base = apply_overrides(
        base_plain.model_dump(mode="json"),
        list(spec.repeat_overrides.items()),
        source="repeat_overrides",
    )
    if check_data:
        preflight([base, repeat_base])
    store = prepare_output(out_dir, resume=resume, overwrite=overwrite, kind="tune")
    store.add_entries([], kind="tune", name=spec.name, spec=spec.model_dump(mode="json"))
    failures: list[dict[str, Any]] = []
    if backend == "optuna":
        params, value, n = _tune_optuna(spec, base, store, quiet)
        failures = _optuna_failures(store, spec.name)
    elif backend == "ray":
        params, value, n = _tune_ray(spec, base, store, address, resume, failures)
    else:
        raise SpecError(f"unknown backend {backend!r}", fix="use --backend optuna or ray")
    if not params and failures:  # nothing to report: no best.json that looks like a result
        (store.root / "best.json").unlink(missing_ok=True)
        raise TrialsFailed(failures, n, store.root)
    overrides = spec.params_to_overrides(params)
    atomic_write_json(
        store.root / "best.json",
        {
            "params": params,
            "overrides": {k: v for k, v in overrides},
            "value": value,
            "metric": spec.metric,
            "scope": spec.scope,
            "n_trials": n,
        },
    )
    result = TuneResult(
        out_dir=store.root,
        best_params=params,
        best_value=value,
        n_trials=n,
        best_overrides=overrides,
        failures=failures,
    )
    seeds = spec.repeat_seed_list()
    if params and seeds:
        best = apply_overrides(repeat_base.model_dump(mode="json"), overrides)
        planned = []
        for s in seeds:
            run = best.model_copy(update={"seed": int(s)})
            planned.append(
                PlannedRun(
                    labels=_labels(run, kind="repeat", variant="best"),
                    spec=run,
                    hash=run_hash(run),
                )
            )
        store.add_entries([{"hash": p.hash, "labels": p.labels} for p in planned])
        result.repeats = execute_planned(
            planned, store, workers=workers, quiet=quiet, desc=f"{spec.name} repeats"
        )
    return result
