"""Reading YAML specs safely, with the line number of every dotted key (for error messages).

YAML is read with :func:`yaml.safe_load` (no code from a spec is executed); duplicate keys, bad
bytes and malformed YAML are :class:`~qlrlab.engine.errors.SpecError` s naming the line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from qlrlab.engine.errors import SpecError

__all__ = ["load_yaml"]


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
        at_line = mark.line + 1 if mark is not None else None
        at_col = f", column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        cmark = getattr(exc, "context_mark", None)
        if context and cmark is not None and cmark.line + 1 != at_line:
            context += f" that started at line {cmark.line + 1}"
        raise SpecError(
            f"malformed YAML{at_col}: {problem}" + (f" ({context})" if context else ""),
            source=str(p),
            line=at_line,
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
