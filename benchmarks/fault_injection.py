"""Fault injection (issue 15, "Nothing lost, nothing silent"): processes, signals, damaged files.

Kills real ``qlrlab`` commands (SIGKILL of ablation coordinators at spread-out moments, Ctrl-C
and SIGTERM of runs and ablations, concurrent invocations on one folder), damages result and
dataset files, and counts what was handled: leaked processes, lost or duplicated runs, exit
codes, tracebacks. Not a test (the tests are ``tests/test_faults.py``); a measurement whose
figures go into the issue's closing note.

Usage (from the repository root, with ``../shared/data`` beside it)::

    PYTHONPATH=. python benchmarks/fault_injection.py [--kills 10] [--work DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
PY = sys.executable
BASE = {
    "task": {"name": "uci_energy", "subset": 96},
    "optimizer": "adam",
    "batch_size": 32,
    "device": "cpu",
}


def ablation(steps: int, seeds: int, **base: object) -> dict:
    return {
        "name": "fi",
        "base": {**BASE, "budget": {"steps": steps}, **base},
        "variants": {"adam": "adam", "sgd": {"optimizer": {"preset": "sgd", "args": {"lr": 0.01}}}},
        "seeds": list(range(seeds)),
    }


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def ppid_state(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    f = stat[stat.rindex(")") + 2 :].split()
    return int(f[1]), f[0]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="ignore")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    st = ppid_state(pid)
    return st is not None and st[1] not in ("Z", "X")


def descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := ppid_state(int(d.name))):
            kids.setdefault(st[0], []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


#: execs the command with SIGINT at its default action, as at a terminal (a script started in the
#: background by a non-interactive shell ignores SIGINT, and its children would inherit that)
SIGINT_DEFAULT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SIGINT_DEFAULT, *cmd], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def kill_all(pids: set[int]) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            if alive(p):
                os.kill(p, signal.SIGKILL)


def ablate_cmd(spec: Path, out: Path, *extra: str) -> list[str]:
    return [PY, "-m", "qlrlab.cli", "ablate", str(spec), "--out", str(out), "-q", "--no-report",
            *extra]  # fmt: skip


def watch(proc: subprocess.Popen, seconds: float, seen: set[int]) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and proc.poll() is None:
        seen |= descendants(proc.pid)
        time.sleep(0.05)


def survivors_after(pids: set[int], seconds: float) -> int:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    left = {p for p in pids if alive(p)}
    kill_all(left)
    return len(left)


def runs_identical(out: Path, ref: Path, n: int, steps: int) -> tuple[int, int]:
    """(runs complete exactly once with every row, runs equal to the reference)."""
    index = json.loads((out / "index.json").read_text())
    once = equal = 0
    for e in index["entries"]:
        rdir = out / "runs" / e["hash"]
        s = json.loads((rdir / "summary.json").read_text())
        df = pd.read_parquet(rdir / "metrics.parquet")
        if s["status"] == "completed" and list(df["step"]) == list(range(steps + 1)):
            once += 1
        r = pd.read_parquet(ref / "runs" / e["hash"] / "metrics.parquet")
        if df["loss"].equals(r["loss"]):
            equal += 1
    return once, equal


def sigkills(work: Path, kills: int) -> dict:
    steps = 400
    spec = write(work / "k.yaml", ablation(steps, 2, checkpoint_every=20))
    ref = work / "k_ref"
    subprocess.run(ablate_cmd(spec, ref, "--workers", "1"), env=ENV, check=True, timeout=600)
    out = work / "k_out"
    leaked = killed = written_after = 0
    # moments after both workers exist: 0 s (still importing torch) ... 6 s (training)
    delays = [6.0 * i / max(1, kills - 1) for i in range(kills)]
    for i, delay in enumerate(delays):
        proc = start(ablate_cmd(spec, out, "--workers", "2", *(["--resume"] if i else [])))
        seen: set[int] = set()
        while (
            proc.poll() is None
            and sum(
                "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore")
                for p in descendants(proc.pid)
                if alive(p)
            )
            < 2
        ):
            time.sleep(0.02)
        watch(proc, delay, seen)
        if proc.poll() is not None:  # finished before the kill: start again without it
            continue
        seen |= descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)  # not communicate(): orphans would hold its pipes open
        killed += 1
        leaked += survivors_after(seen, 10.0)
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        time.sleep(1.0)
        after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        written_after += int(after != before)
    done = subprocess.run(
        ablate_cmd(spec, out, "--workers", "2", "--resume"), env=ENV, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    once, equal = runs_identical(out, ref, 4, steps)
    return {
        "SIGKILLs of an ablation coordinator": killed,
        "workers alive 10 s after a kill": leaked,
        "kills after which files still changed": written_after,
        "final --resume exit code": done.returncode,
        "runs complete exactly once (of 4)": once,
        "runs identical to an uninterrupted run (of 4)": equal,
    }


def ctrl_c_run(work: Path) -> dict:
    steps, every = 6000, 1000
    spec = write(work / "r.yaml", {**BASE, "name": "r", "budget": {"steps": steps},
                                   "checkpoint_every": every})  # fmt: skip
    out = work / "r_out"
    cmd = [PY, "-m", "qlrlab.cli", "run", str(spec), "--out", str(out), "-q", "--no-report"]
    proc = start(cmd)
    while not list(out.glob("runs/*/checkpoint.pt")) and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    (rdir,) = out.glob("runs/*")
    import torch

    ck = rdir / "checkpoint.pt"
    step = int(torch.load(ck, weights_only=True)["step"]) if ck.exists() else None
    if step is not None and step % every == 0:
        step = f"none (the last periodic one is at step {step})"
    done = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    df = pd.read_parquet(rdir / "metrics.parquet")
    return {
        "Ctrl-C on qlrlab run: exit code": proc.returncode,
        "checkpoint written at the Ctrl-C (step)": step,
        "--resume exit code": done.returncode,
        "resumed run has every step once": list(df["step"]) == list(range(steps + 1)),
        "traceback printed": "Traceback" in err,
    }


def interrupt_ablation(work: Path, how: str) -> dict:
    steps = 1000
    spec = write(work / f"{how}.yaml", ablation(steps, 2, checkpoint_every=50))
    out = work / f"{how}_out"
    proc = start(ablate_cmd(spec, out, "--workers", "2"))
    seen: set[int] = set()
    while len(list(out.glob("runs/*/checkpoint.pt"))) < 2 and proc.poll() is None:
        seen |= descendants(proc.pid)
        time.sleep(0.05)
    seen |= descendants(proc.pid)
    started = {p.name for p in out.glob("runs/*")}
    t0 = time.monotonic()
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - t0
    new_runs = len({p.name for p in out.glob("runs/*")} - started)
    left = survivors_after(seen, 5.0)
    done = subprocess.run(ablate_cmd(spec, out, "--workers", "2", "--resume"), env=ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    index = json.loads((out / "index.json").read_text())
    once = sum(
        list(pd.read_parquet(out / "runs" / e["hash"] / "metrics.parquet")["step"])
        == list(range(steps + 1))
        for e in index["entries"]
    )
    return {
        f"{how} on ablate: exit code": proc.returncode,
        "message printed": "interrupted" in err,
        "seconds to exit": round(took, 1),
        "runs started after the signal": new_runs,
        "processes left": left,
        "--resume: runs complete exactly once (of 4)": once if done.returncode == 0 else 0,
    }


def concurrent(work: Path) -> dict:
    spec = write(work / "c.yaml", ablation(10**6, 1, checkpoint_every=20))
    out = work / "c_out"
    proc = start(ablate_cmd(spec, out, "--workers", "1"))
    res: dict = {}
    try:
        while not list(out.glob("runs/*/checkpoint.pt")) and proc.poll() is None:
            time.sleep(0.05)
        for flag in ("--resume", "--overwrite"):
            try:
                other = subprocess.run([*ablate_cmd(spec, out), flag], env=ENV,
                                       capture_output=True, text=True, timeout=90)  # fmt: skip
            except subprocess.TimeoutExpired:
                res[f"second `ablate {flag}` while one runs: exit code"] = "none: ran for 90 s"
                continue
            res[f"second `ablate {flag}` while one runs: exit code"] = other.returncode
            res[f"  ... names the lock holder, no traceback ({flag})"] = (
                "another qlrlab process" in other.stderr and "Traceback" not in other.stderr
            )
            if "Traceback" in other.stderr:
                res[f"  ... error ({flag})"] = other.stderr.strip().splitlines()[-1][:120]
        res["first one unharmed"] = proc.poll() is None
    finally:
        kill_all({proc.pid, *descendants(proc.pid)})
        proc.communicate(timeout=60)
    return res


def cli(args: list[str]) -> tuple[int, str]:
    from qlrlab.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, err.getvalue()


def damaged_results(work: Path) -> dict:
    res: dict = {}
    spec = write(work / "d.yaml", ablation(8, 1, eval={"every": 4}))
    out = work / "d_out"
    cli(["ablate", str(spec), "--out", str(out), "-q", "--no-report"])
    runs = sorted(out.glob("runs/*"))
    data = (runs[0] / "metrics.parquet").read_bytes()
    (runs[0] / "metrics.parquet").write_bytes(data[: len(data) // 2])
    code, err = cli(["report", str(out)])
    res["truncated metrics (finished run): report exit code"] = code
    code, err = cli(["ablate", str(spec), "--out", str(out), "-q", "--no-report", "--resume"])
    res["  ... --resume exit code / counts"] = f"{code} / {err.strip().splitlines()[-1]}"
    code, _ = cli(["report", str(out)])
    res["  ... report after --resume"] = code
    (out / "index.json").write_bytes(b"\x00garbage{")
    code, err = cli(["report", str(out), "--no-plots"])
    table = (out / "report" / "table.md").read_text()
    res["garbage index.json: report exit code"] = code
    res["  ... runs in the table (of 2)"] = sum(v in table for v in ("| adam", "| sgd"))
    (runs[1] / "summary.json").write_text("[1, 2]\n")
    code, err = cli(["report", str(out), "--no-plots"])
    res["summary.json that is a list: warned"] = "summary.json" in err
    code, err = cli(["ablate", str(spec), "--out", str(out), "-q", "--no-report", "--resume"])
    res["  ... --resume reruns it"] = f"{code} / {err.strip().splitlines()[-1]}"
    # an unfinished run with a truncated metrics file
    from qlrlab.engine.runner import RunInterrupted, execute_run
    from qlrlab.engine.specs import RunSpec
    from qlrlab.engine.storage import RunStore

    rs = RunSpec.model_validate({**BASE, "budget": {"steps": 30}, "eval": {"every": 5}})
    store = RunStore(work / "u_out")
    with contextlib.suppress(RunInterrupted):
        execute_run(rs, store, stop_after=12)
    m = next((work / "u_out" / "runs").iterdir()) / "metrics.parquet"
    m.write_bytes(m.read_bytes()[:100])
    ok = 0
    for _ in range(2):
        with contextlib.redirect_stderr(io.StringIO()):
            try:
                ok += execute_run(rs, store).status == "completed"
            except Exception:
                pass
    res["truncated metrics (unfinished run): resumes that succeed (of 2)"] = ok
    return res


def killed_twice_study(work: Path) -> dict:
    die = (
        "import os, sys\nimport qlrlab.engine.tuning as t\nn = int(sys.argv.pop(1)); c = [0]\n"
        "inner = t.run_safely\n"
        "def rs(run, store, *, labels=None, reporter=None, **kw):\n"
        "    def rep(step, seconds, metrics):\n"
        "        out = reporter(step, seconds, metrics); c[0] += 1\n"
        "        if c[0] >= n: os._exit(137)\n"
        "        return out\n"
        "    return inner(run, store, labels=labels, reporter=rep, **kw)\n"
        "t.run_safely = rs\nfrom qlrlab.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    )
    data = {
        "name": "kt", "base": {**BASE, "budget": {"steps": 24}, "checkpoint_every": 1},
        "space": {"optimizer.step_size.lr": {"type": "choice", "choices": [0.1]}},
        "metric": "val_loss", "scope": "last", "n_trials": 1,
        "scheduler": {"type": "asha", "resource": "steps", "min_resource": 3,
                      "reduction_factor": 2},
        "trial_overrides": {"eval.every": 3}, "repeats": 1,
    }  # fmt: skip
    spec = write(work / "t.yaml", data)
    args = ["tune", str(spec), "--out", str(work / "t_out"), "-q", "--no-report"]
    for n, extra in ((3, []), (2, ["--resume"])):
        subprocess.run([PY, "-c", die, str(n), *args, *extra], env=ENV, capture_output=True,
                       timeout=300)  # fmt: skip
    done = subprocess.run([PY, "-m", "qlrlab.cli", *args, "--resume"], env=ENV,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    return {
        "Optuna study killed twice, --resume: exit code": done.returncode,
        "  ... best value": json.loads((work / "t_out" / "best.json").read_text())["value"],
    }


def damaged_datasets(work: Path) -> dict:
    from qlrlab.data import ChecksumError, ensure_file, file_digest
    from qlrlab.data.download import DATASET_FILES

    files = [p for ds in ("uci_protein", "fashion_mnist", "penn_treebank")
             for p in DATASET_FILES[ds]]  # fmt: skip
    task_of = {"uci_protein": {"name": "uci_protein"}, "fashion_mnist": {"name": "fashion_mnist"},
               "penn_treebank": {"name": "ptb", "n_layer": 1, "n_embd": 8, "n_head": 1}}  # fmt: skip
    tried = clear = redownloaded = traceback = 0
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(SHARED))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mirror = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for rel in files:
            for how in ("truncated", "byte-flipped"):
                d = work / "data" / how / rel.replace("/", "_")
                (d / rel).parent.mkdir(parents=True, exist_ok=True)
                for other in DATASET_FILES[rel.split("/")[0]]:  # the others intact
                    shutil.copy(SHARED / other, d / other)
                b = bytearray((SHARED / rel).read_bytes())
                if how == "truncated":
                    del b[len(b) // 3 :]
                else:
                    b[len(b) // 2] ^= 1
                (d / rel).write_bytes(bytes(b))
                task = {**task_of[rel.split("/")[0]], "data_dir": str(d), "download": False}
                spec = write(d / "run.yaml", {**BASE, "task": task, "budget": {"steps": 1}})
                code, err = cli(["run", str(spec), "--out", str(d / "out"), "-q", "--no-report"])
                tried += 1
                clear += code == 2 and str(d / rel) in err and "Traceback" not in err
                traceback += "Traceback" in err
                with contextlib.redirect_stderr(io.StringIO()):
                    try:
                        p = ensure_file(rel, d, download=True, mirror=mirror, progress=False)
                        redownloaded += file_digest(p) == file_digest(SHARED / rel)
                    except ChecksumError:
                        pass
    finally:
        server.shutdown()
    return {
        "damaged dataset files tried (8 files x truncated/byte-flipped)": tried,
        "  ... clear exit-2 error naming the file (download off)": clear,
        "  ... tracebacks": traceback,
        "  ... downloaded again and verified (download on, local mirror)": redownloaded,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--only", nargs="*", help="sections to run (default: all)")
    a = ap.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="qlrlab-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    sections = {
        "sigkill": lambda: sigkills(work, a.kills),
        "ctrl-c-run": lambda: ctrl_c_run(work),
        "ctrl-c-ablate": lambda: interrupt_ablation(work, "ctrl-c"),
        "sigterm-ablate": lambda: interrupt_ablation(work, "sigterm"),
        "concurrent": lambda: concurrent(work),
        "results": lambda: damaged_results(work),
        "study": lambda: killed_twice_study(work),
        "datasets": lambda: damaged_datasets(work),
    }
    for name, fn in sections.items():
        if a.only and name not in a.only:
            continue
        t0 = time.monotonic()
        res = fn()
        print(f"## {name} ({time.monotonic() - t0:.0f} s)")
        for k, v in res.items():
            print(f"{k}: {v}")
        sys.stdout.flush()
    if a.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
