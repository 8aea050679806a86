"""The spec models: what one run, one ablation and one tuning study are, as pydantic models.

Every spec is plain data that round-trips through YAML/JSON: :class:`RunSpec`,
:class:`AblationSpec` (with :class:`SweepSpec` and the :class:`PlannedRun` s it expands into) and
:class:`TuneSpec` (with :class:`ParamSpec` and :class:`SchedulerSpec`). A run's optimiser and task
are resolved (preset names and preset overrides applied) and validated against the registries
when the spec is built, and stored as plain mappings.

What a component supports is asked of the component: :func:`nan_padding_unsupported` reads each
spec's declared capability (:attr:`qlrlab.registry.ComponentSpec.supports_nan_padding`).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from qlrlab.engine.dotted import _set_path
from qlrlab.engine.errors import _nested_errors
from qlrlab.registry import CURVATURES, DIRECTIONS

__all__ = [
    "AblationSpec",
    "BudgetSpec",
    "EvalSpec",
    "ParamSpec",
    "PlannedRun",
    "RunSpec",
    "SchedulerSpec",
    "SweepSpec",
    "TuneSpec",
    "finite",
    "nan_padding_unsupported",
]

#: the range of seeds torch's generators accept (``torch.manual_seed``: 64-bit)
SEED_MAX = 2**63 - 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _resolve_optimizer(value: Any) -> dict[str, Any]:
    """Turn a preset name, a ``{preset: ..., args: ..., <overrides>}`` mapping or an inline
    optimiser spec into the fully resolved optimiser dict."""
    from qlrlab.presets import PRESETS, get_preset

    def preset_dump(name: Any, args: Mapping[str, Any]) -> dict[str, Any]:
        if name not in PRESETS:
            close = difflib.get_close_matches(str(name), list(PRESETS), n=3)
            raise ValueError(
                f"unknown optimiser preset {name!r}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f"; presets: {', '.join(sorted(PRESETS))}"
            )
        try:
            spec = get_preset(name, **dict(args))
        except TypeError as exc:
            raise ValueError(f"preset {name!r}: {exc}") from None
        return spec.model_dump(mode="json")

    if isinstance(value, str):
        return preset_dump(value, {})
    if not isinstance(value, Mapping):
        raise ValueError(
            f"the optimiser must be a preset name or a mapping, got {type(value).__name__}"
        )
    value = dict(value)
    if "preset" in value:
        name = value.pop("preset")
        args = value.pop("args", None) or {}
        if not isinstance(args, Mapping):
            raise ValueError("optimizer.args must be a mapping of preset arguments")
        base = preset_dump(name, args)
        for key, sub in value.items():
            try:
                _set_path(base, str(key).split("."), sub, strict=True, root="optimizer")
            except KeyError as exc:  # a typo in a dotted preset override
                raise ValueError(str(exc.args[0])) from None
        value = base
    return value


def _validate_optimizer(value: dict[str, Any]) -> dict[str, Any]:
    from qlrlab import OptimizerSpec

    try:
        return OptimizerSpec.model_validate(value).model_dump(mode="json")
    except ValidationError as exc:
        raise ValueError(_nested_errors(exc, "optimizer")) from None


def _validate_task(value: Any) -> dict[str, Any]:
    from qlrlab.tasks import TASKS

    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise ValueError("the task must be a task name or a mapping with a 'name' key")
    try:
        return TASKS.validate(dict(value)).model_dump(mode="json")
    except ValidationError as exc:
        raise ValueError(_nested_errors(exc, "task")) from None


class BudgetSpec(_Strict):
    """How long a run trains; the first limit reached stops it.

    All ``None`` means the task's default budget (its fixed-epoch budget, or its step budget).

    Attributes:
        epochs: number of passes over the training set (may be fractional).
        steps: number of optimiser steps.
        seconds: wall-clock training seconds.
        count_eval_time: whether ``seconds`` includes time spent evaluating (default: no).
    """

    epochs: float | None = Field(None, gt=0, allow_inf_nan=False)
    steps: int | None = Field(None, gt=0)
    seconds: float | None = Field(None, gt=0, allow_inf_nan=False)
    count_eval_time: bool = False


class EvalSpec(_Strict):
    """When and on what a run evaluates its model.

    Attributes:
        every: evaluate every this many steps (``1`` = per-step full evaluation as the paper);
            ``None`` only evaluates at the start and at the end.
        every_seconds: also evaluate once this many seconds of training time have passed since
            the last evaluation (a cadence for time-based early stopping, whatever the batch
            size; the decision is shared by all data-parallel workers). ``None``: no time cadence.
        at_start: evaluate the initial model (step 0).
        at_end: evaluate the final model.
        splits: splits evaluated periodically.
        final_splits: splits evaluated at the end (the report's final losses come from here).
    """

    every: int | None = Field(None, ge=1)
    every_seconds: float | None = Field(None, gt=0, allow_inf_nan=False)
    at_start: bool = True
    at_end: bool = True
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["val", "test"])  # type: ignore[arg-type]
    final_splits: list[Literal["train", "val", "test"]] = Field(
        default_factory=lambda: ["train", "val", "test"]  # type: ignore[arg-type]
    )


class RunSpec(_Strict):
    """One training run.

    Attributes:
        name: a label (not part of the run's identity).
        task: the task spec, e.g. ``{"name": "uci_energy"}``; stored fully resolved.
        optimizer: a preset name (``"adamqlr"``), ``{"preset": ..., "args": {...}, <dotted
            overrides>}``, or an inline ``OptimizerSpec`` mapping; stored fully resolved.
        batch_size: mini-batch size (``None``: the task's default).
        budget: the training budget.
        eval: the evaluation cadence.
        seed: seeds the model initialisation and the data order.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when available).
        dtype: floating-point type of model and data.
        checkpoint_every: save a resumable checkpoint every this many steps (``None``: never).
        log_every: write a metrics row every this many steps (evaluations are always logged).
        output_dir: where ``qlrlab run`` writes (``--out`` wins).
        tensorboard: also write every logged metric to TensorBoard event files in the run's
            directory (``runs/<hash>/tensorboard``; needs ``pip install 'qlrlab[tensorboard]'``).
            Not part of the run's identity.
        nan_padding: reproduce the original code's NaN padding of short batches
            (:class:`qlrlab.losses.NaNPaddedLoss`): for a squared-error loss the GGN quadratic
            model of a batch of :math:`n < B` rows (:math:`B` = ``batch_size``) is scaled by
            :math:`n/B`. Off by default (the correct behaviour); for comparisons
            with the paper's curves only. Needs a GGN (``backend`` auto, fast or jvp) or Hessian
            (own) curvature, or none, a direction that does not use BackPACK, and one process.
    """

    name: str = "run"
    task: dict[str, Any]
    optimizer: dict[str, Any]
    batch_size: int | None = Field(None, ge=1)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: Literal["float32", "float64"] = "float32"
    checkpoint_every: int | None = Field(None, ge=1)
    log_every: int = Field(1, ge=1)
    output_dir: str | None = None
    tensorboard: bool = False
    nan_padding: bool = False

    @field_validator("task", mode="before")
    @classmethod
    def _check_task(cls, value: Any) -> dict[str, Any]:
        return _validate_task(value)

    @field_validator("optimizer", mode="before")
    @classmethod
    def _check_optimizer(cls, value: Any) -> dict[str, Any]:
        return _validate_optimizer(_resolve_optimizer(value))

    @model_validator(mode="after")
    def _check_nan_padding(self) -> RunSpec:
        if self.nan_padding:
            why = nan_padding_unsupported(self.optimizer_spec())
            if why is not None:
                raise ValueError(
                    f"nan_padding: {why}; set nan_padding: false or use a GGN quadratic model "
                    f"(curvature: {{name: ggn}})"
                )
        return self

    def optimizer_spec(self) -> Any:
        """Return the resolved :class:`qlrlab.OptimizerSpec`."""
        from qlrlab import OptimizerSpec

        return OptimizerSpec.model_validate(self.optimizer)

    def task_spec(self) -> Any:
        """Return the resolved task spec (a :class:`qlrlab.tasks.TaskSpec`)."""
        from qlrlab.tasks import TASKS

        return TASKS.validate(dict(self.task))


def nan_padding_unsupported(opt: Any) -> str | None:
    """Why an optimizer spec cannot emulate the original's NaN padding (``None``: it can).

    The direction and the curvature oracle each answer for themselves
    (:meth:`qlrlab.registry.Registry.nan_padding_unsupported`: the spec's declared
    ``supports_nan_padding``, or its family's default when it declares nothing).
    """
    for registry, spec in ((DIRECTIONS, opt.direction), (CURVATURES, opt.curvature)):
        if spec is not None:
            why = registry.nan_padding_unsupported(spec)
            if why is not None:
                return why
    return None


class SweepSpec(_Strict):
    """One one-factor-at-a-time sweep: the fields in ``set`` move together (zipped).

    Attributes:
        name: label of the sweep (e.g. ``initial_damping``).
        set: dotted key → list of values or generator; all lists must have the same length.
    """

    name: str
    set: dict[str, Any]


class AblationSpec(_Strict):
    """A base run plus what varies.

    The runs are the product tasks × variants × grid × (sweep points, or the base point) ×
    seeds. Every entry in ``tasks`` and ``variants`` is a mapping of dotted overrides applied to
    ``base`` in order (a string variant is a preset name); a variant may also say ``minus:
    [damping]`` to switch a component off ("base minus one component").

    Attributes:
        name: name of the ablation.
        base: the base :class:`RunSpec` mapping.
        tasks: label → overrides selecting and configuring a task (``None``: the base task).
        variants: label → overrides or preset name (``None``: the base optimiser only).
        grid: dotted key → values; the cartesian product is run.
        sweeps: one-factor-at-a-time sweeps (the paper's sensitivity studies).
        seeds: explicit seeds.
        repeats: number of seeds ``0..repeats-1`` (when ``seeds`` is not given).
        output_dir: where results go (``--out`` wins).
        workers: parallel worker processes (``--workers`` wins).
        threads_per_worker: torch intra-op threads in each worker process.
        pin_cpus: pin each worker process to CPUs of its own when they fit (Linux), for
            steadier step times. Off by default: placement is left to the OS.
    """

    name: str = "ablation"
    base: dict[str, Any]
    tasks: dict[str, dict[str, Any]] | None = None
    variants: dict[str, dict[str, Any] | str] | None = None
    grid: dict[str, Any] = Field(default_factory=dict)
    sweeps: list[SweepSpec] = Field(default_factory=list)
    seeds: list[int] | None = Field(None, min_length=1)
    repeats: int | None = Field(None, ge=1)
    output_dir: str | None = None
    workers: int = Field(1, ge=1)
    threads_per_worker: int = Field(1, ge=1)
    pin_cpus: bool = False

    @field_validator("seeds")
    @classmethod
    def _check_seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            bad = [s for s in v if not 0 <= s <= SEED_MAX]
            if bad:
                raise ValueError(f"seeds must lie in [0, 2**63 - 1]; got {bad[0]}")
            dup = sorted({s for s in v if v.count(s) > 1})
            if dup:
                raise ValueError(f"seed {dup[0]} is listed twice; list each seed once")
        return v

    @model_validator(mode="after")
    def _seeds_or_repeats(self) -> AblationSpec:
        if self.seeds is not None and self.repeats is not None:
            raise ValueError(
                "seeds and repeats both given: use seeds (an explicit list) or repeats "
                "(seeds 0..repeats-1), not both"
            )
        return self

    def seed_list(self) -> list[int]:
        """The seeds each point is run with."""
        if self.seeds is not None:
            return list(self.seeds)
        if self.repeats is not None:
            return list(range(self.repeats))
        return [int(self.base.get("seed", 0))]


class PlannedRun(BaseModel):
    """One run of an ablation or study, with its labels and identity.

    Attributes:
        labels: ``kind``, ``task``, ``variant``, ``grid``, ``sweep``, ``value``, ``seed``...
        spec: the resolved run spec.
        hash: :func:`run_hash` of ``spec``.
    """

    labels: dict[str, Any]
    spec: RunSpec
    hash: str


class ParamSpec(_Strict):
    """One dimension of a search space.

    Attributes:
        type: ``log_uniform``, ``uniform``, ``int``, ``log_int`` or ``choice``.
        low: lower bound (not for ``choice``).
        high: upper bound (not for ``choice``).
        choices: the options of a ``choice``.
        one_minus: sample ``x`` and set the field to ``1 - x`` (the paper's "1−β on a log scale";
            the same as prefixing the key with ``1-``).
    """

    type: Literal["log_uniform", "uniform", "int", "log_int", "choice"]
    low: float | None = None
    high: float | None = None
    choices: list[Any] | None = None
    one_minus: bool = False

    @field_validator("choices")
    @classmethod
    def _nonempty(cls, v: list[Any] | None) -> list[Any] | None:
        if v is not None and not v:
            raise ValueError("choices must not be empty")
        return v

    def check(self) -> None:
        """Raise ``ValueError`` when the bounds or choices do not fit the type."""
        if self.type == "choice":
            if not self.choices:
                raise ValueError("a choice parameter needs 'choices'")
            return
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} parameter needs low < high")
        if self.type.startswith("log") and self.low <= 0:
            raise ValueError(f"a {self.type} parameter needs low > 0")


class SchedulerSpec(_Strict):
    """Early stopping of trials: asynchronous successive halving (ASHA) or Hyperband.

    Attributes:
        type: ``asha`` (successive halving), ``hyperband`` or ``none``.
        resource: what the rungs count: optimiser ``steps`` or training ``seconds`` (the paper
            used seconds: grace 1 s, reduction factor 4).
        min_resource: the first rung (the grace period).
        max_resource: the maximum resource of a trial (Hyperband and Ray's ``max_t``);
            ``None`` derives it from the trial budget.
        reduction_factor: η, the fraction 1/η of trials promoted at each rung.
    """

    type: Literal["asha", "hyperband", "none"] = "asha"
    resource: Literal["steps", "seconds"] = "steps"
    min_resource: float = Field(1.0, gt=0, allow_inf_nan=False)
    max_resource: float | None = Field(None, gt=0, allow_inf_nan=False)
    reduction_factor: int = Field(4, ge=2)

    @model_validator(mode="after")
    def _min_below_max(self) -> SchedulerSpec:
        if self.max_resource is not None and self.min_resource > self.max_resource:
            raise ValueError(
                f"min_resource {self.min_resource:g} exceeds max_resource "
                f"{self.max_resource:g}: set min_resource <= max_resource"
            )
        return self


class TuneSpec(_Strict):
    """A hyperparameter study followed by repeats of the best configuration (paper §3.4).

    Attributes:
        name: the study name (also the Optuna study name).
        base: the base :class:`RunSpec` mapping.
        space: dotted key (optionally ``1-`` prefixed) → :class:`ParamSpec`.
        metric: what a trial minimises: ``val_loss``, ``train_loss`` (full training set),
            ``test_loss`` or ``batch_loss`` (mean mini-batch loss since the last evaluation).
        scope: ``last`` (the final reported value, as the paper) or ``best``.
        n_trials: number of trials (200 in the paper).
        sampler: ``random`` (the paper) or ``tpe``.
        sampler_seed: seeds the sampler.
        scheduler: early stopping of trials.
        trial_overrides: dotted overrides applied to trials only (e.g. a time cap
            ``budget.seconds`` and ``eval.every``).
        repeats: how many seeds the best configuration is re-run with (50 in the paper).
        repeat_seeds: explicit seeds for the repeats (default ``1000..1000+repeats-1``).
        repeat_overrides: dotted overrides applied to the repeats only.
        output_dir: where the study and runs go (``--out`` wins).
    """

    name: str = "tune"
    base: dict[str, Any]
    space: dict[str, ParamSpec]
    metric: Literal["val_loss", "train_loss", "test_loss", "batch_loss"] = "val_loss"
    scope: Literal["last", "best"] = "last"
    n_trials: int = Field(20, ge=1)
    sampler: Literal["random", "tpe"] = "random"
    sampler_seed: int = Field(0, ge=0, le=2**32 - 1)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    trial_overrides: dict[str, Any] = Field(default_factory=dict)
    repeats: int = Field(0, ge=0)
    repeat_seeds: list[int] | None = Field(None, min_length=1)
    repeat_overrides: dict[str, Any] = Field(default_factory=dict)
    output_dir: str | None = None

    def params_to_overrides(self, params: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """Turn sampled values (keyed as in :attr:`space`) into dotted overrides, applying the
        ``1-`` idiom."""
        out: list[tuple[str, Any]] = []
        for key, p in self.space.items():
            if key not in params:
                continue
            value = params[key]
            field = key
            if key.startswith("1-"):
                field, value = key[2:], 1.0 - float(value)
            elif p.one_minus:
                value = 1.0 - float(value)
            out.append((field, value))
        return out

    def repeat_seed_list(self) -> list[int]:
        """Seeds of the repeats of the best configuration."""
        if self.repeat_seeds is not None:
            return list(self.repeat_seeds)
        return [1000 + i for i in range(self.repeats)]


def finite(x: Any) -> bool:
    """Whether ``x`` is a finite real number."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
