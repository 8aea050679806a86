"""Griffe extension: render the reST constructs used in qlrlab's docstrings as Markdown.

qlrlab's docstrings are Google style (``Args:``, ``Returns:``, ``Attributes:``...) but write
maths and cross-references the reStructuredText way, which reads well in the source and in
``help()``. mkdocstrings renders docstring text as Markdown, so this extension rewrites, once the
package is loaded:

* ``:math:`x``` → ``$x$`` and ``.. math::`` blocks → ``$$ ... $$`` (arithmatex, MathJax);
* ``:class:`~qlrlab.X``` (and ``:func:``, ``:meth:``, ``:mod:``, ``:data:``, ``:attr:``,
  ``:exc:``, ``:obj:``) → an autorefs link when the target is a documented public object of the
  package (so the strict build never sees a dangling reference), plain code otherwise;
* ``text::`` followed by an indented literal block → ``text:`` and a fenced ``python`` block;
* reST "simple tables" (``====  ====`` rules) → Markdown pipe tables;
* Sphinx-style ``#:`` comments above a module or class attribute become its docstring.

Registered in ``mkdocs.yml`` under the python handler's ``options.extensions``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")
_MATH = re.compile(r":math:`([^`]+)`")
_RULE = re.compile(r"^=+( +=+)+\s*$")


def _is_public_path(path: str) -> bool:
    return not any(part.startswith("_") for part in path.split("."))


class RstToMarkdown(griffe.Extension):
    """Rewrite reST roles, maths, literal blocks and simple tables in every docstring."""

    def __init__(self, package: str = "qlrlab") -> None:
        super().__init__()
        self.package = package

    # -- entry point ---------------------------------------------------------------------------
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Convert every docstring of ``pkg`` once it is fully loaded (aliases resolvable)."""
        if pkg.name != self.package:
            return
        self._root = pkg
        for obj in self._walk(pkg):
            if obj.docstring is None and obj.is_attribute:
                self._comment_docstring(obj, loader)
            if obj.docstring is not None:
                obj.docstring.value = self.convert(obj.docstring.value, obj)

    @staticmethod
    def _comment_docstring(attr: griffe.Object, loader: griffe.GriffeLoader) -> None:
        """Use Sphinx-style ``#:`` comments right above an assignment as its docstring."""
        try:
            lines = attr.module.lines
        except Exception:
            return
        if not attr.lineno or not lines:
            return
        i = attr.lineno - 2
        found: list[str] = []
        while i >= 0 and lines[i].lstrip().startswith("#:"):
            found.insert(0, lines[i].lstrip()[2:].strip())
            i -= 1
        if found:
            attr.docstring = griffe.Docstring(
                "\n".join(found),
                lineno=i + 2,
                endlineno=attr.lineno - 1,
                parent=attr,
                parser=loader.docstring_parser,
                parser_options=loader.docstring_options,
            )

    def _walk(self, obj: griffe.Object) -> Any:
        yield obj
        for member in obj.members.values():
            if member.is_alias:
                continue
            yield from self._walk(member)  # type: ignore[arg-type]

    # -- conversions ----------------------------------------------------------------------------
    def convert(self, text: str, obj: griffe.Object) -> str:
        """Return ``text`` with the reST constructs replaced by Markdown."""
        text = self._lists(text)
        text = self._math_blocks(text)
        text = self._literal_blocks(text)
        text = self._tables(text)
        text = _MATH.sub(lambda m: f"${m.group(1).strip()}$", text)
        return _ROLE.sub(lambda m: self._xref(m, obj), text)

    @staticmethod
    def _lists(text: str) -> str:
        """Indent list-item continuations to 4 columns (reST allows 3; Markdown needs 4)."""
        out: list[str] = []
        item: tuple[int, int] | None = None
        loose = False  # a blank line inside the current item: the next item needs one too
        for line in text.splitlines():
            m = re.match(r"^(\s*)(\d+\.|[*-]) ", line)
            if m:
                starts = item is None or loose
                if (
                    starts
                    and out
                    and out[-1].strip()
                    and not re.match(r"^\s*(\d+\.|[*-]) ", out[-1])
                ):
                    out.append("")
                item, loose = (len(m.group(1)), len(m.group(2)) + 1), False
            elif item is not None and not line.strip():
                loose = True
            elif item is not None:
                k, w = item
                if _indent(line) >= k + w:
                    line = " " * max(0, 4 - w) + line
                else:
                    item = None
            out.append(line)
        return "\n".join(out)

    @staticmethod
    def _math_blocks(text: str) -> str:
        lines = text.splitlines()
        out: list[str] = []
        i = 0
        while i < len(lines):
            line = lines[i]
            stripped = line.lstrip()
            if not stripped.startswith(".. math::"):
                out.append(line)
                i += 1
                continue
            indent = line[: len(line) - len(stripped)]
            rest, i = _indented_block(lines, i + 1, len(indent))
            body = [b.strip() for b in [stripped[len(".. math::") :], *rest] if b.strip()]
            trailing_blank = i < len(lines)
            out += [f"{indent}$$", *(f"{indent}{b}" for b in body), f"{indent}$$"]
            if trailing_blank:
                out.append("")
        return "\n".join(out)

    @staticmethod
    def _literal_blocks(text: str) -> str:
        lines = text.splitlines()
        out: list[str] = []
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.rstrip().endswith("::") and not line.lstrip().startswith(".."):
                base = _indent(line)
                j = i + 1
                while j < len(lines) and not lines[j].strip():
                    j += 1
                if j < len(lines) and _indent(lines[j]) > base:
                    block, j = _indented_block(lines, j, base)
                    cut = min(_indent(b) for b in block if b.strip())
                    head = line.rstrip()[:-2].rstrip()
                    pad = " " * base
                    if head.strip():
                        out += [head + ":", ""]
                    lang = _language(head, [b[cut:] for b in block if b.strip()])
                    out += [f"{pad}```{lang}", *(pad + b[cut:] for b in block), f"{pad}```"]
                    if j < len(lines):
                        out.append("")
                    i = j
                    continue
            out.append(line)
            i += 1
        return "\n".join(out)

    @staticmethod
    def _tables(text: str) -> str:
        lines = text.splitlines()
        out: list[str] = []
        i = 0
        while i < len(lines):
            if not _RULE.match(lines[i].strip()):
                out.append(lines[i])
                i += 1
                continue
            rule = lines[i]
            pad = rule[: _indent(rule)]
            spans = [(m.start(), m.end()) for m in re.finditer(r"=+", rule)]
            rows: list[list[str]] = []
            header: list[str] | None = None
            i += 1
            while i < len(lines) and lines[i].strip():
                if _RULE.match(lines[i].strip()):
                    if header is None and rows:
                        header = rows.pop()
                    i += 1
                    continue
                rows.append(_cells(lines[i], spans))
                i += 1
            if header is None:
                header = [""] * len(spans)
            out.append(pad + "| " + " | ".join(header) + " |")
            out.append(pad + "|" + "|".join("---" for _ in spans) + "|")
            out += [pad + "| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)

    def _xref(self, m: re.Match[str], obj: griffe.Object) -> str:
        tilde, target = m.group(2), m.group(3).strip()
        if target.endswith("()"):
            target = target[:-2]
        label = target.rsplit(".", 1)[-1] if tilde else target
        path = self._resolve(target, obj)
        if path is None:
            return f"`{label}`"
        return f"[`{label}`][{path}]"

    def _resolve(self, target: str, obj: griffe.Object) -> str | None:
        """Canonical path of a documented public object named ``target``, else ``None``."""
        candidates = [target]
        scope: griffe.Object | None = obj
        while scope is not None:
            candidates.append(f"{scope.path}.{target}")
            scope = scope.parent
        for cand in candidates:
            if cand != self.package and not cand.startswith(self.package + "."):
                continue
            try:
                found = self._root.modules_collection[cand]
                final = found.final_target if found.is_alias else found
            except Exception:
                continue
            return final.path if _documented(final) else None
        return None


def _documented(obj: Any) -> bool:
    """Whether mkdocstrings renders ``obj`` (public all the way up to its module, documented)."""
    if not obj.docstring:
        return False
    node = obj
    while node is not None and not node.is_module:
        if not node.is_public:
            return False
        node = node.parent
    return node is not None and _is_public_path(node.path)


def _language(head: str, block: list[str]) -> str:
    """Guess the highlighting language of a literal block from its intro and its lines."""
    if "yaml" in head.lower():
        return "yaml"
    if all(line.startswith(("qlrlab ", "$ ", "python ", "pip ", " ")) for line in block):
        return "text"
    if "::" not in head and all(re.match(r"^\s*[\w.-]+:(\s|$)", line) for line in block):
        return "yaml"
    return "python"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _indented_block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """The lines from ``start`` on that are blank or indented deeper than ``base`` (trailing
    blank lines dropped), and the index of the first line after them."""
    end = start
    while end < len(lines) and (not lines[end].strip() or _indent(lines[end]) > base):
        end += 1
    block = lines[start:end]
    while block and not block[-1].strip():
        block.pop()
    return block, end


def _cells(line: str, spans: list[tuple[int, int]]) -> list[str]:
    parts = re.split(r"\s{2,}", line.strip())
    if len(parts) == len(spans):  # tolerate rows that are not aligned to the rules
        return [p.replace("|", "\\|") for p in parts]
    cells = []
    for k, (start, end) in enumerate(spans):
        stop = spans[k + 1][0] if k + 1 < len(spans) else len(line)
        cells.append(line[start:stop].strip().replace("|", "\\|"))
        del end
    return cells
