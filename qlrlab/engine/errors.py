"""The engine's one error type, and how pydantic's errors become it (with file lines).

:class:`SpecError` is raised for any wrong spec, override or input file before a run starts; the
CLI prints it without a traceback and exits with code 2. :func:`_format_validation` turns a
pydantic ``ValidationError`` into one, naming the dotted field, its line in the YAML file (from
:func:`qlrlab.engine.yaml_io.load_yaml`'s line table) and a fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

__all__ = ["SpecError"]


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
