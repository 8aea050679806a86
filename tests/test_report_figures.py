"""Figures and tables a researcher can put in a paper (issue 15): signed α, warm-up excluded
from time, line and band the same statistic, n and the band stated, λ ≡ 0 named, and one tidy
table of every run's steps."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import yaml

from qlrlab.cli import main
from qlrlab.engine.report import _curve, _new_figure, _plot_groups, summary_table


def _frame(alpha, damping=None, step_time=1e-3, warmup=0.5):
    n = len(alpha)
    steps = np.arange(1, n + 1)
    time = warmup + step_time * (steps - 1)
    df = pd.DataFrame(
        {
            "step": steps,
            "alpha": alpha,
            "damping": damping if damping is not None else np.zeros(n),
            "loss": np.linspace(1.0, 0.1, n),
            "time": time,
            "warmup_time": warmup,
        }
    )
    return pd.concat([pd.DataFrame({"step": [0], "time": [0.0], "test_loss": [2.0]}), df])


def test_alpha_panel_shows_negative_step_sizes():
    a = np.full(20, 0.5)
    a[[3, 7]] = [-55.9, -0.2]
    _fig, axes = _new_figure(1)
    info = _plot_groups(
        axes[0][0], [("hessian", [_frame(a), _frame(np.abs(a))])], "step", "alpha", scale="symlog"
    )
    ax = axes[0][0]
    assert ax.get_yscale() == "symlog"
    assert info["negative"] == 2
    drawn = np.concatenate([np.asarray(line.get_ydata(), float) for line in ax.lines])
    assert -55.9 in drawn and -0.2 in drawn  # the ▼ markers


def test_time_axis_excludes_warmup():
    f = _frame(np.ones(100), step_time=1e-3, warmup=0.4)
    x, _y = _curve(f, "time", "loss")
    assert x[0] == pytest.approx(0.0) and x[-1] == pytest.approx(0.099)
    runs = pd.DataFrame(
        {
            "task": ["t"] * 3,
            "variant": ["v"] * 3,
            "status": ["completed"] * 3,
            "train_time": [0.55, 0.42, 0.68],
            "warmup_time": [0.40, 0.27, 0.53],
            "steps": [100] * 3,
        }
    )
    t = summary_table(runs)
    assert t.loc[0, "time_excl_warmup_median"] == pytest.approx(0.15)
    assert t.loc[0, "time_excl_warmup_se"] == pytest.approx(0.0, abs=1e-12)


def test_median_line_lies_inside_its_band_on_log_axes():
    """Three seeds whose losses differ by decades: the linear median (old line) fell outside the
    log-space band; now line and band are both from log values."""
    frames = []
    for scale in (1.0, 10.0, 1000.0):
        f = _frame(np.ones(10))
        f["loss"] = f["loss"] * scale
        frames.append(f)
    frames = frames[:2]  # two seeds: the linear median is the arithmetic mean
    _fig, axes = _new_figure(1)
    info = _plot_groups(axes[0][0], [("g", frames)], "step", "loss", scale="log")
    _, line, lower, upper = info["bands"]["g"]
    assert np.all(lower <= line + 1e-12) and np.all(line <= upper + 1e-12)
    geo = np.sqrt(frames[0]["loss"].dropna().to_numpy() * frames[1]["loss"].dropna().to_numpy())
    np.testing.assert_allclose(line, geo, rtol=1e-9)
    assert "(n=2)" in axes[0][0].lines[0].get_label()


def test_lambda_panel_names_zero_damping():
    _fig, axes = _new_figure(1)
    groups = [
        ("Adam", [_frame(np.ones(5))]),
        ("LM", [_frame(np.ones(5), damping=np.full(5, 1e-3))]),
    ]
    info = _plot_groups(axes[0][0], groups, "step", "damping", scale="log")
    assert info["absent"] == ["Adam"] and info["drawn"]


@pytest.mark.slow
def test_report_captions_tables_and_tidy_metrics(tmp_path, capsys, one_thread):
    spec = {
        "name": "tidy",
        "base": {
            "task": {"name": "uci_energy", "subset": 64},
            "optimizer": "adam",
            "batch_size": 32,
            "budget": {"steps": 5},
            "eval": {"every": 2},
            "device": "cpu",
        },
        "variants": {"adam": "adam", "qlr": "adamqlr"},
        "grid": {"batch_size": [16, 32]},
        "seeds": [0, 1],
    }
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(spec))
    out = tmp_path / "out"
    assert main(["ablate", str(path), "--out", str(out), "-q", "--workers", "1"]) == 0
    rep = out / "report"
    md = (rep / "table.md").read_text()
    assert "median ± bootstrap standard error of the median over the n runs (seeds)" in md
    assert "warm-up" in md and "| n |" in md
    assert "bootstrap standard error" in (rep / "table.tex").read_text()
    captions = (rep / "captions.md").read_text()
    assert "n = 2 runs (seeds)" in captions and "warm-up" in captions
    assert "symmetric-log" in captions and "λ ≡ 0: adam" in captions
    # one call reads every step of every run, with identity and the varying settings
    tidy = pd.read_parquet(rep / "metrics.parquet")
    for col in ("hash", "task", "variant", "seed", "batch_size", "step", "time", "loss"):
        assert col in tidy, col
    assert "optimizer.damping.name" in tidy  # differs between adam and adamqlr
    assert "budget.steps" not in tidy  # the same everywhere
    index = json.loads((out / "index.json").read_text())["entries"]
    assert tidy["hash"].nunique() == len(index) == 8
    for e in index:
        own = pd.read_parquet(out / "runs" / e["hash"] / "metrics.parquet")
        part = tidy[tidy["hash"] == e["hash"]][list(own.columns)].reset_index(drop=True)
        pd.testing.assert_frame_equal(part, own, check_dtype=False)
        mine = tidy[tidy["hash"] == e["hash"]]
        assert set(mine["seed"]) == {e["labels"]["seed"]}
        assert set(mine["variant"]) == {e["labels"]["variant"]}
    assert math.isfinite(float(tidy["warmup_time"].dropna().iloc[0]))
    # the paper's FinalLosses columns: train accuracy (classification only), generalisation gap
    # = final test loss - final train loss, and wall time
    assert "gen. gap" in md and "wall time (s)" in md
    table = pd.read_csv(rep / "table.csv")
    runs = pd.read_csv(rep / "runs.csv")
    for _, row in table.iterrows():
        mine = runs[(runs["variant"] == row["variant"]) & (runs["grid"] == row["grid"])]
        gaps = mine["final_test_loss"] - mine["final_train_loss"]
        assert row["generalisation_gap_median"] == pytest.approx(float(np.median(gaps)))
    # a subset of the variants, in the order asked, in a report of its own beside the full one
    assert main(["report", str(out), "--variants", "qlr", "--name", "report-qlr"]) == 0
    sub = pd.read_csv(out / "report-qlr" / "table.csv")
    assert set(sub["variant"]) == {"qlr"} and len(sub) == 2
    assert (rep / "table.md").read_text() == md  # the full report is untouched
    capsys.readouterr()
    assert main(["report", str(out), "--variants", "qlr", "sgd"]) == 2
    err = capsys.readouterr().err
    assert "--variants" in err and "'sgd'" in err and "Traceback" not in err


def test_every_group_of_a_large_suite_is_drawn_distinctly():
    """The paper's Fashion-MNIST suite has 13 variants: with matplotlib's 10-colour cycle two
    of them were drawn alike (same colour, same line)."""
    groups = [(f"v{i}", [_frame(np.full(10, 0.5))]) for i in range(13)]
    _fig, axes = _new_figure(1)
    _plot_groups(axes[0][0], groups, "step", "loss", scale="log")
    lines = [ln for ln in axes[0][0].lines if ln.get_label().startswith("v")]
    assert len(lines) == 13
    looks = {(str(ln.get_color()), ln.get_linestyle()) for ln in lines}
    assert len(looks) == 13
