"""The Ray Tune back-end (clusters).

``ASHAScheduler`` with ``time_attr`` = steps or training seconds, on a Ray cluster (``--address``)
or a local Ray instance; resumes with ``Tuner.restore``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qlrlab.engine.errors import SpecError
from qlrlab.engine.hashing import run_hash
from qlrlab.engine.models import RunSpec, TuneSpec, finite
from qlrlab.engine.overrides import apply_overrides
from qlrlab.engine.runner import run_safely
from qlrlab.engine.storage import RunStore
from qlrlab.engine.tuning._common import (
    Search,
    SearchOptions,
    _labels,
    _metric_from,
    _objective_value,
)


class RayBackend:
    """The Ray Tune back-end (:class:`~qlrlab.engine.tuning._common.TuningBackend`)."""

    def search(
        self, spec: TuneSpec, base: RunSpec, store: RunStore, options: SearchOptions
    ) -> Search:
        """Run (or restore) the study on Ray; trials run in Ray's worker processes."""
        failures: list[dict[str, Any]] = []
        params, value, n = _tune_ray(spec, base, store, options.address, options.resume, failures)
        return Search(params, value, n, failures)


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
            space[f"p{i}"] = tune.loguniform(p.low, p.high)  # type: ignore[arg-type]
        elif p.type == "uniform":
            space[f"p{i}"] = tune.uniform(p.low, p.high)  # type: ignore[arg-type]
        elif p.type == "int":
            space[f"p{i}"] = tune.randint(int(p.low), int(p.high) + 1)  # type: ignore[arg-type]
        elif p.type == "log_int":
            space[f"p{i}"] = tune.lograndint(int(p.low), int(p.high) + 1)  # type: ignore[arg-type]
        else:
            space[f"p{i}"] = tune.choice(p.choices)  # type: ignore[arg-type]
    sch = spec.scheduler
    time_attr = "step" if sch.resource == "steps" else "train_seconds"
    max_t = sch.max_resource
    if max_t is None:
        max_t = (base.budget.steps if sch.resource == "steps" else base.budget.seconds) or 10**9
    scheduler = None
    if sch.type != "none":
        scheduler = ASHAScheduler(
            time_attr=time_attr,
            max_t=max_t,  # type: ignore[arg-type]
            grace_period=sch.min_resource,  # type: ignore[arg-type]
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
        for r in results:  # type: ignore[attr-defined]
            n += 1
            if r.config is None:
                continue
            params = {key: r.config[f"p{i}"] for i, key in enumerate(keys)}
            run = apply_overrides(ctx["base"], spec.params_to_overrides(params))  # type: ignore[arg-type]
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
            if finite(value) and value < 1e299:  # type: ignore[operator]
                if best_value is None or value < best_value:  # type: ignore[operator]
                    best_params, best_value = params, float(value)  # type: ignore[arg-type]
        store.add_entries(entries)
        return best_params, best_value, n
    finally:
        if started:
            ray.shutdown()
