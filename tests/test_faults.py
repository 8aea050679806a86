"""Faults of real ``qlrlab`` processes and files: SIGKILL/SIGINT/SIGTERM of runs and ablation
coordinators (no process left behind, nothing lost, every run exactly once), concurrent
invocations on one folder, truncated or garbage result files, a twice-killed Optuna study,
corrupt dataset files, and ``qlrlab run --threads``.

Every subprocess is bounded in time and every process it starts is killed in ``finally``.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from qlrlab.cli import main
from qlrlab.engine.runner import RunInterrupted, execute_run
from qlrlab.engine.specs import RunSpec
from qlrlab.engine.storage import RunStore

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

BASE = {
    "task": {"name": "uci_energy", "subset": 96},
    "optimizer": "adam",
    "batch_size": 32,
    "budget": {"steps": 8},
    "device": "cpu",
}


def _ablation(steps: int, seeds: int, **base: object) -> dict:
    return {
        "name": "faults",
        "base": {**BASE, "budget": {"steps": steps}, **base},
        "variants": {"adam": "adam", "sgd": {"optimizer": {"preset": "sgd", "args": {"lr": 0.01}}}},
        "seeds": list(range(seeds)),
    }


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------
# process helpers (Linux /proc)
# --------------------------------------------------------------------------------------------


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0]


def _alive(pid: int) -> bool:
    st = _ppid_and_state(pid)
    return st is not None and st[1] not in ("Z", "X")


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _ppid_and_state(int(d.name))
            if st is not None:
                children.setdefault(st[0], []).append(int(d.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _wait_for(pred, timeout: float, proc: subprocess.Popen | None = None) -> None:
    t0 = time.monotonic()
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


#: ``python -c`` prologue that execs the command with Ctrl-C (SIGINT) at its default action, as at
#: a terminal: a test runner started in the background by a non-interactive shell (``cmd &``,
#: ``nohup``) ignores SIGINT, every process it starts inherits that, and a Python process that
#: starts with SIGINT ignored keeps ignoring it (no KeyboardInterrupt), as ``nohup`` intends
_SIGINT_DEFAULT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


@contextlib.contextmanager
def _started(cmd: list[str], **kw: object) -> Iterator[tuple[subprocess.Popen, set[int]]]:
    """Start ``cmd`` in its own session, with SIGINT at its default action whatever the test
    runner's (see :data:`_SIGINT_DEFAULT`); on exit kill it and every process it started."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGINT_DEFAULT, *cmd], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    seen: set[int] = set()
    try:
        yield proc, seen
    finally:
        for pid in [proc.pid, *_descendants(proc.pid), *seen]:
            with contextlib.suppress(ProcessLookupError):
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.communicate(timeout=30)


def _workers_of(proc: subprocess.Popen, seen: set[int], n: int) -> set[int]:
    """Wait until ``proc`` has ``n`` spawned worker processes; returns all its descendants."""

    def ready() -> bool:
        desc = _descendants(proc.pid)
        seen.update(desc)
        workers = [
            p for p in desc if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore")
        ]
        return len(workers) >= n

    _wait_for(ready, 120, proc)
    return set(seen)


def _assert_all_gone(pids: set[int], within: float) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    survivors = {
        p: Path(f"/proc/{p}/cmdline").read_text(errors="ignore") for p in pids if _alive(p)
    }
    assert not survivors, f"processes outlived their coordinator: {survivors}"


def _ablate_cmd(spec: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qlrlab.cli", "ablate", str(spec), "--out", str(out), "-q",
            "--no-report", *extra]  # fmt: skip


def _check_every_run_once(out: Path, steps: int, n: int) -> None:
    index = json.loads((out / "index.json").read_text())
    assert len({e["hash"] for e in index["entries"]}) == n
    for e in index["entries"]:
        rdir = out / "runs" / e["hash"]
        summary = json.loads((rdir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == steps
        df = pd.read_parquet(rdir / "metrics.parquet")
        assert list(df["step"]) == list(range(steps + 1))  # every row once, none lost
        assert not (rdir / "checkpoint.pt").exists()


# --------------------------------------------------------------------------------------------
# Processes and signals
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("when", ["importing", "running"])
def test_sigkilled_coordinator_leaves_no_worker(tmp_path, when):
    """SIGKILL of the coordinator while its workers import torch, or while they train: no
    worker survives 10 s later, and none writes into the results folder after the kill."""
    spec = _write(tmp_path / "a.yaml", _ablation(10**6, 2, checkpoint_every=20))
    out = tmp_path / "out"
    with _started(_ablate_cmd(spec, out, "--workers", "2")) as (proc, seen):
        pids = _workers_of(proc, seen, 2)
        if when == "running":
            _wait_for(lambda: len(list(out.glob("runs/*/checkpoint.pt"))) >= 2, 120, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        pids |= _descendants(proc.pid) | seen
        _assert_all_gone(pids, within=10)
        before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        time.sleep(1.0)
        after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
        assert after == before  # nothing writes any more
        assert not list(out.glob("runs/*/summary.json"))


@pytest.mark.slow
def test_ctrl_c_on_run_writes_a_checkpoint_that_resume_continues(tmp_path):
    steps, every = 6000, 1000
    spec = _write(tmp_path / "run.yaml", {
        **BASE, "name": "long", "budget": {"steps": steps}, "checkpoint_every": every,
    })  # fmt: skip
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qlrlab.cli", "run", str(spec), "--out", str(out), "-q",
           "--no-report"]  # fmt: skip
    with _started(cmd) as (proc, _):
        # training is under way once the first periodic checkpoint is there
        _wait_for(lambda: bool(list(out.glob("runs/*/checkpoint.pt"))), 120, proc)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C at a terminal signals the process group
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    (rdir,) = out.glob("runs/*")
    ckpt = torch.load(rdir / "checkpoint.pt", weights_only=True)
    assert every < ckpt["step"] < steps and ckpt["step"] % every  # written at the Ctrl-C
    before = pd.read_parquet(rdir / "metrics.parquet")
    assert list(before["step"]) == list(range(ckpt["step"] + 1))
    done = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = pd.read_parquet(rdir / "metrics.parquet")
    assert list(after["step"]) == list(range(steps + 1))
    # the rows before the interruption are the ones written then: it continued, not restarted
    pd.testing.assert_frame_equal(
        after.iloc[: len(before)][before.columns], before, check_dtype=False
    )


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupted_ablation_stops_promptly_and_resumes_every_run_once(tmp_path, how):
    """Ctrl-C (SIGINT to the process group) or SIGTERM (to the coordinator only): a message,
    the workers checkpoint and exit, no new run starts, exit 130 within seconds; ``--resume``
    then finishes every run exactly once. (2000 steps: on a loaded machine the runs of 1000
    steps could all end between the first checkpoints and the signal, which then came too late.)"""
    steps = 2000
    spec = _write(tmp_path / "a.yaml", _ablation(steps, 2, checkpoint_every=50))
    out = tmp_path / "out"
    with _started(_ablate_cmd(spec, out, "--workers", "2")) as (proc, seen):
        pids = _workers_of(proc, seen, 2)
        _wait_for(lambda: len(list(out.glob("runs/*/checkpoint.pt"))) >= 2, 120, proc)
        started = {p.name for p in out.glob("runs/*")}
        t0 = time.monotonic()
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 130, err
        assert "interrupted" in err and "--resume" in err and "Traceback" not in err
        assert elapsed < 10, f"took {elapsed:.1f} s to stop"
        assert {p.name for p in out.glob("runs/*")} == started  # no new run was taken
        _assert_all_gone(pids | seen, within=5)
    assert len(list(out.glob("runs/*/checkpoint.pt"))) >= 2
    if how == "sigterm":
        return  # the resume is the same as after Ctrl-C
    done = subprocess.run(
        [*_ablate_cmd(spec, out, "--workers", "2"), "--resume"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    _check_every_run_once(out, steps, 4)


@pytest.mark.slow
def test_second_invocation_on_a_busy_folder_is_refused(tmp_path):
    spec = _write(tmp_path / "a.yaml", _ablation(10**6, 1, checkpoint_every=20))
    out = tmp_path / "out"
    with _started(_ablate_cmd(spec, out, "--workers", "1")) as (proc, _):
        _wait_for(lambda: bool(list(out.glob("runs/*/checkpoint.pt"))), 120, proc)
        for flag in ("--resume", "--overwrite"):
            other = subprocess.run(
                [*_ablate_cmd(spec, out), flag], env=ENV, capture_output=True, text=True,
                timeout=120,
            )  # fmt: skip
            assert other.returncode == 2, other.stderr
            assert "another qlrlab process" in other.stderr and "Traceback" not in other.stderr
            assert f"pid {proc.pid}" in other.stderr  # names the process at work
        assert proc.poll() is None  # the first one is unharmed
        assert list(out.glob("runs/*/checkpoint.pt"))
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    # once it ended, the folder is free again
    assert main(["ablate", str(spec), "--out", str(out), "-q", "--no-report", "--dry-run"]) == 0


def test_lock_is_released_and_reported(tmp_path):
    from qlrlab.engine.specs import SpecError
    from qlrlab.engine.storage import FolderLock

    with FolderLock(tmp_path):
        with pytest.raises(SpecError, match="another qlrlab process") as exc:
            with FolderLock(tmp_path):
                pass
        assert "pid" in exc.value.message and exc.value.fix
    with FolderLock(tmp_path):  # released
        pass


# --------------------------------------------------------------------------------------------
# Corrupted or partial files
# --------------------------------------------------------------------------------------------


def _small_ablation(tmp_path: Path) -> tuple[Path, Path]:
    spec = _write(tmp_path / "a.yaml", _ablation(8, 1, eval={"every": 4}))
    out = tmp_path / "out"
    assert main(["ablate", str(spec), "--out", str(out), "-q", "--no-report"]) == 0
    return spec, out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_metrics_of_a_finished_run_rerun_once_and_report(tmp_path, capsys):
    spec, out = _small_ablation(tmp_path)
    runs = sorted(out.glob("runs/*"))
    bad, good = runs[0], runs[1]
    good_summary = (good / "summary.json").read_text()
    _truncate(bad / "metrics.parquet")
    capsys.readouterr()
    # the report of the whole folder does not crash (curves included); it names the bad file
    assert main(["report", str(out)]) == 0
    err = capsys.readouterr().err
    assert "metrics.parquet" in err and bad.name in err
    assert main(["ablate", str(spec), "--out", str(out), "-q", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "runs: 2 completed, 1 skipped" in err  # the skipped one counts as completed too
    df = pd.read_parquet(bad / "metrics.parquet")
    assert list(df["step"]) == list(range(0, 9)) or list(df["step"]) == list(range(1, 9))
    assert (good / "summary.json").read_text() == good_summary  # the good run was not rerun
    assert (out / "report" / "table.md").exists()
    # once repaired, a further --resume skips both
    assert main(["ablate", str(spec), "--out", str(out), "-q", "--resume", "--no-report"]) == 0
    assert "2 skipped" in capsys.readouterr().err


@pytest.mark.parametrize("what", ["metrics", "checkpoint"])
def test_corrupt_file_of_an_unfinished_run_is_recovered(tmp_path, what, one_thread):
    spec = RunSpec.model_validate({**BASE, "budget": {"steps": 30}, "eval": {"every": 5}})
    store = RunStore(tmp_path / "a")
    with pytest.raises(RunInterrupted):
        execute_run(spec, store, stop_after=12)
    rdir = next((tmp_path / "a" / "runs").iterdir())
    _truncate(rdir / ("metrics.parquet" if what == "metrics" else "checkpoint.pt"))
    res = execute_run(spec, store)  # the resume recovers instead of failing
    assert res.status == "completed" and res.summary["steps"] == 30
    ref = execute_run(spec, RunStore(tmp_path / "ref"))
    a = store.metrics(res.hash)
    b = RunStore(tmp_path / "ref").metrics(ref.hash)
    assert list(a["step"]) == list(b["step"])  # no row lost, none twice
    pd.testing.assert_series_equal(a["loss"], b["loss"])


def test_garbage_index_is_rebuilt_from_the_run_folders(tmp_path, capsys):
    _, out = _small_ablation(tmp_path)
    (out / "index.json").write_bytes(b"\x00\x17 not json {")
    capsys.readouterr()
    assert main(["report", str(out), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert "index.json" in captured.err and "rebuilt" in captured.err
    assert "No finished runs" not in captured.out
    table = (out / "report" / "table.md").read_text()
    assert "adam" in table and "sgd" in table


def test_summary_that_is_not_an_object_is_reported_and_rerun(tmp_path, capsys):
    spec, out = _small_ablation(tmp_path)
    bad = sorted(out.glob("runs/*"))[0]
    (bad / "summary.json").write_text("[1, 2, 3]\n")
    capsys.readouterr()
    assert main(["report", str(out), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "summary.json" in err and bad.name in err and "--resume" in err
    assert main(["ablate", str(spec), "--out", str(out), "-q", "--resume", "--no-report"]) == 0
    assert "1 skipped" in capsys.readouterr().err
    assert json.loads((bad / "summary.json").read_text())["status"] == "completed"


_DIE_AFTER_REPORTS = """
import os, sys
import qlrlab.engine.tuning as tuning
n = int(sys.argv.pop(1)); count = [0]; inner = tuning.run_safely
def run_safely(run, store, *, labels=None, reporter=None, **kw):
    def rep(step, seconds, metrics):
        out = reporter(step, seconds, metrics)
        count[0] += 1
        if count[0] >= n:
            os._exit(137)  # killed: no clean-up at all, like SIGKILL
        return out
    return inner(run, store, labels=labels, reporter=rep, **kw)
tuning.run_safely = run_safely
from qlrlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_optuna_study_killed_twice_resumes_to_a_result(tmp_path):
    """Killed in the middle of its only trial, twice: the resumed study finishes that trial
    (its stale rung values do not prune it) and repeats the best configuration."""
    from optuna.trial import TrialState

    data = {
        "name": "killed_twice",
        "base": {**BASE, "budget": {"steps": 24}, "checkpoint_every": 1},
        "space": {"optimizer.step_size.lr": {"type": "choice", "choices": [0.1]}},
        "metric": "val_loss",
        "scope": "last",
        "n_trials": 1,
        "scheduler": {"type": "asha", "resource": "steps", "min_resource": 3,
                      "reduction_factor": 2},
        "trial_overrides": {"eval.every": 3},
        "repeats": 1,
    }  # fmt: skip
    spec = _write(tmp_path / "t.yaml", data)
    out = tmp_path / "out"
    args = ["tune", str(spec), "--out", str(out), "-q", "--no-report"]
    for n, extra in ((3, []), (2, ["--resume"])):  # killed at step 6, then at step 9
        killed = subprocess.run([sys.executable, "-c", _DIE_AFTER_REPORTS, str(n), *args, *extra],
                                env=ENV, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert killed.returncode == 137, killed.stderr
    done = subprocess.run(
        [sys.executable, "-m", "qlrlab.cli", *args, "--resume"],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "= None" not in done.stderr
    best = json.loads((out / "best.json").read_text())
    assert best["value"] is not None
    import optuna

    study = optuna.load_study(study_name="killed_twice", storage=f"sqlite:///{out / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert TrialState.PRUNED not in states and states.count(TrialState.COMPLETE) == 1
    index = json.loads((out / "index.json").read_text())
    assert [e["labels"]["kind"] for e in index["entries"]].count("repeat") == 1


def test_interrupted_trial_is_continued_not_failed(tmp_path, monkeypatch, one_thread):
    """Ctrl-C inside a trial (the run checkpoints, then raises RunInterrupted): the study stops
    with RunInterrupted, the trial is left to continue, and --resume finishes it as itself."""
    import optuna
    from optuna.trial import TrialState

    import qlrlab.engine.tuning as tuning
    from qlrlab.engine.specs import TuneSpec

    data = {
        "name": "interrupted",
        "base": {**BASE, "budget": {"steps": 12}},
        "space": {"optimizer.step_size.lr": {"type": "log_uniform", "low": 1e-3, "high": 0.1}},
        "n_trials": 2,
        "scheduler": {"type": "none"},
        "trial_overrides": {"eval.every": 3},
        "repeats": 0,
    }
    spec = TuneSpec.model_validate(data)
    inner = tuning.run_safely

    def interrupted(run, store, **kw):
        calls.append(1)
        if len(calls) > 1:
            return inner(run, store, **kw)
        with pytest.raises(RunInterrupted):  # what the run loop does on Ctrl-C
            execute_run(run, store, stop_after=5)
        raise RunInterrupted("run interrupted at step 5 (SIGINT)")

    calls: list[int] = []
    monkeypatch.setattr(tuning, "run_safely", interrupted)
    with pytest.raises(RunInterrupted, match="continues on --resume"):
        tuning.run_tune(spec, tmp_path / "out", quiet=True)
    study = optuna.load_study(
        study_name="interrupted", storage=f"sqlite:///{tmp_path}/out/optuna.db"
    )
    assert [t.state for t in study.trials] == [TrialState.RUNNING]
    res = tuning.run_tune(spec, tmp_path / "out", quiet=True, resume=True)
    study = optuna.load_study(
        study_name="interrupted", storage=f"sqlite:///{tmp_path}/out/optuna.db"
    )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert res.n_trials == 2 and res.best_value is not None


# --------------------------------------------------------------------------------------------
# Dataset files
# --------------------------------------------------------------------------------------------

PROTEIN = "uci_protein/dropout_uncertainty_exps/data.txt"


@pytest.fixture
def protein_dir(tmp_path, shared_data) -> Path:
    d = tmp_path / "data"
    (d / PROTEIN).parent.mkdir(parents=True)
    shutil.copy(shared_data / PROTEIN, d / PROTEIN)
    return d


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        del data[len(data) // 3 :]
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "byte-flipped"])
def test_corrupt_dataset_file_on_disk_is_a_clear_error(protein_dir, tmp_path, capsys, how):
    from qlrlab.data import ChecksumError, ensure_file

    _corrupt(protein_dir / PROTEIN, how)
    with pytest.raises(ChecksumError) as exc:
        ensure_file(PROTEIN, protein_dir, download=False)
    msg = str(exc.value)
    assert str(protein_dir / PROTEIN) in msg and "delete" in msg.lower() and "download" in msg
    run = _write(tmp_path / "run.yaml", {
        **BASE, "task": {"name": "uci_protein", "data_dir": str(protein_dir), "download": False},
    })  # fmt: skip
    capsys.readouterr()
    assert main(["run", str(run), "--out", str(tmp_path / "out"), "-q", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert str(protein_dir / PROTEIN) in err and "Traceback" not in err
    assert "checksum" in err or "bytes" in err


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror(shared_data) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(shared_data))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_corrupt_dataset_file_is_downloaded_again_when_download_is_on(
    protein_dir, mirror, shared_data
):
    from qlrlab.data import ensure_file, file_digest

    _corrupt(protein_dir / PROTEIN, "byte-flipped")
    path = ensure_file(PROTEIN, protein_dir, download=True, mirror=mirror, progress=False)
    assert file_digest(path) == file_digest(shared_data / PROTEIN)


# --------------------------------------------------------------------------------------------
# threads
# --------------------------------------------------------------------------------------------


def test_run_threads_option(tmp_path, capsys):
    spec = _write(tmp_path / "r.yaml", {**BASE, "name": "t"})
    for n in (1, 2):
        out = tmp_path / f"out{n}"
        assert main(["run", str(spec), "--out", str(out), "-q", "--no-report",
                     "--threads", str(n)]) == 0  # fmt: skip
        (rec,) = [json.loads(p.read_text()) for p in out.glob("runs/*/spec.json")]
        assert rec["threads"] == n
    with pytest.raises(SystemExit) as exc:
        main(["run", str(spec), "--threads", "0"])
    assert exc.value.code == 2
    assert "--threads" in capsys.readouterr().err
