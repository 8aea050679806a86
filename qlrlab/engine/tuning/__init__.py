"""Hyperparameter tuning (paper §3.4): a search, early stopping, then repeats of the best.

Two back-ends run the same :class:`~qlrlab.engine.specs.TuneSpec`, each behind the
:class:`TuningBackend` protocol (``_optuna.py``, ``_ray.py``; :data:`BACKENDS` maps ``--backend``
names to them):

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

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlrlab.engine.ablation import AblationResult, execute_planned, preflight, prepare_output
from qlrlab.engine.runner import RunInterrupted, run_safely  # noqa: F401
from qlrlab.engine.specs import (  # noqa: F401
    PlannedRun,
    RunSpec,
    SpecError,
    TuneSpec,
    apply_overrides,
    finite,
    run_hash,
)
from qlrlab.engine.storage import RunStore, atomic_write_json
from qlrlab.engine.tuning._common import (  # noqa: F401  (names kept importable from here)
    _METRIC_COLUMN,
    _SUMMARY_KEY,
    Search,
    SearchOptions,
    TuningBackend,
    _labels,
    _metric_from,
    _objective_value,
    _resource_fn,
)
from qlrlab.engine.tuning._optuna import (  # noqa: F401
    OptunaBackend,
    _optuna_failures,
    _optuna_pruner,
    _suggest,
    _TrialFailed,
    _TrialInterrupted,
    _tune_optuna,
)
from qlrlab.engine.tuning._ray import RayBackend, _ray_trainable, _tune_ray  # noqa: F401

__all__ = [
    "BACKENDS",
    "Search",
    "SearchOptions",
    "TrialsFailed",
    "TuneResult",
    "TuningBackend",
    "run_tune",
    "trial_base",
    "validate_space",
]

#: the search back-ends by ``--backend`` name
BACKENDS: dict[str, TuningBackend] = {"optuna": OptunaBackend(), "ray": RayBackend()}


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
                v = int(v)  # type: ignore[arg-type]
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
    try:  # the folder's lock is released when the study ends, not when the store is collected
        store.add_entries([], kind="tune", name=spec.name, spec=spec.model_dump(mode="json"))
        if backend not in BACKENDS:
            raise SpecError(f"unknown backend {backend!r}", fix="use --backend optuna or ray")
        options = SearchOptions(quiet=quiet, resume=resume, address=address, run=run_safely)
        found = BACKENDS[backend].search(spec, base, store, options)
        params, value, n, failures = found.params, found.value, found.n_trials, found.failures
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
            _supersede_old_repeats(store, {p.hash for p in planned})
            store.add_entries([{"hash": p.hash, "labels": p.labels} for p in planned])
            result.repeats = execute_planned(
                planned, store, workers=workers, quiet=quiet, desc=f"{spec.name} repeats"
            )
        return result
    finally:
        store.lock.release()


def _supersede_old_repeats(store: RunStore, current: set[str]) -> None:
    """Relabel the repeats of an earlier best configuration (a resumed study whose best changed)
    ``kind: superseded``: their runs stay on disk and in the index, but the report's "best" is
    the current best's repeats only, never a mix of two configurations."""
    index = store.read_index()
    changed = False
    for e in index.get("entries", []):
        labels = e.get("labels", {})
        if labels.get("kind") == "repeat" and e.get("hash") not in current:
            e["labels"] = {**labels, "kind": "superseded"}
            changed = True
    if changed:
        store.write_index(index)
