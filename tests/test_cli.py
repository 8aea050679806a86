"""The ``qlrlab`` command line end to end: ablation, report, determinism, resume after a kill,
divergence, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from qlrlab.cli import main
from qlrlab.engine.runner import execute_run
from qlrlab.engine.specs import RunSpec
from qlrlab.engine.storage import RunStore

ROOT = Path(__file__).resolve().parents[1]

ABLATION = {
    "name": "tiny",
    "base": {
        "task": {"name": "uci_energy", "subset": 96},
        "optimizer": "adamqlr",
        "batch_size": 32,
        "budget": {"steps": 8},
        "eval": {"every": 4},
        "device": "cpu",
    },
    "variants": {"adam": "adam", "adamqlr": {"optimizer": "adamqlr"}},
    "seeds": [0, 1],
}


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _load_runs(out: Path) -> dict[tuple, dict]:
    index = json.loads((out / "index.json").read_text())
    runs = {}
    for e in index["entries"]:
        lab = e["labels"]
        summary = json.loads((out / "runs" / e["hash"] / "summary.json").read_text())
        runs[(lab["variant"], lab["seed"])] = {"hash": e["hash"], **summary}
    return runs


@pytest.mark.slow
def test_ablation_end_to_end_and_deterministic(tmp_path, capsys):
    spec = _write(tmp_path / "abl.yaml", ABLATION)
    out = tmp_path / "out"
    assert main(["ablate", str(spec), "--out", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "table.md" in printed and "curves_uci_energy.png" in printed
    runs = _load_runs(out)
    assert set(runs) == {("adam", 0), ("adam", 1), ("adamqlr", 0), ("adamqlr", 1)}
    assert all(r["status"] == "completed" and r["steps"] == 8 for r in runs.values())
    # the per-step metrics hold what the summary says
    for r in runs.values():
        df = pd.read_parquet(out / "runs" / r["hash"] / "metrics.parquet")
        assert list(df["step"]) == list(range(9))
        assert df["test_loss"].iloc[-1] == pytest.approx(r["final_test_loss"])
    # the table holds the median over seeds of what the runs logged
    table = pd.read_csv(out / "report" / "table.csv")
    for variant in ("adam", "adamqlr"):
        row = table[table["variant"] == variant].iloc[0]
        vals = [runs[(variant, s)]["final_test_loss"] for s in (0, 1)]
        assert row["final_test_loss_median"] == pytest.approx(sum(vals) / 2)
        assert row["n"] == 2
    md = (out / "report" / "table.md").read_text()
    assert "adamqlr" in md and "±" in md
    assert r"\pm" in (out / "report" / "table.tex").read_text()
    for stem in ("curves_uci_energy", "trajectories_uci_energy"):
        for ext in ("png", "pdf"):
            assert (out / "report" / f"{stem}.{ext}").stat().st_size > 1000
    # same seed, same numbers: a second invocation elsewhere reproduces every loss
    out2 = tmp_path / "out2"
    assert main(["ablate", str(spec), "--out", str(out2), "-q", "--no-report"]) == 0
    runs2 = _load_runs(out2)
    for key, r in runs.items():
        assert runs2[key]["hash"] == r["hash"]
        a = pd.read_parquet(out / "runs" / r["hash"] / "metrics.parquet")
        b = pd.read_parquet(out2 / "runs" / r["hash"] / "metrics.parquet")
        cols = ["loss", "alpha", "val_loss", "test_loss"]
        pd.testing.assert_frame_equal(a[cols], b[cols])
    # different seeds differ
    assert runs[("adam", 0)]["final_test_loss"] != runs[("adam", 1)]["final_test_loss"]
    # a second invocation into the same directory needs --resume (which then skips everything)
    assert main(["ablate", str(spec), "--out", str(out), "-q", "--no-report"]) == 2
    assert main(["ablate", str(spec), "--out", str(out), "-q", "--resume"]) == 0
    assert len(json.loads((out / "index.json").read_text())["entries"]) == 4
    assert main(["report", str(out)]) == 0


def test_divergent_run_does_not_stop_ablation(tmp_path):
    data = json.loads(json.dumps(ABLATION))
    data["variants"] = {
        "sgd_huge": {"optimizer": {"preset": "sgd", "args": {"lr": 1e5}}},
        "adam": "adam",
    }
    data["seeds"] = [0]
    data["base"]["budget"] = {"steps": 30}
    spec = _write(tmp_path / "abl.yaml", data)
    out = tmp_path / "out"
    assert main(["ablate", str(spec), "--out", str(out), "-q"]) == 0
    runs = _load_runs(out)
    assert runs[("sgd_huge", 0)]["status"] == "diverged"
    assert runs[("sgd_huge", 0)]["final_test_loss"] is not None
    assert runs[("adam", 0)]["status"] == "completed" and runs[("adam", 0)]["steps"] == 30
    assert "1 div." in (out / "report" / "table.md").read_text()


def test_single_run_command(tmp_path):
    run = _write(tmp_path / "run.yaml", {**ABLATION["base"], "name": "one"})
    out = tmp_path / "out"
    assert (
        main(["run", str(run), "--out", str(out), "-q", "--set", "budget.steps=3", "--no-report"])
        == 0
    )
    (entry,) = json.loads((out / "index.json").read_text())["entries"]
    summary = json.loads((out / "runs" / entry["hash"] / "summary.json").read_text())
    assert summary["steps"] == 3
    rec = json.loads((out / "runs" / entry["hash"] / "spec.json").read_text())
    assert rec["spec"]["budget"]["steps"] == 3 and rec["spec"]["optimizer"]["damping"]


@pytest.mark.parametrize(
    ("yaml_text", "args", "expected"),
    [
        ("base:\n  task: {name: uci_energy\n  optimizer: adam\n", [], ["abl.yaml:3", "line 2"]),
        (None, ["--set", "base.optimizer.direction.bta1=0.5"], ["bta1", "variant 'adam'", "beta1"]),
        (None, ["--set", "base.batch_size=abc"], ["batch_size", "valid integer"]),
        (
            None,
            [
                "--set",
                "base.task.name=uci_protein",
                "--set",
                "base.task.download=false",
                "--set",
                "base.task.data_dir=NODATA",
            ],
            ["data.txt", "download"],
        ),
        (None, ["--set", "sedes=[1]"], ["sedes", "seeds"]),
    ],
    ids=["malformed-yaml", "unknown-key", "type-error", "missing-data", "unknown-top-key"],
)
def test_bad_input_fails_before_any_run(tmp_path, capsys, yaml_text, args, expected):
    path = tmp_path / "abl.yaml"
    if yaml_text is None:
        _write(path, ABLATION)
    else:
        path.write_text(yaml_text)
    args = [a.replace("NODATA", str(tmp_path / "nodata")) for a in args]
    out = tmp_path / "out"
    assert main(["ablate", str(path), "--out", str(out), "-q", *args]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, (text, err)
    assert "fix:" in err
    assert not (out / "runs").exists()


def test_listing_commands_and_help(capsys):
    assert main(["presets"]) == 0
    assert "adamqlr_hessian" in capsys.readouterr().out
    assert main(["tasks"]) == 0
    assert "uci_energy" in capsys.readouterr().out
    assert main(["schema", "ablation"]) == 0
    assert "variants" in json.loads(capsys.readouterr().out)["properties"]
    for cmd in ([], ["run"], ["ablate"], ["tune"], ["report"], ["schema"]):
        with pytest.raises(SystemExit) as exc:
            main([*cmd, "--help"])
        assert exc.value.code == 0
    capsys.readouterr()
    assert main(["report", "/nonexistent/dir"]) == 2


def _wait_for(pred, timeout: float, proc: subprocess.Popen) -> None:
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


@pytest.mark.slow
def test_killed_ablation_resumes_every_run_exactly_once_in_workers(tmp_path):
    steps = 300
    data = json.loads(json.dumps(ABLATION))
    data["variants"] = {
        "adam": "adam",
        "sgd": {"optimizer": {"preset": "sgd", "args": {"lr": 0.01}}},
    }
    data["base"].update(budget={"steps": steps}, eval={"every": 50}, checkpoint_every=10)
    spec = _write(tmp_path / "abl.yaml", data)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qlrlab.cli", "ablate", str(spec), "--out", str(out), "-q",
           "--no-report"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def summaries() -> list[Path]:
        return list(out.glob("runs/*/summary.json"))

    def partial_with_checkpoint() -> bool:
        return any(
            not (p.parent / "summary.json").exists() for p in out.glob("runs/*/checkpoint.pt")
        )

    # SIGKILL once at least one run has finished and another one is part-way (checkpointed)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for(lambda: len(summaries()) >= 1 and partial_with_checkpoint(), 60, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    n_before = len(summaries())
    assert 1 <= n_before < 4
    # resume to the end, in 2 spawned worker processes
    done = subprocess.run(
        [*cmd, "--resume", "--workers", "2"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert f"{n_before} skipped" in done.stderr
    index = json.loads((out / "index.json").read_text())
    assert len(index["entries"]) == 4 and len({e["hash"] for e in index["entries"]}) == 4
    assert len(summaries()) == 4
    for e in index["entries"]:
        rdir = out / "runs" / e["hash"]
        summary = json.loads((rdir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == steps
        df = pd.read_parquet(rdir / "metrics.parquet")
        assert list(df["step"]) == list(range(steps + 1))  # every row once, none lost
        assert not (rdir / "checkpoint.pt").exists()
    # interrupted-and-resumed runs, in worker processes, give the numbers of uninterrupted
    # in-process ones
    torch.set_num_threads(1)
    for e in index["entries"]:
        rec = json.loads((out / "runs" / e["hash"] / "spec.json").read_text())
        fresh = execute_run(RunSpec.model_validate(rec["spec"]), RunStore(tmp_path / "fresh"))
        a = RunStore(tmp_path / "fresh").metrics(fresh.hash)
        b = RunStore(out).metrics(e["hash"])
        pd.testing.assert_frame_equal(a[["loss", "val_loss"]], b[["loss", "val_loss"]])


EXAMPLES = [
    p
    for pattern in ("*.yaml", "paper/*.yaml", "tuning/*.yaml")
    for p in sorted((ROOT / "examples").glob(pattern))
]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(ROOT / "examples")))
def test_examples_are_valid(path, capsys):
    data = yaml.safe_load(path.read_text())
    if "space" in data:
        cmd = "tune"
    elif "base" in data:
        cmd = "ablate"
    else:
        from qlrlab.engine.specs import resolve_run

        resolve_run(path)
        return
    assert main([cmd, str(path), "--dry-run"]) == 0, capsys.readouterr().err
