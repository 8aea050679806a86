"""Experiment specs: what one run, one ablation and one tuning study are, as pydantic models.

Every spec is plain data that round-trips through YAML/JSON. Three documents exist:

* :class:`RunSpec` — a task, an optimiser (inline, or a preset name with overrides), a batch size,
  a budget (epochs, steps or seconds; whichever comes first), an evaluation cadence, a seed, a as a
  device and a dtype.
* :class:`AblationSpec` — a base run plus what varies: named tasks, named variants, a grid over
  dotted fields, one-factor-at-a-time sweeps, and seeds.
* :class:`TuneSpec` — a base run plus a search space over dotted fields, the metric, the number of
  trials, an early-stopping scheduler and the number of repeats of the best configuration.

Dotted keys address any field of a run (``optimizer.damping.initial``, ``budget.steps``,
``task.subset``). Setting ``X.name`` of a component to a different name replaces the whole
component by that component's defaults, so ``optimizer.damping.name: constant`` is a valid swap.
A key prefixed with ``1-`` (``1-optimizer.direction.beta1``) sets ``1 - value``: the paper's way of
searching momentum-like coefficients on a log scale.

Nothing here executes code from a spec: YAML is read with :func:`yaml.safe_load`, values are
parsed as YAML scalars, and value generators are a closed set (``linspace``/``logspace``).

The engine keeps each job in its own module, and this module is their public face (every name
stays importable from here):

* :mod:`qlrlab.engine.models` — the pydantic models (:class:`RunSpec`, :class:`AblationSpec`,
  :class:`TuneSpec`...);
* :mod:`qlrlab.engine.overrides` — the override language (:func:`parse_value`,
  :func:`parse_override`, :func:`apply_overrides`, :func:`resolve_run`), on dotted keys
  (:mod:`qlrlab.engine.dotted`);
* :mod:`qlrlab.engine.yaml_io` — YAML loading with line numbers (:func:`load_yaml`);
* :mod:`qlrlab.engine.errors` — :class:`SpecError` and the formatting of validation errors;
* :mod:`qlrlab.engine.planning` — ablation planning and value generators (:func:`plan_ablation`,
  :func:`expand_values`);
* :mod:`qlrlab.engine.hashing` — a run's identity (:func:`run_hash`).
"""

from __future__ import annotations

# Names outside ``__all__`` are re-exported (noqa: F401) for code written before the split.
from qlrlab.engine.dotted import _get_path, _set_path, _unknown_key_msg  # noqa: F401
from qlrlab.engine.errors import (  # noqa: F401
    SpecError,
    _best_line,
    _clean_msg,
    _format_validation,
    _nested_errors,
)
from qlrlab.engine.hashing import (  # noqa: F401
    LATER_FIELD_DEFAULTS,
    LATER_SUBFIELD_DEFAULTS,
    NON_IDENTITY_FIELDS,
    run_hash,
)
from qlrlab.engine.models import (  # noqa: F401
    SEED_MAX,
    AblationSpec,
    BudgetSpec,
    EvalSpec,
    ParamSpec,
    PlannedRun,
    RunSpec,
    SchedulerSpec,
    SweepSpec,
    TuneSpec,
    _resolve_optimizer,
    _Strict,
    _validate_optimizer,
    _validate_task,
    finite,
    nan_padding_unsupported,
)
from qlrlab.engine.overrides import apply_overrides, parse_override, parse_value, resolve_run
from qlrlab.engine.planning import (  # noqa: F401
    MAX_GENERATED_VALUES,
    MAX_PLANNED_RUNS,
    OFF_COMPONENTS,
    _resolve_point,
    _sub_lines,
    _variant_overrides,
    expand_values,
    plan_ablation,
)
from qlrlab.engine.yaml_io import _floatify, load_yaml  # noqa: F401

__all__ = [
    "AblationSpec",
    "BudgetSpec",
    "EvalSpec",
    "ParamSpec",
    "PlannedRun",
    "RunSpec",
    "SchedulerSpec",
    "SpecError",
    "SweepSpec",
    "TuneSpec",
    "apply_overrides",
    "expand_values",
    "load_yaml",
    "parse_override",
    "parse_value",
    "plan_ablation",
    "resolve_run",
    "run_hash",
]
