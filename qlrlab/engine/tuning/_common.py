"""What the tuning back-ends share: the objective of a trial, its reported metric and resource,
the labels of its run, and the protocol a back-end implements (:class:`TuningBackend`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from qlrlab.engine.models import RunSpec, TuneSpec, finite
from qlrlab.engine.runner import RunResult
from qlrlab.engine.storage import RunStore

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
class Search:
    """What a back-end's search found.

    Attributes:
        params: the best trial's sampled values (keyed as in ``TuneSpec.space``); empty when no
            trial completed with a finite value.
        value: the best objective value (``None`` when there is none).
        n_trials: the number of finished trials.
        failures: the failed trials (``{"params": ..., "error": ...}``).
    """

    params: dict[str, Any]
    value: float | None
    n_trials: int
    failures: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SearchOptions:
    """How to search.

    Attributes:
        quiet: no progress output.
        resume: continue a previous study.
        address: a Ray cluster address (Ray back-end).
        run: runs one trial's run (``run_safely``'s signature); looked up by the caller when
            the study starts, so that a patched ``qlrlab.engine.tuning.run_safely`` is used.
    """

    quiet: bool = False
    resume: bool = False
    address: str | None = None
    run: Callable[..., RunResult] | None = None


class TuningBackend(Protocol):
    """A search back-end: samples configurations of ``spec.space`` over ``base``, runs each as a
    trial (stored in ``store`` with label ``kind: trial``), stops trials early with
    ``spec.scheduler``, and returns the best."""

    def search(
        self, spec: TuneSpec, base: RunSpec, store: RunStore, options: SearchOptions
    ) -> Search:
        """Run the study; return what it found."""
        ...


def _objective_value(
    spec: TuneSpec, summary: Mapping[str, Any] | None, store: RunStore, h: str
) -> float:
    if not summary:
        return math.inf
    if spec.scope == "last":
        if summary.get("status") == "diverged":
            return math.inf
        v = summary.get(_SUMMARY_KEY[spec.metric])
        return float(v) if finite(v) else math.inf  # type: ignore[arg-type]
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
    return float(v) if finite(v) else None  # type: ignore[arg-type]


def _labels(run: RunSpec, **extra: Any) -> dict[str, Any]:
    return {"task": run.task["name"], "seed": run.seed, **extra}
