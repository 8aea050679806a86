"""The override language: ``--set dotted.key=value`` strings, and applying overrides to a run.

Dotted keys address any field of a run (``optimizer.damping.initial``, ``budget.steps``,
``task.subset``). Setting ``X.name`` of a component to a different name replaces the whole
component by that component's defaults, so ``optimizer.damping.name: constant`` is a valid swap.
A key prefixed with ``1-`` (``1-optimizer.direction.beta1``) sets ``1 - value``: the paper's way of
searching momentum-like coefficients on a log scale. Values are parsed as YAML scalars
(:func:`parse_value`); nothing here executes code from a spec.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from qlrlab.engine.dotted import _set_path
from qlrlab.engine.errors import SpecError, _best_line, _format_validation
from qlrlab.engine.models import RunSpec
from qlrlab.engine.yaml_io import _floatify, load_yaml

__all__ = ["apply_overrides", "parse_override", "parse_value", "resolve_run"]


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
        raw, source = dict(path_or_raw), None
        lines: dict[str, int] = {}
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
