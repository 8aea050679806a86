"""mkdocs hook: render the pydantic JSON schemas of qlrlab's specs into the spec reference.

The page ``reference/specs.md`` holds markers such as ``<!-- qlrlab-schema: optimizer -->``;
at build time each is replaced by tables generated from the live JSON schema (the same documents
``qlrlab schema`` prints), so the reference cannot drift from the code:

* ``optimizer`` — :func:`qlrlab.optimizer_json_schema` (every registered component);
* ``run``, ``ablation``, ``tune`` — the experiment engine's ``RunSpec``, ``AblationSpec`` and
  ``TuneSpec`` (when :mod:`qlrlab.engine` is importable);
* ``task`` — a discriminated union of every spec in ``qlrlab.tasks.TASKS`` (when present).

Field descriptions come from each model's description (its docstring's ``Attributes:``
section), which pydantic copies into the schema. A schema whose module is missing renders as a
note instead of failing the build. Registered in ``mkdocs.yml`` under ``hooks:``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
from collections.abc import Callable
from typing import Any

_MARKER = re.compile(r"^<!-- qlrlab-schema: (\w+) -->\s*$", re.M)


# -- the schemas -------------------------------------------------------------------------------


def table_safe(text: str) -> str:
    """Make ``text`` safe in a Markdown table cell: ``|`` is ``\\vert`` in maths, ``\\|`` outside."""
    parts = re.split(r"(\$[^$]+\$)", text)
    return "".join(
        p.replace("\\|", "\\Vert ").replace("|", "\\vert ")
        if p.startswith("$")
        else p.replace("|", "\\|")
        for p in parts
    )


def _optimizer() -> dict[str, Any]:
    import qlrlab

    for family in ("directions", "curvature", "step_sizes", "damping"):
        import_all(f"qlrlab.{family}")  # modules register their components on import
    schema = qlrlab.optimizer_json_schema()
    # the schema's root model is built on the fly: its fields are documented on OptimizerSpec
    schema["x-inherited-descriptions"] = split_description(
        inspect.getdoc(qlrlab.OptimizerSpec) or ""
    )[1]
    return schema


def import_all(package: str) -> None:
    """Import every module under ``package`` (private ones too: they may register components)."""
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
        importlib.import_module(info.name)


def _engine(name: str) -> Callable[[], dict[str, Any]]:
    def get() -> dict[str, Any]:
        from qlrlab.engine import specs

        return getattr(specs, name).model_json_schema()

    return get


def _task() -> dict[str, Any]:
    from typing import Annotated, Union

    from pydantic import Field, TypeAdapter

    from qlrlab.tasks import TASKS, TaskSpec

    classes = [TASKS.get(n) for n in TASKS.names()]
    if len(classes) == 1:
        return classes[0].model_json_schema()
    union = Annotated[Union[tuple(classes)], Field(discriminator="name")]  # noqa: UP007
    schema = TypeAdapter(union).json_schema()
    schema["title"] = "TaskSpec"
    # fields inherited from the base class are documented in its docstring, not the subclasses'
    schema["x-inherited-descriptions"] = split_description(inspect.getdoc(TaskSpec) or "")[1]
    return schema


SCHEMAS: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "optimizer": ("OptimizerSpec", _optimizer),
    "run": ("RunSpec", _engine("RunSpec")),
    "ablation": ("AblationSpec", _engine("AblationSpec")),
    "tune": ("TuneSpec", _engine("TuneSpec")),
    "task": ("TaskSpec", _task),
}


# -- rendering ---------------------------------------------------------------------------------
def _md(text: str) -> str:
    """reST roles and maths of a docstring fragment as Markdown (one line, table-safe)."""
    text = re.sub(r":math:`([^`]+)`", lambda m: f"${m.group(1)}$", text)
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    return table_safe(" ".join(text.split()))


def split_description(desc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into (summary text, {attribute: description})."""
    lines = desc.splitlines()
    summary: list[str] = []
    attrs: dict[str, str] = {}
    i = 0
    while i < len(lines) and lines[i].strip() not in ("Attributes:", "Args:"):
        summary.append(lines[i])
        i += 1
    current: str | None = None
    for line in lines[i + 1 :]:
        if not line.strip():
            continue
        if re.match(r"^\S.*:$", line):  # another section
            break
        m = re.match(r"^\s{4}(\w[\w, ]*?)(?: \([^)]*\))?: (.*)$", line)
        if m and len(line) - len(line.lstrip()) == 4:
            current = m.group(1)
            for key in current.split(","):
                attrs[key.strip()] = m.group(2)
        elif current is not None:
            for key in current.split(","):
                attrs[key.strip()] += " " + line.strip()
    text = "\n".join(summary).strip()
    return text, {k: _md(v) for k, v in attrs.items()}


def _anchor(prefix: str, ref: str) -> str:
    return f"{prefix}-{ref.rsplit('/', 1)[-1]}".lower()


def _type(node: dict[str, Any], prefix: str) -> str:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return f"[{name}](#{_anchor(prefix, name)})"
    if "const" in node:
        return f"`{json.dumps(node['const'])}`"
    if "enum" in node:
        return " \\| ".join(f"`{json.dumps(v)}`" for v in node["enum"])
    for key in ("oneOf", "anyOf"):
        if key in node:
            return " \\| ".join(_type(n, prefix) for n in node[key])
    t = node.get("type")
    if t == "array":
        return f"list[{_type(node.get('items', {}), prefix)}]"
    if t == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            return f"dict[str, {_type(extra, prefix)}]"
        return "object"
    if isinstance(t, list):
        return " \\| ".join(t)
    return t or "any"


_BOUNDS = {
    "minimum": "≥",
    "exclusiveMinimum": ">",
    "maximum": "≤",
    "exclusiveMaximum": "<",
    "minItems": "items ≥",
}


def _constraints(node: dict[str, Any]) -> str:
    parts = [f"{sym} {node[key]}" for key, sym in _BOUNDS.items() if key in node]
    for key in ("oneOf", "anyOf"):
        for sub in node.get(key, []):
            c = _constraints(sub)
            if c:
                parts.append(c)
    return ", ".join(parts)


def _default(node: dict[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    if "default" not in node:
        return ""
    return f"`{json.dumps(node['default'])}`"


def properties_table(
    model: dict[str, Any], prefix: str, fallback: dict[str, str] | None = None
) -> str:
    """A Markdown table of a model schema's fields (``fallback``: descriptions of inherited
    fields)."""
    props = model.get("properties", {})
    if not props:
        return "_No fields._\n"
    required = set(model.get("required", []))
    _, own = split_description(model.get("description", ""))
    docs = {"name": "the registered name that selects this one", **(fallback or {}), **own}
    rows = ["| field | type | default | constraints | description |", "|---|---|---|---|---|"]
    for name, node in props.items():
        rows.append(
            f"| `{name}` | {_type(node, prefix)} | {_default(node, name in required)} | "
            f"{_constraints(node)} | {docs.get(name, '')} |"
        )
    return "\n".join(rows) + "\n"


def _summary(model: dict[str, Any]) -> str:
    text, _ = split_description(model.get("description", ""))
    return _md(text.split("\n\n")[0]) if text else ""


def render_schema(key: str, title: str, schema: dict[str, Any]) -> str:
    """Markdown for one schema: root fields, each definition, and the raw JSON."""
    prefix = f"spec-{key}"
    defs: dict[str, Any] = schema.get("$defs", {})
    inherited = schema.pop("x-inherited-descriptions", None)
    out: list[str] = []
    if "properties" in schema:
        summary = _summary(schema)
        if summary:
            out += [summary, ""]
        out.append(properties_table(schema, prefix, inherited))
    groups: list[tuple[str, dict[str, str]]] = []
    for field, node in schema.get("properties", {}).items():
        for cand in [node, *node.get("anyOf", [])]:
            mapping = cand.get("discriminator", {}).get("mapping")
            if mapping:
                groups.append((field, mapping))
    if not groups and "discriminator" in schema:  # a bare union (tasks)
        groups.append(("name", schema["discriminator"]["mapping"]))
    done: set[str] = set()
    for field, mapping in groups:
        out += [f"### `{field}` choices", ""]
        if field != "name":
            out += [f"The `name` key of `{field}` selects one of these.", ""]
        for name, ref in sorted(mapping.items()):
            dname = ref.rsplit("/", 1)[-1]
            done.add(dname)
            model = defs.get(dname, {})
            out += [f"#### `{name}` — {dname} {{#{_anchor(prefix, dname)}}}", ""]
            summary = _summary(model)
            if summary:
                out += [summary, ""]
            out.append(properties_table(model, prefix, inherited))
    rest = [d for d in defs if d not in done]
    if rest:
        out += ["### Nested models", ""]
        for dname in rest:
            model = defs[dname]
            out += [f"#### {dname} {{#{_anchor(prefix, dname)}}}", ""]
            summary = _summary(model)
            if summary:
                out += [summary, ""]
            if "properties" in model:
                out.append(properties_table(model, prefix))
            elif "enum" in model:
                out += [f"One of {_type(model, prefix)}.", ""]
    raw = json.dumps(schema, indent=2, ensure_ascii=False)
    indented = "\n".join("    " + line for line in raw.splitlines())
    out += [f'??? note "Raw JSON schema of {title}"', "", "    ```json", indented, "    ```", ""]
    return "\n".join(out)


def render(key: str) -> str:
    """Markdown for the marker ``key`` (a note if the schema is unavailable)."""
    title, get = SCHEMAS[key]
    try:
        schema = get()
    except (ImportError, AttributeError) as exc:
        return (
            f'!!! note "{title}"\n    Not available in this build ({type(exc).__name__}: {exc}).\n'
        )
    return render_schema(key, title, schema)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs event: replace the schema markers of a page."""
    return _MARKER.sub(lambda m: render(m.group(1)), markdown)
