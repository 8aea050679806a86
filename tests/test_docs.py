"""Documentation checks: every public name has a docstring, and the site builds strictly.

Public names are everything in ``qlrlab.__all__`` and in the ``__all__`` of every public
``qlrlab.*`` module and subpackage. Docstrings are read statically with griffe, exactly as the
API reference (mkdocstrings) reads them, so data such as the registries count as documented only
with an attribute docstring (a string literal right after the assignment, or ``#:`` comments
right above it).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

griffe = pytest.importorskip("griffe")


def _modules(mod):
    yield mod
    for member in mod.modules.values():
        if not member.name.startswith("_"):
            yield from _modules(member)


def _load():
    """Load qlrlab as the API reference does (with its griffe extension: ``#:`` comments count)."""
    ext = griffe.load_extensions(f"{ROOT / 'docs' / 'hooks' / 'griffe_rst.py'}:RstToMarkdown")
    return griffe.load("qlrlab", search_paths=[str(ROOT)], resolve_aliases=True, extensions=ext)


def _public_names() -> list[tuple[str, object]]:
    pkg = _load()
    out = []
    for mod in _modules(pkg):
        for name in mod.exports or ():
            name = str(name)
            if name.startswith("__") and name.endswith("__"):
                continue  # __version__ and friends
            out.append((f"{mod.path}.{name}", mod.get_member(name)))
    return out


def test_every_public_name_has_a_docstring():
    names = _public_names()
    assert len(names) > 30
    missing = []
    for path, obj in names:
        try:
            target = obj.final_target if obj.is_alias else obj
        except Exception as exc:  # an export that does not resolve
            missing.append(f"{path} (does not resolve: {exc})")
            continue
        if not (target.docstring and target.docstring.value.strip()):
            missing.append(f"{path} (defined at {target.path})")
    assert not missing, "public names without a docstring:\n  " + "\n  ".join(sorted(missing))


def test_every_public_module_has_a_docstring():
    pkg = _load()
    missing = [m.path for m in _modules(pkg) if not (m.docstring and m.docstring.value.strip())]
    assert not missing, f"modules without a docstring: {missing}"


def test_every_registered_component_is_documented():
    """Each registered spec class (and the component it builds) carries a docstring."""
    import qlrlab
    from qlrlab.registry import CURVATURES, DAMPINGS, DIRECTIONS, STEP_SIZES

    del qlrlab
    for reg in (DIRECTIONS, CURVATURES, STEP_SIZES, DAMPINGS):
        for name in reg.names():
            cls = reg.get(name)
            assert (cls.__dict__.get("__doc__") or "").strip(), f"{reg.family} {name!r}: {cls}"


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(
        f"_docs_{name}", ROOT / "docs" / "hooks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    hooks = str(ROOT / "docs" / "hooks")
    sys.path.insert(0, hooks)  # as MkDocs does while loading a hook: hooks import siblings
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(hooks)
    return module


def test_spec_reference_lists_every_component_and_field():
    """The generated spec reference covers every registered name and every engine field."""
    from qlrlab.registry import CURVATURES, DAMPINGS, DIRECTIONS, STEP_SIZES

    hook = _hook("spec_reference")
    md = hook.render("optimizer")
    for reg in (DIRECTIONS, CURVATURES, STEP_SIZES, DAMPINGS):
        for name in reg.names():
            assert f"#### `{name}` —" in md, (reg.family, name)
    assert "$\\rho$" in md and ":math:" not in md.split("??? note")[0]
    engine = pytest.importorskip("qlrlab.engine.specs")
    for key, model in (("run", "RunSpec"), ("ablation", "AblationSpec"), ("tune", "TuneSpec")):
        md = hook.render(key)
        for field in getattr(engine, model).model_fields:
            assert f"| `{field}` |" in md, (model, field)


def test_rst_docstrings_become_markdown():
    ext = _hook("griffe_rst").RstToMarkdown
    text = "Intro::\n\n    x = 1\n\nThen\n\n.. math:: a = b\n\n1. one\n   two\n\n   more\n2. three"
    out = ext._literal_blocks(ext._math_blocks(ext._lists(text)))
    assert "Intro:\n\n```python\nx = 1\n```" in out
    assert "$$\na = b\n$$" in out
    assert "    two" in out and "\n\n2. three" in out
    table = "==  ===\na   b\n==  ===\nx   y | z\n==  ===\n"
    assert ext._tables(table).splitlines()[:3] == ["| a | b |", "|---|---|", "| x | y \\| z |"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed")
def test_mkdocs_build_strict(tmp_path):
    exe = Path(sys.executable).with_name("mkdocs")
    cmd = [str(exe)] if exe.exists() else [shutil.which("mkdocs") or "mkdocs"]
    proc = subprocess.run(
        [*cmd, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    site = tmp_path / "site"
    for page in ("index.html", "concepts/index.html", "reference/specs/index.html"):
        assert (site / page).exists(), page
    specs = (site / "reference" / "specs" / "index.html").read_text()
    assert "levenberg_marquardt" in specs and "quadratic" in specs


# --------------------------------------------------------------------------------------------
# Every Python code block in the README and the docs runs
# --------------------------------------------------------------------------------------------

#: the order the blocks run in (one working directory): the ablation snippet writes the
#: results/quickstart that the quickstart page's snippet reads
_DOC_FILES = [
    "README.md",
    "docs/index.md",
    "docs/ablations-and-tuning.md",
    "docs/quickstart.md",
    "docs/concepts.md",
    "docs/distributed.md",
    "docs/writing-a-heuristic.md",
    "docs/experiments.md",
    "docs/installation.md",
    "docs/performance.md",
    "docs/kfac.md",
    "docs/training-loop.md",
]


def _python_blocks(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, code, why not run)`` of each ```python block; a block runs unless an HTML
    comment ``<!-- not run: why -->`` stands right above it; snippet includes (``--8<--``) are
    the example files, which tests/test_examples_custom_heuristic.py runs."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            code = "\n".join(lines[i + 1 : j])
            prev = lines[start - 1].strip() if start else ""
            why = None
            if prev.startswith("<!-- not run:"):
                why = prev[len("<!-- not run:") : -len("-->")].strip()
            elif code.lstrip().startswith("--8<--"):
                why = "snippet include"
            out.append((start + 1, code, why))
            i = j
        i += 1
    return out


def test_every_doc_file_with_python_is_listed():
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    with_code = {str(p.relative_to(ROOT)) for p in files if "```python" in p.read_text()}
    assert with_code <= set(_DOC_FILES), with_code - set(_DOC_FILES)


@pytest.mark.slow
def test_python_blocks_in_readme_and_docs_run(tmp_path):
    """Each block runs as a script (``python block.py``, so ``__name__ == "__main__"``, as when
    a reader pastes it into a file), in a working directory of its own that holds a copy of
    examples/ (two blocks at a time: each is mostly a fresh interpreter importing torch). The
    quickstart ablation is cut to 3 steps per run and one seed to stay quick; everything else
    runs as written."""
    from concurrent.futures import ThreadPoolExecutor

    import yaml

    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    quick = tmp_path / "examples" / "quickstart.yaml"
    data = yaml.safe_load(quick.read_text())
    data["seeds"] = [0]
    data["base"]["budget"]["steps"] = 3
    for task in data["tasks"].values():
        task["budget.steps"] = 3
    data.pop("output_dir", None)
    quick.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [
                str(ROOT),
                str(ROOT / "examples" / "custom_heuristic"),
                os.environ.get("PYTHONPATH", ""),
            ]
        ),
        "OMP_NUM_THREADS": "1",
    }
    blocks = [
        (name, line, code)
        for name in _DOC_FILES
        for line, code, why in _python_blocks(ROOT / name)
        if why is None
    ]

    # the blocks that read the quickstart's results run after the one that makes them, in a
    # copy of its folder (as a reader runs the page's `qlrlab ablate` before reading results)
    maker = next(i for i, b in enumerate(blocks) if "run_ablation(" in b[2])
    readers = [
        i for i, b in enumerate(blocks) if "results/quickstart" in b[2] and i != maker
    ]

    def run(i: int) -> str | None:
        name, line, code = blocks[i]
        cwd = tmp_path / f"block_{i}"
        shutil.copytree(tmp_path / "examples", cwd / "examples")
        if i in readers:
            shutil.copytree(tmp_path / f"block_{maker}" / "results", cwd / "results")
        (cwd / "block.py").write_text(code + "\n")
        p = subprocess.run(
            [sys.executable, "block.py"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        return None if p.returncode == 0 else f"{name}:{line}: exit {p.returncode}\n{p.stderr[-1500:]}"

    first = [i for i in range(len(blocks)) if i not in readers]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(run, first)) + list(pool.map(run, readers))
    failures = [f for f in results if f is not None]
    ran = len(blocks)
    assert ran >= 7
    assert not failures, "\n\n".join(failures)
