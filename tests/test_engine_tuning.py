"""Tuning: Optuna study with ASHA pruning, resume from SQLite (including a stale trial), repeats
of the best configuration; a tiny Ray Tune study on a local Ray instance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qlrlab.cli import main
from qlrlab.engine.specs import SpecError, TuneSpec
from qlrlab.engine.tuning import run_tune

TUNE = {
    "name": "tiny_study",
    "base": {
        "task": {"name": "uci_energy", "subset": 96},
        "optimizer": "adam",
        "batch_size": 32,
        "budget": {"steps": 12},
        "device": "cpu",
    },
    "space": {
        "optimizer.step_size.lr": {"type": "log_uniform", "low": 1e-4, "high": 0.3},
        "1-optimizer.direction.beta1": {"type": "log_uniform", "low": 1e-3, "high": 0.3},
    },
    "metric": "val_loss",
    "scope": "last",
    "n_trials": 3,
    "scheduler": {"type": "asha", "resource": "steps", "min_resource": 3, "reduction_factor": 2},
    "trial_overrides": {"eval.every": 3},
    "repeats": 2,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _study(out: Path):
    import optuna

    return optuna.load_study(study_name="tiny_study", storage=f"sqlite:///{out / 'optuna.db'}")


def test_optuna_study_resumes_from_sqlite(tmp_path):
    import optuna
    from optuna.trial import TrialState

    spec = _write(tmp_path / "tune.yaml", TUNE)
    out = tmp_path / "out"
    assert main(["tune", str(spec), "--out", str(out), "-q", "--no-report"]) == 0
    study = _study(out)
    assert len(study.trials) == 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    best = json.loads((out / "best.json").read_text())
    beta1 = best["overrides"]["optimizer.direction.beta1"]
    assert 0.7 <= beta1 <= 0.999  # the 1-β idiom was applied
    # a trial left RUNNING by a killed process
    stale = study.ask()
    stale.suggest_float("optimizer.step_size.lr", 1e-4, 0.3, log=True)
    stale.suggest_float("1-optimizer.direction.beta1", 1e-3, 0.3, log=True)
    stale_params = dict(stale.params)
    # resume with a larger budget of trials: only the missing ones run
    assert (
        main(["tune", str(spec), "--out", str(out), "-q", "--resume", "--set", "n_trials=5"]) == 0
    )
    study = _study(out)
    states = [t.state for t in study.trials]
    assert TrialState.FAIL not in states and TrialState.RUNNING not in states
    assert len(study.trials) == 5  # the stale one was continued, as itself, with its params
    assert study.trials[stale.number].params == stale_params
    assert study.trials[stale.number].state in (TrialState.COMPLETE, TrialState.PRUNED)
    # repeats of the best configuration, stored once each, reported
    index = json.loads((out / "index.json").read_text())
    repeats = [e for e in index["entries"] if e["labels"]["kind"] == "repeat"]
    assert len({e["hash"] for e in repeats}) == 2
    for e in repeats:
        summary = json.loads((out / "runs" / e["hash"] / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 12
    table = (out / "report" / "table.md").read_text()
    assert "best" in table and "trial" not in table
    assert (out / "report" / "best_hyperparameters.md").exists()
    assert isinstance(study.pruner, optuna.pruners.BasePruner)


def test_asha_prunes_bad_trials(tmp_path):
    data = json.loads(json.dumps(TUNE))
    data.update(n_trials=8, repeats=0)
    data["space"] = {"optimizer.step_size.lr": {"type": "log_uniform", "low": 1e-6, "high": 0.1}}
    res = run_tune(TuneSpec.model_validate(data), tmp_path / "out", quiet=True)
    assert res.n_trials == 8 and res.best_params
    from optuna.trial import TrialState

    states = [t.state for t in _study(tmp_path / "out").trials]
    assert TrialState.PRUNED in states


def test_tune_spec_errors_before_running(tmp_path):
    data = json.loads(json.dumps(TUNE))
    data["space"] = {"optimizer.step_size.lrr": {"type": "log_uniform", "low": 1e-4, "high": 1}}
    with pytest.raises(SpecError, match="lrr"):
        run_tune(TuneSpec.model_validate(data), tmp_path / "a")
    data = json.loads(json.dumps(TUNE))
    data["space"]["optimizer.step_size.lr"]["low"] = 0.0
    with pytest.raises(SpecError, match="low > 0"):
        run_tune(TuneSpec.model_validate(data), tmp_path / "b")
    data = json.loads(json.dumps(TUNE))
    data["trial_overrides"] = {}
    with pytest.raises(SpecError, match=r"eval\.every"):
        run_tune(TuneSpec.model_validate(data), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


@pytest.mark.slow
def test_ray_backend_tiny_study(tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.tune")
    data = json.loads(json.dumps(TUNE))
    data.update(n_trials=2, repeats=1)
    data["base"]["budget"] = {"steps": 6}
    spec = _write(tmp_path / "tune.yaml", data)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        out = tmp_path / "out"
        rc = main(["tune", str(spec), "--out", str(out), "-q", "--backend", "ray", "--no-report"])
        assert rc == 0
    finally:
        ray.shutdown()
    best = json.loads((out / "best.json").read_text())
    assert best["n_trials"] == 2 and best["value"] is not None
    index = json.loads((out / "index.json").read_text())
    kinds = [e["labels"]["kind"] for e in index["entries"]]
    assert kinds.count("trial") == 2 and kinds.count("repeat") == 1


def test_repeats_of_an_earlier_best_are_superseded_not_mixed_in(tmp_path):
    """A study resumed with more trials may find a new best: the repeats of the earlier best stay
    on disk and in the index as ``kind: superseded``, and the report's "best" holds the current
    best's repeats only (before: both sets, two configurations under one label). Also: a second
    study in the same process may use the folder (``run_tune`` releases its lock)."""
    spec = _write(tmp_path / "tune.yaml", {**TUNE, "n_trials": 2, "scheduler": {"type": "none"}})
    out = tmp_path / "out"
    assert main(["tune", str(spec), "--out", str(out), "-q", "--no-report"]) == 0
    index = json.loads((out / "index.json").read_text())
    current = {e["hash"] for e in index["entries"] if e["labels"]["kind"] == "repeat"}
    assert len(current) == 2
    # an earlier best's repeat, as a resumed study whose best changed leaves it
    earlier = {"hash": "0123456789abcdef", "labels": {"task": "uci_energy", "seed": 0,
                                                     "kind": "repeat", "variant": "best"}}
    index["entries"].append(earlier)
    (out / "index.json").write_text(json.dumps(index))
    assert main(["tune", str(spec), "--out", str(out), "-q", "--resume"]) == 0
    index = json.loads((out / "index.json").read_text())
    kinds = {e["hash"]: e["labels"]["kind"] for e in index["entries"]}
    assert {h for h, k in kinds.items() if k == "repeat"} == current
    assert kinds[earlier["hash"]] == "superseded"
    from qlrlab.engine import collect_runs

    runs = collect_runs(out)  # what the report draws: the current best's two repeats
    assert sorted(runs["hash"]) == sorted(current)
