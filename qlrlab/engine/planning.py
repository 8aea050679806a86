"""Planning: an ablation expanded into its runs, and the value generators of grids and sweeps.

:func:`plan_ablation` validates every run of an :class:`~qlrlab.engine.models.AblationSpec` up
front (tasks × variants × grid × sweep points × seeds) and names each by
:func:`~qlrlab.engine.hashing.run_hash`; :func:`expand_values` is the closed set of value
generators (``linspace``/``logspace``; no code).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from qlrlab.engine.errors import SpecError, _best_line
from qlrlab.engine.hashing import run_hash
from qlrlab.engine.models import AblationSpec, PlannedRun, RunSpec
from qlrlab.engine.overrides import apply_overrides
from qlrlab.registry import CURVATURES, DAMPINGS, DIRECTIONS, STEP_SIZES

__all__ = ["OFF_COMPONENTS", "expand_values", "plan_ablation"]

#: the most values one generator (``linspace``/``logspace``) may produce, and the most runs an
#: ablation may plan: larger numbers are typos (``logspace: [-8, 0, 100000000]``), and planning
#: them would hang
MAX_GENERATED_VALUES = 10_000
MAX_PLANNED_RUNS = 100_000

#: "Switched off" component specs used by ``minus:`` in variants (each family's registry says
#: what "off" means for it).
OFF_COMPONENTS: dict[str, Any] = {
    r.family: r.off for r in (DIRECTIONS, CURVATURES, STEP_SIZES, DAMPINGS) if r.can_switch_off
}


def expand_values(obj: Any) -> list[Any]:
    """Expand a list of values or a generator mapping into a list.

    Generators (closed set, no code):

    * ``{linspace: [start, stop, num]}``
    * ``{logspace: [start, stop, num], base: 10}`` → ``base ** linspace(start, stop, num)``
    * any of them with ``reciprocal: true`` (``1/x``) or ``one_minus: true`` (``1 - x``), and
      ``round: n`` significant digits.

    Examples: the paper's λ₀ sweep is ``{logspace: [-8, 0, 17]}``; its stepping factor sweep is
    ``{logspace: [0, 2, 11], base: 2}`` with ``ω_dec = {logspace: [0, 2, 11], base: 2,
    reciprocal: true}``.

    Raises:
        ValueError: for an unknown generator.
    """
    if isinstance(obj, list):
        return list(obj)
    if not isinstance(obj, Mapping):
        return [obj]
    obj = dict(obj)
    allowed = {"linspace", "logspace", "base", "reciprocal", "one_minus", "round", "values"}
    unknown = set(obj) - allowed
    if unknown:
        raise ValueError(
            f"unknown value generator key(s) {sorted(unknown)}; use a list or one of "
            "{linspace: [a, b, n]}, {logspace: [a, b, n], base: 10}, with optional reciprocal, "
            "one_minus, round"
        )
    if "values" in obj:
        vals = [float(v) for v in obj["values"]]
    elif "linspace" in obj or "logspace" in obj:
        key = "linspace" if "linspace" in obj else "logspace"
        start, stop, num = obj[key]
        num = int(num)
        if num < 1:
            raise ValueError(f"{key} needs num >= 1")
        if num > MAX_GENERATED_VALUES:
            raise ValueError(
                f"{key} asks for {num} values; at most {MAX_GENERATED_VALUES} are allowed "
                "(the third number is the count of points, e.g. {logspace: [-8, 0, 17]})"
            )
        pts = [start + (stop - start) * i / (num - 1) if num > 1 else start for i in range(num)]
        if key == "logspace":
            base = float(obj.get("base", 10.0))
            pts = [base**p for p in pts]
        vals = [float(p) for p in pts]
    else:
        raise ValueError("a value generator needs linspace, logspace or values")
    if obj.get("reciprocal"):
        vals = [1.0 / v for v in vals]
    if obj.get("one_minus"):
        vals = [1.0 - v for v in vals]
    if "round" in obj:
        digits = int(obj["round"])
        vals = [float(f"{v:.{digits}g}") for v in vals]
    return vals


def _variant_overrides(label: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, str):
        return [("optimizer", value)]
    out: list[tuple[str, Any]] = []
    minus: list[str] = []
    for key, val in dict(value).items():
        if key == "minus":
            minus = [val] if isinstance(val, str) else list(val)
            continue
        out.append((key, val))
    for comp in minus:
        if comp not in OFF_COMPONENTS:
            raise SpecError(
                f"variant {label!r}: cannot remove {comp!r}",
                field=f"variants.{label}.minus",
                fix=f"minus: accepts {', '.join(OFF_COMPONENTS)}",
            )
        out.append((f"optimizer.{comp}", OFF_COMPONENTS[comp]))
    return out


def plan_ablation(
    spec: AblationSpec,
    *,
    base_overrides: Iterable[tuple[str, Any]] = (),
    source: str | None = None,
    lines: Mapping[str, int] | None = None,
) -> list[PlannedRun]:
    """Expand an ablation into its runs (all validated up front).

    Args:
        spec: the ablation.
        base_overrides: dotted overrides applied to every run last (from ``--set base.x=...``).
        source: the spec's file, for error messages.
        lines: dotted key → line, for error messages.

    Returns:
        The planned runs, in a deterministic order.

    Raises:
        SpecError: when any run fails to resolve.
    """
    lines = lines or {}
    tasks = spec.tasks or {"": {}}
    variants = spec.variants or {"": {}}
    grid_keys = list(spec.grid)
    try:
        grid_vals = [expand_values(spec.grid[k]) for k in grid_keys]
    except ValueError as exc:
        raise SpecError(
            str(exc), source=source, field="grid", fix="write a list of values or a generator"
        ) from None
    for k, vals in zip(grid_keys, grid_vals):
        if not vals:
            raise SpecError(
                "an empty list of values plans no runs at all",
                source=source,
                line=lines.get(f"grid.{k}"),
                field=f"grid.{k}",
                fix="give at least one value, or remove the key from grid",
            )
    n_grid = math.prod(len(v) for v in grid_vals)
    if n_grid > MAX_PLANNED_RUNS:
        raise SpecError(
            f"the grid has {n_grid} points; at most {MAX_PLANNED_RUNS} runs are allowed",
            source=source,
            field="grid",
            fix="use fewer values in grid, or split the ablation",
        )
    grid_points = [dict(zip(grid_keys, combo)) for combo in itertools.product(*grid_vals)]
    sweep_points: list[tuple[str | None, Any, list[tuple[str, Any]]]] = []
    for i, sw in enumerate(spec.sweeps):
        try:
            cols = {k: expand_values(v) for k, v in sw.set.items()}
        except ValueError as exc:
            raise SpecError(
                str(exc),
                source=source,
                field=f"sweeps.{i}.set",
                fix="write a list of values or a generator",
            ) from None
        lengths = {len(v) for v in cols.values()}
        if not cols or lengths == {0}:
            raise SpecError(
                f"sweep {sw.name!r} has no values",
                source=source,
                line=lines.get(f"sweeps.{i}"),
                field=f"sweeps.{i}.set",
                fix="give each swept field at least one value, or remove the sweep",
            )
        if len(lengths) != 1:
            raise SpecError(
                f"sweep {sw.name!r}: value lists have different lengths {sorted(lengths)}",
                source=source,
                line=lines.get(f"sweeps.{i}"),
                fix="zipped sweep fields need the same number of values",
            )
        first = next(iter(cols))
        for j in range(lengths.pop()):
            sweep_points.append(
                (sw.name, cols[first][j], [(k, vals[j]) for k, vals in cols.items()])
            )
    if not sweep_points:
        sweep_points = [(None, None, [])]
    n_runs = (
        len(tasks) * len(variants) * len(grid_points) * len(sweep_points) * len(spec.seed_list())
    )
    if n_runs > MAX_PLANNED_RUNS:
        raise SpecError(
            f"the ablation plans {n_runs} runs; at most {MAX_PLANNED_RUNS} are allowed",
            source=source,
            field="grid" if len(grid_points) > 1 else "sweeps",
            fix="use fewer values in grid/sweeps/seeds, or split the ablation",
        )
    planned: list[PlannedRun] = []
    base_over = list(base_overrides)
    try:
        base_spec = apply_overrides(spec.base, [], source=source, lines=_sub_lines(lines, "base"))
    except SpecError as exc:
        if exc.message and not exc.message.startswith("base."):
            exc.message = "base." + exc.message
            exc.args = (exc.render(),)
        raise
    base_raw = base_spec.model_dump(mode="json")
    for t_label, t_over in tasks.items():
        for v_label, v_val in variants.items():
            v_over = _variant_overrides(v_label, v_val)
            for gp in grid_points:
                for sw_name, sw_value, sw_over in sweep_points:
                    overrides: list[tuple[str, Any, str]] = []
                    overrides += [(k, v, f"tasks.{t_label}.{k}") for k, v in t_over.items()]
                    overrides += [(k, v, f"variants.{v_label}.{k}") for k, v in v_over]
                    overrides += [(k, v, f"grid.{k}") for k, v in gp.items()]
                    overrides += [(k, v, f"sweeps.{k}") for k, v in sw_over]
                    overrides += [(k, v, f"--set base.{k}") for k, v in base_over]
                    context = ", ".join(
                        f"{k} {v!r}" for k, v in (("task", t_label), ("variant", v_label)) if v
                    )
                    run = _resolve_point(base_raw, overrides, source, lines, context)
                    for seed in spec.seed_list():
                        run_s = run.model_copy(update={"seed": int(seed)})
                        labels: dict[str, Any] = {
                            "kind": "run",
                            "task": t_label or run.task["name"],
                            "variant": v_label or "base",
                            "seed": int(seed),
                        }
                        if gp:
                            labels["grid"] = json.dumps(gp, sort_keys=True)
                        if sw_name is not None:
                            labels["sweep"] = sw_name
                            labels["value"] = sw_value
                        planned.append(PlannedRun(labels=labels, spec=run_s, hash=run_hash(run_s)))
    return planned


def _resolve_point(
    base_raw: Mapping[str, Any],
    overrides: list[tuple[str, Any, str]],
    source: str | None,
    lines: Mapping[str, int],
    context: str = "",
) -> RunSpec:
    data = copy.deepcopy(dict(base_raw))
    spec = RunSpec.model_validate(data)
    for key, value, origin in overrides:
        try:
            spec = apply_overrides(spec.model_dump(mode="json"), [(key, value)])
        except SpecError as exc:
            from_cli = origin.startswith("--set")
            line = None if from_cli else (lines.get(origin) or _best_line(lines, origin, ""))
            where = f" (in the run for {context})" if context else ""
            raise SpecError(
                f"{origin}{where}: {exc.message}",
                source=None if from_cli else source,
                line=line,
                fix=exc.fix,
            ) from None
    return spec


def _sub_lines(lines: Mapping[str, int], prefix: str) -> dict[str, int]:
    p = prefix + "."
    return {k[len(p) :]: v for k, v in lines.items() if k.startswith(p)}
