"""One run: budgets, logging, checkpoint/resume exactness, divergence, report statistics."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from qlrlab.engine.report import bootstrap_se, build_report, summary_table
from qlrlab.engine.runner import RunInterrupted, execute_run, run_safely
from qlrlab.engine.specs import RunSpec, run_hash
from qlrlab.engine.storage import RunStore, confined, load_checkpoint

BASE = {
    "task": {"name": "uci_energy", "subset": 128},
    "optimizer": "adamqlr",
    "batch_size": 32,
    "budget": {"steps": 12},
    "eval": {"every": 4},
    "device": "cpu",
    "seed": 3,
}


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, **over):
    spec = RunSpec.model_validate({**BASE, **over})
    store = RunStore(tmp_path)
    return spec, store, execute_run(spec, store)


def test_run_logs_every_step_and_evaluations(tmp_path):
    _, store, res = _run(tmp_path)
    assert res.status == "completed" and res.summary["steps"] == 12
    df = store.metrics(res.hash)
    assert list(df["step"]) == list(range(13))  # step 0 = initial evaluation
    for col in (
        "loss",
        "alpha",
        "damping",
        "rho",
        "grad_dot_direction",
        "curvature",
        "predicted_change",
        "actual_change",
        "grad_norm",
        "direction_norm",
        "time",
        "wall_time",
    ):
        assert col in df, col
    evaluated = df[df["val_loss"].notna()]["step"].tolist()
    assert evaluated == [0, 4, 8, 12]
    assert df["train_loss"].notna().sum() == 1  # final_splits adds the full train loss at the end
    assert res.summary["final_test_loss"] == pytest.approx(df["test_loss"].iloc[-1])
    assert (df["time"].diff().dropna() >= 0).all()
    # training time excludes evaluation: never more than wall time
    assert (df["time"] <= df["wall_time"] + 1e-9).all()
    rec = (store.run_dir(res.hash) / "spec.json").read_text()
    assert "git_revision" in rec and "torch" in rec and '"seed": 3' in rec


def test_eval_every_seconds_is_a_training_time_cadence(tmp_path):
    """``eval.every_seconds`` evaluates once that much training time has passed since the last
    evaluation, whatever the step count: a tiny interval evaluates after every step, a huge one
    only at the start and the end; it combines with ``every`` (either one triggers)."""
    _, store, res = _run(tmp_path / "tiny", eval={"every_seconds": 1e-12})
    df = store.metrics(res.hash)
    assert df[df["val_loss"].notna()]["step"].tolist() == list(range(13))
    _, store, res = _run(tmp_path / "huge", eval={"every_seconds": 1e6})
    df = store.metrics(res.hash)
    assert df[df["val_loss"].notna()]["step"].tolist() == [0, 12]
    _, store, res = _run(tmp_path / "both", eval={"every": 5, "every_seconds": 1e6})
    df = store.metrics(res.hash)
    assert df[df["val_loss"].notna()]["step"].tolist() == [0, 5, 10, 12]


def test_epoch_budget_and_whichever_first(tmp_path):
    # 128 examples / 32 = 4 steps per epoch; 1.5 epochs = 6 steps < 12 steps
    _, _, res = _run(tmp_path, budget={"steps": 12, "epochs": 1.5})
    assert res.summary["steps"] == 6 and res.summary["stop_reason"] == "steps"
    _, _, res = _run(tmp_path / "b", budget={"seconds": 1e-9, "steps": 50})
    assert res.summary["steps"] <= 1 and res.summary["stop_reason"] == "seconds"


def test_checkpoint_resume_reproduces_uninterrupted_run(tmp_path):
    spec = RunSpec.model_validate({**BASE, "budget": {"steps": 11}, "checkpoint_every": 3})
    full = execute_run(spec, RunStore(tmp_path / "full"))
    store = RunStore(tmp_path / "split")
    with pytest.raises(RunInterrupted):
        execute_run(spec, store, stop_after=7)
    ckpt = load_checkpoint(store.run_dir(run_hash(spec)) / "checkpoint.pt")
    assert ckpt is not None and ckpt["step"] == 7
    resumed = execute_run(spec, store)
    a = RunStore(tmp_path / "full").metrics(full.hash)
    b = store.metrics(resumed.hash)
    assert list(b["step"]) == list(range(12))  # no lost or duplicated rows
    cols = ["loss", "alpha", "damping", "val_loss", "test_loss"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert not (store.run_dir(resumed.hash) / "checkpoint.pt").exists()


def test_sigterm_checkpoints_and_resumes(tmp_path):
    import os
    import signal

    spec = RunSpec.model_validate({**BASE, "budget": {"steps": 10}, "eval": {"every": 2}})
    store = RunStore(tmp_path)

    def terminate_at_step_4(step, seconds, metrics):
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)
        return False

    with pytest.raises(RunInterrupted):
        execute_run(spec, store, reporter=terminate_at_step_4)
    ckpt = load_checkpoint(store.run_dir(run_hash(spec)) / "checkpoint.pt")
    assert ckpt is not None and ckpt["step"] == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    res = execute_run(spec, store)
    assert res.status == "completed"
    assert list(store.metrics(res.hash)["step"]) == list(range(11))


def test_divergent_run_recorded_with_last_finite_metrics(tmp_path):
    spec = RunSpec.model_validate(
        {**BASE, "optimizer": {"preset": "sgd", "args": {"lr": 1e5}}, "budget": {"steps": 50}}
    )
    store = RunStore(tmp_path)
    res = run_safely(spec, store)
    assert res.status == "diverged"
    s = res.summary
    assert s["steps"] < 50 and s["diverged_at_step"] == s["steps"]
    assert math.isfinite(s["final_batch_loss"]) and math.isfinite(s["final_test_loss"])
    df = store.metrics(res.hash)
    last = df.iloc[-1][["loss", "val_loss", "test_loss"]].astype(float)
    assert not np.isfinite(last.to_numpy()).all()  # the run stopped at the non-finite loss


def test_bootstrap_se_properties():
    assert math.isnan(bootstrap_se([]))
    assert bootstrap_se([1.0]) == 0.0
    assert bootstrap_se([2.0, 2.0, 2.0]) == 0.0
    x = np.random.default_rng(0).normal(size=40)
    assert 0.05 < bootstrap_se(x) < 0.5
    assert bootstrap_se(x) == bootstrap_se(x)  # reproducible
    assert bootstrap_se([1.0, float("nan"), 3.0]) == bootstrap_se([1.0, 3.0])


def test_summary_table_median():
    df = pd.DataFrame(
        {
            "task": ["t"] * 3,
            "variant": ["v"] * 3,
            "status": ["completed", "completed", "diverged"],
            "final_train_loss": [1.0, 2.0, 10.0],
            "final_test_loss": [1.0, 1.0, 1.0],
            "final_test_accuracy": [None] * 3,
            "steps": [5, 5, 2],
            "train_time": [1.0, 1.0, 1.0],
        }
    )
    t = summary_table(df)
    assert t.loc[0, "final_train_loss_median"] == 2.0 and t.loc[0, "diverged"] == 1
    assert t.loc[0, "n"] == 3


def test_report_requires_index_and_confines_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_report(tmp_path)
    with pytest.raises(ValueError, match="escapes"):
        confined(tmp_path, "..", "elsewhere")
    with pytest.raises(ValueError):
        RunStore(tmp_path).run_dir("../x")


def test_tensorboard_logs_what_the_metrics_file_holds(tmp_path):
    """tensorboard: true writes every logged scalar (train loss, α, λ, ρ, evaluations) at its
    step; the flag is not part of the run's identity."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec, store, res = _run(tmp_path, tensorboard=True)
    assert run_hash(spec) == run_hash(RunSpec.model_validate(BASE))
    df = store.metrics(res.hash)
    (event_dir,) = list(tmp_path.glob("runs/*/tensorboard"))
    acc = EventAccumulator(str(event_dir))
    acc.Reload()
    for tag in ("loss", "alpha", "damping", "rho", "test_loss", "val_loss"):
        events = acc.Scalars(tag)
        logged = df[["step", tag]].dropna()
        assert [e.step for e in events] == logged["step"].tolist(), tag
        np.testing.assert_allclose([e.value for e in events], logged[tag], rtol=1e-6)


def test_nan_padding_scales_the_first_steps_curvature(tmp_path):
    """UCI Energy (128 rows) at batch size 200: the original pads the one batch with 72 NaN rows,
    so ½·MSE's quadratic model is 128/200 of the correct one; the batch loss is the same."""
    over = {"batch_size": 200, "budget": {"steps": 1}, "dtype": "float64", "eval": {"every": None}}
    _, store, plain = _run(tmp_path / "plain", **over)
    _, store_p, padded = _run(tmp_path / "padded", nan_padding=True, **over)
    assert padded.hash != plain.hash
    a, b = store.metrics(plain.hash).iloc[1], store_p.metrics(padded.hash).iloc[1]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-12)
    assert b["grad_dot_direction"] == pytest.approx(a["grad_dot_direction"], rel=1e-12)
    assert b["curvature"] == pytest.approx(a["curvature"] * 128 / 200, rel=1e-10)
    assert b["alpha"] > a["alpha"]
