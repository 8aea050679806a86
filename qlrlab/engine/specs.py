"""Experiment specs: what one run, one ablation and one tuning study are, as pydantic models.

Every spec is plain data that round-trips through YAML/JSON. Three documents exist:

* :class:`RunSpec` — a task, an optimiser (inline, or a preset name with overrides), a batch size,
  a budget (epochs, steps or seconds; whichever comes first), an evaluation cadence, a seed, a
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
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from qlrlab.registry import CURVATURES, DAMPINGS, DIRECTIONS, STEP_SIZES

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

#: the range of seeds torch's generators accept (``torch.manual_seed``: 64-bit)
SEED_MAX = 2**63 - 1

#: the most values one generator (``linspace``/``logspace``) may produce, and the most runs an
#: ablation may plan: larger numbers are typos (``logspace: [-8, 0, 100000000]``), and planning
#: them would hang
MAX_GENERATED_VALUES = 10_000
MAX_PLANNED_RUNS = 100_000

#: Fields of a run that do not change its results, hence are not part of its identity.
NON_IDENTITY_FIELDS = frozenset({"name", "output_dir", "checkpoint_every", "tensorboard"})

#: "Switched off" component specs used by ``minus:`` in variants (each family's registry says
#: what "off" means for it).
OFF_COMPONENTS: dict[str, Any] = {
    r.family: r.off for r in (DIRECTIONS, CURVATURES, STEP_SIZES, DAMPINGS) if r.can_switch_off
}


class SpecError(ValueError):
    """A spec, override or input file is wrong; raised before any run starts.

    Attributes:
        source: the file (or ``--set`` override) the problem is in, if known.
        line: 1-based line number in ``source``, if known.
        field: the dotted field at fault, if known.
        fix: a hint on how to fix it.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        line: int | None = None,
        field: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.message = message
        self.source = source
        self.line = line
        self.field = field
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        """Return the full, human-readable message."""
        where = ""
        if self.source:
            where = self.source + (f":{self.line}" if self.line else "") + ": "
        text = where + (f"{self.field}: " if self.field else "") + self.message
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Values, overrides and dotted keys
# --------------------------------------------------------------------------------------------


def parse_value(text: str) -> Any:
    """Parse the right-hand side of a ``--set key=value`` override.

    Integers, floats (including ``1e-3``, which YAML 1.1 reads as a string), ``true``/``false``,
    ``null``/``none`` and YAML flow collections (``[1, 2]``, ``{name: hessian}``) are recognised;
    anything else stays a string.

    Args:
        text: the raw value.

    Returns:
        The parsed value.
    """
    s = text.strip()
    if s.lower() in {"null", "none", "~"}:
        return None
    if s.lower() in {"true", "false"}:
        return s.lower() == "true"
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(s)
    except yaml.YAMLError:
        return s
    return _floatify(value)


def _floatify(value: Any) -> Any:
    """Turn strings that look like floats (YAML 1.1's ``1e-3``) into floats, recursively."""
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in "eE.") else value
        except ValueError:
            return value
    if isinstance(value, list):
        return [_floatify(v) for v in value]
    if isinstance(value, dict):
        return {k: _floatify(v) for k, v in value.items()}
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"a.b.c=value"`` into ``("a.b.c", parsed value)``.

    Raises:
        SpecError: when there is no ``=`` or the key is empty.
    """
    if "=" not in text:
        raise SpecError(
            f"override {text!r} has no '='",
            source="--set",
            fix="write overrides as --set dotted.key=value, e.g. --set optimizer.damping.initial=1e-2",
        )
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise SpecError(f"override {text!r} has an empty key", source="--set")
    return key, parse_value(value)


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


def _nested_errors(exc: ValidationError, prefix: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join([prefix, *(str(p) for p in err["loc"])])
        parts.append(f"{loc}: {_clean_msg(err)}")
    return "; ".join(parts)


def _clean_msg(err: Mapping[str, Any]) -> str:
    msg = str(err.get("msg", ""))
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    if err.get("type") == "extra_forbidden":
        msg = "unknown field (extra inputs are not permitted)"
    return msg


def _set_path(
    data: dict[str, Any],
    parts: list[str],
    value: Any,
    *,
    strict: bool,
    root: str = "",
) -> None:
    """Set ``data[parts[0]][parts[1]]... = value``.

    With ``strict``, a missing intermediate or leaf key is an error (with close matches), except
    that setting ``name`` of a component replaces the component by ``{"name": value}``.
    """
    node: Any = data
    walked: list[str] = [root] if root else []
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict):
            raise KeyError(f"{'.'.join(walked)} is not a mapping; cannot set {'.'.join(parts)}")
        if part not in node or node[part] is None:
            if strict and part not in node:
                raise KeyError(_unknown_key_msg(part, node, walked))
            # e.g. optimizer.curvature is None and we set optimizer.curvature.name
            if parts[i + 1] != "name" and strict:
                raise KeyError(
                    f"{'.'.join([*walked, part])} is null; set {'.'.join([*walked, part])}.name "
                    "first to choose a component"
                )
            node[part] = {}
        node = node[part]
        walked.append(part)
    leaf = parts[-1]
    if not isinstance(node, dict):
        raise KeyError(f"{'.'.join(walked)} is not a mapping; cannot set {leaf!r} in it")
    if leaf == "name" and "name" in node and node["name"] != value:
        node.clear()
        node["name"] = value
        return
    if strict and leaf not in node and node:
        raise KeyError(_unknown_key_msg(leaf, node, walked))
    node[leaf] = value


def _unknown_key_msg(key: str, node: Mapping[str, Any], walked: list[str]) -> str:
    where = ".".join(walked) or "the spec"
    close = difflib.get_close_matches(key, [str(k) for k in node], n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return (
        f"unknown key {'.'.join([*walked, key])!r}{hint}; {where} has: {', '.join(map(str, node))}"
    )


def _get_path(data: Mapping[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        node = node[part]
    return node


# --------------------------------------------------------------------------------------------
# Run spec
# --------------------------------------------------------------------------------------------


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
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["val", "test"])
    final_splits: list[Literal["train", "val", "test"]] = Field(
        default_factory=lambda: ["train", "val", "test"]
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
            with the paper's curves only. Needs a GGN (``backend`` own, fast or jvp) or Hessian
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


#: run fields added after runs were first stored: left out of the identity at their default, so
#: that earlier result directories keep their run hashes
LATER_FIELD_DEFAULTS: dict[str, Any] = {"nan_padding": False}
#: the same for fields of nested specs: ``(field, subfield) -> default``
LATER_SUBFIELD_DEFAULTS: dict[tuple[str, str], Any] = {("eval", "every_seconds"): None}

#: directions whose curvature comes from BackPACK's own loss handling (no NaN-padding emulation)
_BACKPACK_DIRECTIONS = frozenset({"kfac", "diag_ggn"})


def nan_padding_unsupported(opt: Any) -> str | None:
    """Why an optimizer spec cannot emulate the original's NaN padding (``None``: it can)."""
    if opt.direction.name in _BACKPACK_DIRECTIONS:
        return f"the {opt.direction.name!r} direction takes its curvature from BackPACK"
    curv = opt.curvature
    if curv is None:
        return None
    if curv.name not in ("ggn", "hessian"):
        return f"curvature {curv.name!r} has no NaN-padding emulation"
    if curv.backend == "curvlinops":
        return "the curvlinops back-end has no NaN-padding emulation"
    return None


def run_hash(spec: RunSpec) -> str:
    """A stable 16-hex-digit identity of a run: a hash of its resolved spec without its label,
    output directory and checkpoint cadence (and without fields added later while they keep
    their default)."""
    exclude = set(NON_IDENTITY_FIELDS)
    exclude.update(k for k, v in LATER_FIELD_DEFAULTS.items() if getattr(spec, k) == v)
    data = spec.model_dump(mode="json", exclude=exclude)
    for (field, sub), default in LATER_SUBFIELD_DEFAULTS.items():
        if field in data and getattr(getattr(spec, field), sub) == default:
            data[field].pop(sub, None)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _format_validation(
    exc: ValidationError, *, source: str | None, lines: Mapping[str, int] | None, prefix: str = ""
) -> SpecError:
    errs = exc.errors()
    msgs = []
    first_field = None
    first_line = None
    for err in errs:
        loc = ".".join(str(p) for p in err["loc"])
        msg = _clean_msg(err)
        # nested errors come back as "optimizer.damping.x: msg; ..." inside a value error
        field = prefix + loc if loc else prefix.rstrip(".")
        if first_field is None:
            first_field = field
            if lines:
                first_line = _best_line(lines, field, msg)
        msgs.append(f"{field}: {msg}" if field else msg)
    fix = "check the field names and types against `qlrlab schema`"
    if any("; registered:" in str(e.get("msg")) for e in errs):
        fix = (
            "use one of the registered names listed above; if it is your own component, load "
            "the module that registers it with --plugin MODULE|FILE.py (or $QLRLAB_PLUGINS)"
        )
    elif any(e.get("type") == "extra_forbidden" or "unknown" in str(e.get("msg")) for e in errs):
        fix = "remove or rename the unknown field (see `qlrlab schema`, `qlrlab presets`, `qlrlab tasks`)"
    elif any("valid" in str(e.get("msg")) for e in errs):
        fix = "give the field a value of the type named above"
    return SpecError("; ".join(msgs), source=source, line=first_line, fix=fix)


def _best_line(lines: Mapping[str, int], field: str, msg: str) -> int | None:
    # Prefer the deepest dotted path mentioned in the message, then the field itself.
    candidates = [field]
    for token in msg.replace(";", " ").replace(":", " ").split():
        if "." in token:
            candidates.insert(0, token.strip("'\","))
    for cand in candidates:
        parts = cand.split(".")
        while parts:
            key = ".".join(parts)
            if key in lines:
                return lines[key]
            parts.pop()
    return None


# --------------------------------------------------------------------------------------------
# YAML loading with line numbers
# --------------------------------------------------------------------------------------------


def load_yaml(path: str | Path) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a YAML mapping safely, with the line number of every dotted key.

    Args:
        path: the file.

    Returns:
        ``(data, lines)`` where ``lines`` maps dotted keys (``"base.optimizer.damping"``) to
        1-based line numbers.

    Raises:
        SpecError: file missing, not YAML (with the line and column), or not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise SpecError(
            "file not found", source=str(p), fix="pass the path of an existing YAML spec"
        )
    raw_bytes = p.read_bytes()
    try:
        text = raw_bytes.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw_bytes[: exc.start].count(b"\n") + 1
        col = exc.start - (raw_bytes.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError(
            f"not UTF-8 text: byte 0x{raw_bytes[exc.start]:02x} at column {col} cannot be decoded",
            source=str(p),
            line=line,
            fix="save the spec as UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or replace that "
            "character",
        ) from None
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        col = f", column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        cmark = getattr(exc, "context_mark", None)
        if context and cmark is not None and cmark.line + 1 != line:
            context += f" that started at line {cmark.line + 1}"
        raise SpecError(
            f"malformed YAML{col}: {problem}" + (f" ({context})" if context else ""),
            source=str(p),
            line=line,
            fix="fix the YAML syntax at that line (indentation, a missing ':' or an unclosed "
            "bracket/quote)",
        ) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(
            f"expected a mapping at the top level, got {type(data).__name__}",
            source=str(p),
            line=1,
            fix="write the spec as 'key: value' lines",
        )
    lines: dict[str, int] = {}

    def walk(n: Any, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                here = k.start_mark.line + 1
                if isinstance(k, yaml.ScalarNode) and k.value != "<<":
                    if k.value in seen:
                        raise SpecError(
                            f"duplicate key {k.value!r} (first at line {seen[k.value]}); YAML "
                            "keeps only the last one, so the first would be silently lost",
                            source=str(p),
                            line=here,
                            field=key,
                            fix="give every key (variant, task, grid field...) a distinct name, "
                            "or delete one of the two",
                        )
                    seen[k.value] = here
                lines[key] = here
                walk(v, key + ".")
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[f"{prefix}{i}"] = v.start_mark.line + 1
                walk(v, f"{prefix}{i}.")

    walk(node, "")
    return _floatify(data), lines


# --------------------------------------------------------------------------------------------
# Resolving a run from a raw mapping plus overrides
# --------------------------------------------------------------------------------------------


def apply_overrides(
    raw: Mapping[str, Any],
    overrides: Iterable[tuple[str, Any]],
    *,
    source: str | None = None,
    lines: Mapping[str, int] | None = None,
) -> RunSpec:
    """Validate a raw run mapping, then apply dotted overrides one by one.

    Each override must name an existing field of the resolved spec (defaults included), so
    typos are caught with close matches. ``optimizer: <preset>`` or ``task: <name>`` replace the
    whole component; a ``1-`` prefix sets ``1 - value``.

    Args:
        raw: the run mapping (e.g. from YAML).
        overrides: ``(dotted key, value)`` pairs applied in order.
        source: the file or override the values came from, for error messages.
        lines: dotted key → line number in ``source``.

    Returns:
        The validated :class:`RunSpec`.

    Raises:
        SpecError: unknown keys or invalid values, naming the field and the fix.
    """
    try:
        spec = RunSpec.model_validate(dict(raw))
    except ValidationError as exc:
        raise _format_validation(exc, source=source, lines=lines) from None
    data = spec.model_dump(mode="json")
    for key, value in overrides:
        one_minus = key.startswith("1-")
        if one_minus:
            key = key[2:]
            if not isinstance(value, (int, float)):
                raise SpecError(
                    f"a '1-' key needs a number, got {value!r}",
                    source=source,
                    field=key,
                    line=_best_line(lines or {}, key, ""),
                )
            value = 1.0 - float(value)
        parts = key.split(".")
        try:
            if parts[0] == "optimizer" and len(parts) == 1:
                data["optimizer"] = value
            elif parts[0] == "task" and len(parts) == 1:
                data["task"] = {"name": value} if isinstance(value, str) else value
            else:
                _set_path(data, parts, copy.deepcopy(value), strict=True)
        except KeyError as exc:
            raise SpecError(
                str(exc.args[0]),
                source=source,
                line=_best_line(lines or {}, key, ""),
                fix="use a field that exists (see `qlrlab schema`, `qlrlab presets`)",
            ) from None
        try:
            spec = RunSpec.model_validate(data)
        except ValidationError as exc:
            err = _format_validation(exc, source=source, lines=lines)
            line = err.line if err.line is not None else _best_line(lines or {}, key, "")
            raise SpecError(
                f"{err.message} (after setting {key}={value!r})",
                source=source,
                line=line,
                fix=err.fix,
            ) from None
        data = spec.model_dump(mode="json")
    return spec


def resolve_run(
    path_or_raw: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()
) -> RunSpec:
    """Load a :class:`RunSpec` from a YAML file (or mapping) and ``--set`` override strings.

    Raises:
        SpecError: on any problem, before anything runs.
    """
    if isinstance(path_or_raw, Mapping):
        raw, lines, source = dict(path_or_raw), {}, None
    else:
        raw, lines = load_yaml(path_or_raw)
        source = str(path_or_raw)
        if "base" in raw and "task" not in raw:
            kind = "a tuning" if "space" in raw else "an ablation"
            raise SpecError(
                f"this is {kind} spec (it has 'base'), not a run spec",
                source=source,
                line=lines.get("base"),
                fix=f"use `qlrlab {'tune' if 'space' in raw else 'ablate'} {source}`",
            )
    spec = apply_overrides(raw, [], source=source, lines=lines)
    parsed = [parse_override(o) for o in overrides]
    if parsed:
        spec = apply_overrides(spec.model_dump(mode="json"), parsed, source="--set")
    return spec


# --------------------------------------------------------------------------------------------
# Value generators
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Ablation spec
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Tuning spec
# --------------------------------------------------------------------------------------------


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
