"""mkdocs hook: expand API-reference markers into mkdocstrings blocks at build time.

A page line ``<!-- qlrlab-api: qlrlab.directions -->`` becomes the package's docstring followed
by one ``::: module`` block for every public module of the package (found on disk, so a module
added by anyone appears without editing the docs), and, for a component family, a table of every
registered component (name → spec class, imported from the registries after importing every
module of the package, so registration by import is covered). ``<!-- qlrlab-cli-help -->``
becomes the ``--help`` text of ``qlrlab`` and of each of its commands, and
``<!-- qlrlab-presets -->`` a table of every preset's four components.

Registered in ``mkdocs.yml`` under ``hooks:``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pkgutil
import re
from typing import Any

# a sibling hook (MkDocs puts this folder on sys.path while it loads a hook)
from spec_reference import import_all, table_safe

_MARKER = re.compile(r"^<!-- qlrlab-api: (?P<pkg>[\w.]+)(?P<opts>[^>]*)-->\s*$", re.M)
_CLI = re.compile(r"^<!-- qlrlab-cli-help -->\s*$", re.M)
_PRESETS = re.compile(r"^<!-- qlrlab-presets -->\s*$", re.M)

_FAMILIES = {
    "qlrlab.directions": ("DIRECTIONS", "direction"),
    "qlrlab.curvature": ("CURVATURES", "curvature"),
    "qlrlab.step_sizes": ("STEP_SIZES", "step_size"),
    "qlrlab.damping": ("DAMPINGS", "damping"),
}


def public_modules(package: str) -> list[str]:
    """Dotted names of the public modules and subpackages under ``package`` (recursive)."""
    pkg = importlib.import_module(package)
    out: list[str] = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_"):
            continue
        name = f"{package}.{info.name}"
        out.append(name)
        if info.ispkg:
            out += public_modules(name)
    return sorted(out)


def _link(cls: type) -> str:
    path = f"{cls.__module__}.{cls.__qualname__}"
    if any(part.startswith("_") for part in path.split(".")):
        return f"`{cls.__qualname__}`"
    return f"[`{cls.__qualname__}`][{path}]"


def _summary(obj: Any) -> str:
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
    doc = (doc or "").strip().split("\n\n")[0]
    doc = " ".join(doc.split())
    doc = re.sub(r":math:`([^`]+)`", r"$\1$", doc)
    doc = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", doc)
    return table_safe(doc)


def registry_table(package: str) -> str:
    """Markdown table of the components registered in the family of ``package``."""
    from qlrlab import registry

    import_all(package)
    reg_name, field = _FAMILIES[package]
    reg = getattr(registry, reg_name)
    rows = [
        f"Registered in [`{reg_name}`][qlrlab.registry.{reg_name}] (select with "
        f"`{field}: {{name: ...}}` in an optimiser spec):",
        "",
        "| name | spec | needs curvature | summary |",
        "|---|---|---|---|",
    ]
    for name in reg.names():
        cls = reg.get(name)
        needs = "yes" if getattr(cls, "requires_curvature", False) else ""
        rows.append(f"| `{name}` | {_link(cls)} | {needs} | {_summary(cls)} |")
    return "\n".join(rows)


def api_block(package: str, opts: str) -> str:
    """Markdown for one ``qlrlab-api`` marker."""
    parts = []
    mod = importlib.import_module(package)
    is_pkg = hasattr(mod, "__path__")
    if is_pkg:
        parts.append(f"::: {package}\n    options:\n      members: false\n")
        if package in _FAMILIES and "no-registry" not in opts:
            parts.append(registry_table(package) + "\n")
        parts += [f"::: {name}\n" for name in public_modules(package)]
    else:
        parts.append(f"::: {package}\n")
    return "\n".join(parts)


def cli_help() -> str:
    """``qlrlab --help`` and each command's ``--help`` as code blocks."""
    from qlrlab.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal width: make it reproducible
    parser = build_parser()
    parser.prog = "qlrlab"
    blocks = [("qlrlab --help", parser.format_help())]
    for action in parser._actions:
        choices = getattr(action, "choices", None)
        if isinstance(choices, dict):
            for name, sub in choices.items():
                buf = io.StringIO()
                with contextlib.redirect_stdout(buf):
                    sub.print_help()
                blocks.append((f"qlrlab {name} --help", buf.getvalue()))
    out = []
    for title, text in blocks:
        out += [f"### `{title}`", "", "```text", text.rstrip(), "```", ""]
    return "\n".join(out)


def presets_table() -> str:
    """Every preset as its four components (from calling each preset with its defaults)."""
    from qlrlab import presets
    from qlrlab.presets import PRESETS

    def comp(c: Any) -> str:
        return "—" if c is None else f"`{c.name}`"

    rows = [
        "| preset | direction | curvature | step size | damping | summary |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(PRESETS):
        fn = PRESETS[name]
        spec = fn()
        documented = name in presets.__all__ and fn.__module__ == "qlrlab.presets"
        label = f"[`{name}`][qlrlab.presets.{name}]" if documented else f"`{name}`"
        rows.append(
            f"| {label} | {comp(spec.direction)} | "
            f"{comp(spec.curvature)} | {comp(spec.step_size)} | {comp(spec.damping)} | "
            f"{_summary(fn)} |"
        )
    return "\n".join(rows)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """mkdocs event: expand the markers of this page."""
    markdown = _MARKER.sub(lambda m: api_block(m.group("pkg"), m.group("opts")), markdown)
    if _CLI.search(markdown):
        markdown = _CLI.sub(lambda m: cli_help(), markdown)
    if _PRESETS.search(markdown):
        markdown = _PRESETS.sub(lambda m: presets_table(), markdown)
    return markdown
