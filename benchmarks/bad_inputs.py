"""Feed the CLI a catalogue of bad inputs and count how each is handled (not part of the suite).

Every case runs ``python -m qlrlab ...`` in a fresh process inside a temporary directory and is
classified as

* ``clear``     exit code 2, no ``Traceback`` on stderr, and an ``error:`` line with a ``fix:``;
* ``traceback`` a Python traceback was printed (whatever the exit code);
* ``handled``   exit code 0 where that is the right outcome (an extreme but valid value, listed
  in ``HANDLED``), with the run's report written;
* ``accepted``  exit code 0 (the bad input was silently accepted);
* ``other``     anything else (e.g. exit 1 with a message, a hang past the timeout).

Usage::

    python benchmarks/bad_inputs.py            # table on stdout, counts at the end
    python benchmarks/bad_inputs.py --json out.json

The same cases are asserted one by one (in-process) in ``tests/test_bad_input.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

BASE = textwrap.dedent(
    """\
    task: {name: uci_energy, subset: 64}
    optimizer: adam
    batch_size: 32
    budget: {steps: 2}
    eval: {every: 1}
    device: cpu
    """
)


def _abl(extra: str, base: str = BASE) -> str:
    return "name: bad\nbase:\n" + textwrap.indent(base, "  ") + extra


def _tune(extra: str) -> str:
    return (
        "name: badtune\nbase:\n"
        + textwrap.indent(BASE, "  ")
        + "space:\n  optimizer.step_size.lr: {type: log_uniform, low: 1.0e-4, high: 1.0e-1}\n"
        + "n_trials: 2\n"
        + extra
    )


#: name -> (command, spec file text or bytes, extra args)
CASES: dict[str, tuple[str, str | bytes, list[str]]] = {
    "misspelt preset override": (
        "run",
        BASE.replace("optimizer: adam", "optimizer: {preset: adamqlr, damping.intial: 1.0e-3}"),
        [],
    ),
    "non-UTF-8 spec file": ("run", BASE.encode() + b"name: caf\xe9\n", []),
    "--out on a read-only file system": ("run", BASE, ["--out", "/sys/qlrlab-bad-input/out"]),
    "--out under a file": ("run", BASE, ["--out", "{file}/sub"]),
    "disk full (12 KiB tmpfs)": (
        "ablate",
        _abl("variants: {a: adam, b: adamqlr}\nseeds: [0, 1, 2]\n").replace(
            "{steps: 2}", "{steps: 20}"
        ),
        ["--out", "{tiny}/out", "--workers", "1"],
    ),
    "damping.initial 1e308": (
        "run",
        BASE.replace("optimizer: adam", "optimizer: {preset: adamqlr, damping.initial: 1.0e308}"),
        [],
    ),
    "seed 10^23": ("run", BASE + "seed: 100000000000000000000000\n", []),
    "duplicate YAML key": ("run", BASE + "batch_size: 16\n", []),
    "duplicate variant label": (
        "ablate",
        _abl("variants:\n  A: adam\n  A: adamqlr\n"),
        ["--dry-run"],
    ),
    "seeds: []": ("ablate", _abl("seeds: []\n"), ["--dry-run"]),
    "grid: {k: []}": ("ablate", _abl("grid:\n  optimizer.step_size.lr: []\n"), ["--dry-run"]),
    "seeds and repeats": ("ablate", _abl("seeds: [0, 1]\nrepeats: 3\n"), ["--dry-run"]),
    "min_resource > max_resource": (
        "tune",
        _tune("scheduler: {min_resource: 10, max_resource: 2}\n"),
        ["--dry-run"],
    ),
    "--workers 0": ("ablate", _abl(""), ["--workers", "0"]),
    "--workers -3": ("ablate", _abl(""), ["--workers", "-3"]),
    "budget seconds .inf": ("run", BASE.replace("{steps: 2}", "{seconds: .inf}"), []),
    "budget seconds .nan": ("run", BASE.replace("{steps: 2}", "{seconds: .nan}"), []),
    "logspace 1e8 points": (
        "ablate",
        _abl("grid:\n  optimizer.step_size.lr: {logspace: [-8, 0, 100000000]}\n"),
        ["--dry-run"],
    ),
    "unknown component, no --plugin": (
        "run",
        BASE.replace("optimizer: adam", "optimizer: {preset: adamqlr, damping.name: my_damping}"),
        [],
    ),
    "missing dataset, download on": (
        "run",
        BASE.replace("{name: uci_energy, subset: 64}", "{name: uci_protein, data_dir: '{nodata}'}"),
        [],
    ),
}

#: text that must (not) appear on stderr for a message to count as clear, per case
EXPECT: dict[str, list[str]] = {
    "unknown component, no --plugin": ["--plugin"],
    "duplicate YAML key": ["batch_size", "duplicate"],
    "duplicate variant label": ["A", "duplicate"],
}
#: extreme but valid values: the run must complete and its report be written
HANDLED = {"damping.initial 1e308"}
FORBID: dict[str, list[str]] = {
    "missing dataset, download on": ["set task.download: true"],
}


def run_case(name: str, tmp: Path, timeout: float = 60.0) -> dict[str, object]:
    cmd, text, extra = CASES[name]
    d = tmp / f"case{list(CASES).index(name):02d}"
    d.mkdir()
    spec = d / "spec.yaml"
    spec.write_bytes(text.encode() if isinstance(text, str) else text)
    if b"{nodata}" in spec.read_bytes():
        spec.write_text(spec.read_text().replace("{nodata}", str(d / "nodata")))
    ro = d / "ro"
    ro.mkdir()
    (d / "file").write_text("x")
    args = [a.replace("{ro}", str(ro)).replace("{file}", str(d / "file")) for a in extra]
    if "--out" not in args:
        args += ["--out", str(d / "out")]
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    tiny = d / "tiny"
    if any("{tiny}" in a for a in args):  # needs root (mount); skipped otherwise
        tiny.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(tiny)], capture_output=True
        )
        if mounted.returncode != 0:
            return {"case": name, "exit": None, "kind": "skipped", "stderr": "cannot mount"}
        args = [a.replace("{tiny}", str(tiny)) for a in args]
    env = {**os.environ, "QLRLAB_DATA": str(d / "nodata")}
    try:
        p = subprocess.run(
            [sys.executable, "-m", "qlrlab", cmd, str(spec), "-q", *args],
            cwd=d,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        code, err = p.returncode, p.stderr
        if code == 0 and cmd != "report" and "--dry-run" not in args and "--no-report" not in args:
            pass
    except subprocess.TimeoutExpired:
        code, err = None, "timeout"
    finally:
        ro.chmod(stat.S_IRWXU)
        if tiny.is_dir():
            subprocess.run(["umount", str(tiny)], capture_output=True)
    ok_text = all(t in err for t in EXPECT.get(name, [])) and not any(
        t in err for t in FORBID.get(name, [])
    )
    if "Traceback" in err:
        kind = "traceback"
    elif code == 2 and "fix:" in err and ok_text:
        kind = "clear"
    elif code == 0 and name in HANDLED and (d / "out" / "report" / "table.md").exists():
        kind = "handled"
    elif code == 0:
        kind = "accepted"
    else:
        kind = "other"
    last = [ln for ln in err.strip().splitlines() if ln.strip()]
    return {"case": name, "exit": code, "kind": kind, "stderr": "\n".join(last[-3:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as t:
        for name in a.only or CASES:
            r = run_case(name, Path(t))
            rows.append(r)
            first = str(r["stderr"]).splitlines()[0] if r["stderr"] else ""
            print(f"{r['kind']:9s} exit={r['exit']!s:4s} {name:32s} {first[:110]}", flush=True)
    counts = {
        k: sum(r["kind"] == k for r in rows)
        for k in ("clear", "handled", "traceback", "accepted", "other", "skipped")
    }
    print(f"tried {len(rows)}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if a.json:
        a.json.write_text(json.dumps({"rows": rows, "counts": counts}, indent=1))


if __name__ == "__main__":
    main()
