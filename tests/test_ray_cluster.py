"""A real Ray cluster: a head started as a separate process on 127.0.0.1 *without* QLRLAB_DATA,
and ``qlrlab tune`` / ``qlrlab ablate`` drivers that have it. What a run needs travels with the
job; a driver killed mid-way resumes with every run exactly once; failed trials are summarised
once; the cluster is stopped (its whole process group) so that nothing outlives the test.

Also, without Ray: the node probe names the host and the path, version mismatches are reported,
and a study whose every trial fails writes no result (Optuna)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from qlrlab.engine.cluster import (
    apply_job_environment,
    compare_nodes,
    job_environment,
    probe_node,
)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 200

# Ray turns 127.0.0.1 into the machine's address unless it runs in single-machine mode; the
# test cluster stays on the loopback interface, unauthenticated (nothing else can reach it).
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}

BOOM_PLUGIN = '''
"""A task whose data check passes but whose build fails (a failing trial)."""
from typing import Literal
from qlrlab.tasks import TASKS, TaskSpec

@TASKS.register("boom_task")
class BoomSpec(TaskSpec):
    name: Literal["boom_task"] = "boom_task"
    def check_data(self) -> None:
        pass
    def build(self, device="cpu", dtype=None):
        raise RuntimeError("boom: this task always fails")
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _driver_env(data: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QLRLAB_DATA", "QLRLAB_MIRROR")}
    env.update(RAY_ENV, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if data is not None:
        env["QLRLAB_DATA"] = str(data)
    return env


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """``ray start --head --block`` on 127.0.0.1 (2 CPUs) in its own process group; its
    environment has no QLRLAB_DATA. Killed, group and all, at the end."""
    pytest.importorskip("ray")
    pytest.importorskip("ray.tune")
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.fail(f"the ray command is missing beside {sys.executable}")
    tmp = tempfile.mkdtemp(prefix="qlr-ray-", dir="/tmp")  # short: Unix socket paths
    port = _free_port()
    env = {**_driver_env(None), "RAY_TMPDIR": tmp}  # its address file stays out of /tmp/ray
    log = open(Path(tmp) / "head.log", "w+")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(port), "--num-cpus", "2", "--include-dashboard=false",
         "--disable-usage-stats", "--temp-dir", tmp],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in Path(tmp, "head.log").read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "the Ray head did not start:\n" + Path(tmp, "head.log").read_text()
                )
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        with __import__("contextlib").suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(30)
        log.close()
        deadline = time.monotonic() + 30
        while _processes_mentioning(tmp) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _processes_mentioning(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        assert not left, f"Ray processes outlived the cluster: {left}"


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


BASE = {
    "task": {"name": "uci_protein", "subset": 256, "download": False, "eval_subset": 256},
    "optimizer": "adam",
    "batch_size": 64,
    "budget": {"steps": STEPS},
    "eval": {"every": 100},
    "checkpoint_every": 10,
    "device": "cpu",
}


def _boom_study(tmp_path: Path, **fields) -> tuple[Path, Path]:
    """The ``boom_task`` plugin and a study of it (every trial fails)."""
    plugin = tmp_path / "boom_plugin.py"
    plugin.write_text(BOOM_PLUGIN)
    study = {
        "name": "boom_study",
        "base": {**BASE, "task": {"name": "boom_task"}, "budget": {"steps": 5}},
        "space": {"optimizer.step_size.lr": {"type": "log_uniform", "low": 1e-4, "high": 0.03}},
        "metric": "val_loss",
        "scheduler": {"type": "none"},
        **fields,
    }
    return plugin, _write(tmp_path / "boom.yaml", study)


def _wait_for(cond, timeout: float, proc: subprocess.Popen) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            _, err = proc.communicate()
            raise AssertionError(f"driver exited early ({proc.returncode}):\n{err[-3000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


def _check_runs(out: Path, hashes: set[str], steps: int) -> None:
    for h in hashes:
        rdir = out / "runs" / h
        summary = json.loads((rdir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == steps, summary
        df = pd.read_parquet(rdir / "metrics.parquet")
        assert list(df["step"]) == list(range(steps + 1))  # every row once, none lost
        assert not (rdir / "checkpoint.pt").exists()


@pytest.mark.slow
def test_tune_on_cluster_without_data_env_killed_and_resumed(ray_head, shared_data, tmp_path):
    """The issue's scenario: the cluster has no QLRLAB_DATA, the driver has; a 4-trial study
    finds a best configuration. The driver is SIGKILLed once mid-way and resumed."""
    spec = _write(
        tmp_path / "tune.yaml",
        {
            "name": "cluster_study",
            "base": BASE,
            "space": {"optimizer.step_size.lr": {"type": "log_uniform", "low": 1e-4, "high": 0.03}},
            "metric": "val_loss",
            "n_trials": 4,
            "scheduler": {"type": "none"},
            "repeats": 1,
        },
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qlrlab.cli", "tune", str(spec), "--out", str(out), "-q",
           "--no-report", "--backend", "ray", "--address", ray_head]  # fmt: skip
    env = _driver_env(shared_data)

    def finished() -> list[Path]:
        return list(out.glob("runs/*/summary.json"))

    def partial() -> bool:
        return any(
            not (p.parent / "summary.json").exists() for p in out.glob("runs/*/checkpoint.pt")
        )

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: len(finished()) >= 1 and partial(), 240, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    t_kill = time.monotonic() - t0
    before = {p.parent.name: p.stat().st_mtime_ns for p in finished()}
    assert 1 <= len(before) < 4
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    t_all = time.monotonic() - t0
    print(f"cluster tune: killed after {t_kill:.1f} s, resumed to the end at {t_all:.1f} s")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Traceback" not in done.stderr
    best = json.loads((out / "best.json").read_text())
    assert best["n_trials"] == 4 and best["value"] is not None
    assert 1e-4 <= best["overrides"]["optimizer.step_size.lr"] <= 0.03
    index = json.loads((out / "index.json").read_text())
    trials = {e["hash"] for e in index["entries"] if e["labels"]["kind"] == "trial"}
    repeats = {e["hash"] for e in index["entries"] if e["labels"]["kind"] == "repeat"}
    assert len(trials) == 4 and len(repeats) == 1
    _check_runs(out, trials | repeats, STEPS)
    # runs finished before the kill were not run again
    for h, mtime in before.items():
        assert (out / "runs" / h / "summary.json").stat().st_mtime_ns == mtime
    # the best configuration is the trial with the lowest final validation loss
    finals = {
        h: json.loads((out / "runs" / h / "summary.json").read_text())["final_val_loss"]
        for h in trials
    }
    assert best["value"] == pytest.approx(min(finals.values()))
    # the workers saw the driver's data directory (recorded in each run's spec)
    for h in trials:
        rec = json.loads((out / "runs" / h / "spec.json").read_text())
        assert rec["spec"]["task"]["name"] == "uci_protein"


@pytest.mark.slow
def test_ablation_on_cluster_and_failed_trials_summarised(ray_head, shared_data, tmp_path):
    """A Ray ablation against the cluster; then a study whose trials all fail (a --plugin task
    that travels to the workers): one summary, exit 1, no best.json, no report."""
    env = _driver_env(shared_data)
    abl = _write(
        tmp_path / "abl.yaml",
        {
            "name": "cluster_ablation",
            "base": {**BASE, "budget": {"steps": 40}, "eval": {"every": 20}},
            "variants": {
                "adam": "adam",
                "sgd": {"optimizer": {"preset": "sgd", "args": {"lr": 0.01}}},
            },
            "seeds": [0],
        },
    )
    out = tmp_path / "abl"
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "qlrlab.cli", "ablate", str(abl), "--out", str(out), "-q",
         "--no-report", "--backend", "ray", "--address", ray_head],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    print(f"cluster ablation: {time.monotonic() - t0:.1f} s")
    assert res.returncode == 0, res.stderr[-4000:]
    index = json.loads((out / "index.json").read_text())
    hashes = {e["hash"] for e in index["entries"]}
    assert len(hashes) == 2
    _check_runs(out, hashes, 40)

    plugin, tune = _boom_study(tmp_path, n_trials=2, repeats=1)
    out = tmp_path / "boom"
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "qlrlab.cli", "tune", str(tune), "--out", str(out), "-q",
         "--backend", "ray", "--address", ray_head, "--plugin", str(plugin)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    print(f"cluster failing study: {time.monotonic() - t0:.1f} s")
    assert res.returncode == 1, res.stderr[-4000:]
    err = res.stderr
    assert "2 of 2 trials failed" in err and "and 1 more failed trial(s)" in err
    assert err.count("boom: this task always fails") == 1  # the first failure, once
    assert "on node 127.0.0.1" in err  # which node
    assert "optimizer.step_size.lr=" in err  # the trial's configuration
    assert "Traceback" not in err
    assert not (out / "best.json").exists() and not (out / "report").exists()


# --------------------------------------------------------------------------------------------
# Without a cluster: the probe, version comparison, job environment, Optuna failure summary
# --------------------------------------------------------------------------------------------


def test_job_environment_travels_and_replaces_the_workers(monkeypatch, tmp_path):
    monkeypatch.setenv("QLRLAB_DATA", str(tmp_path / "driver-data"))
    monkeypatch.setenv("QLRLAB_MIRROR", "http://127.0.0.1:9/mirror")
    monkeypatch.delenv("QLRLAB_PLUGINS", raising=False)
    env = job_environment(threads=2)
    assert env["QLRLAB_DATA"] == str((tmp_path / "driver-data").resolve())
    assert env["QLRLAB_MIRROR"] == "http://127.0.0.1:9/mirror"
    assert env["OMP_NUM_THREADS"] == "2" and "QLRLAB_PLUGINS" not in env
    import torch

    import qlrlab

    assert env["QLRLAB_DRIVER_VERSION"].startswith(qlrlab.__version__ + "+")
    assert env["QLRLAB_DRIVER_TORCH"] == torch.__version__
    # a worker whose node was started with other settings takes the driver's
    old = torch.get_num_threads()
    monkeypatch.setenv("QLRLAB_DATA", "/nonexistent/worker-data")
    monkeypatch.setenv("QLRLAB_PLUGINS", "/nonexistent/plugin.py")
    try:
        apply_job_environment(env)
        assert os.environ["QLRLAB_DATA"] == env["QLRLAB_DATA"]
        assert "QLRLAB_PLUGINS" not in os.environ
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_probe_names_host_and_path_and_versions_are_compared(monkeypatch, tmp_path):
    monkeypatch.delenv("QLRLAB_PLUGINS", raising=False)
    missing = tmp_path / "no-data-here"
    monkeypatch.setenv("QLRLAB_DATA", str(missing))
    env = job_environment()
    out = tmp_path / "out"
    out.mkdir()
    (out / "tok").write_text("x")
    rep = probe_node(env, [{"name": "uci_protein", "download": False}], str(out), "tok")
    assert rep["node"].endswith(f"({socket.gethostname()})")
    (problem,) = rep["problems"]
    assert str(missing) in problem and "uci_protein" in problem
    # an output directory the node cannot see
    rep2 = probe_node(env, [], str(tmp_path / "elsewhere"), "tok")
    assert "cannot see the output directory" in rep2["problems"][0]
    driver = {"qlrlab": rep["qlrlab"], "torch": rep["torch"], "python": rep["python"]}
    assert compare_nodes(driver, [{**rep, "problems": []}]) == []
    other = {**rep, "problems": [], "torch": "2.0.0", "node": "10.0.0.7 (worker-7)"}
    (msg,) = compare_nodes(driver, [other])
    assert msg.startswith("node 10.0.0.7 (worker-7): torch 2.0.0 differs") and rep["torch"] in msg


@pytest.fixture
def _forget_plugin_tasks() -> Iterator[None]:
    """The --plugin tasks registered in this process are removed afterwards."""
    from qlrlab.tasks import TASKS

    yield
    for name in ("boom_task", "boom_task2"):
        TASKS.unregister(name)


@pytest.mark.usefixtures("_forget_plugin_tasks")
def test_optuna_study_whose_trials_all_fail_writes_no_result(
    tmp_path, one_thread, monkeypatch, capsys
):
    from qlrlab.cli import main

    monkeypatch.delenv("QLRLAB_PLUGINS", raising=False)  # restored after the test

    plugin, tune = _boom_study(tmp_path, n_trials=3)
    out = tmp_path / "out"
    rc = main(["tune", str(tune), "--out", str(out), "-q", "--plugin", str(plugin)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "3 of 3 trials failed; the first: RuntimeError: boom" in err
    assert "and 2 more failed trial(s)" in err and "optimizer.step_size.lr=" in err
    assert not (out / "best.json").exists() and not (out / "report").exists()


@pytest.mark.usefixtures("_forget_plugin_tasks")
def test_ablation_prints_the_first_failed_run_once_and_counts_the_rest(
    tmp_path, one_thread, monkeypatch, capsys
):
    from qlrlab.cli import main

    monkeypatch.delenv("QLRLAB_PLUGINS", raising=False)  # restored after the test
    plugin = tmp_path / "boom_plugin2.py"
    plugin.write_text(BOOM_PLUGIN.replace("boom_task", "boom_task2"))
    abl = _write(
        tmp_path / "abl.yaml",
        {
            "name": "boom_ablation",
            "base": {**BASE, "task": {"name": "boom_task2"}, "budget": {"steps": 5}},
            "variants": {
                "adam": "adam",
                "sgd": {"optimizer": {"preset": "sgd", "args": {"lr": 0.01}}},
            },
            "seeds": [0, 1],
        },
    )
    out = tmp_path / "out"
    rc = main(["ablate", str(abl), "--out", str(out), "-q", "--no-report", "--plugin", str(plugin)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "runs: 4 failed" in err
    assert err.count("boom: this task always fails") == 1
    assert "... and 3 more failed run(s)" in err
