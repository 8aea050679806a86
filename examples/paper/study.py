"""The paper's fixed-epoch study at CPU scale: tune every tuned optimiser, then write the suites.

Clarke & Hernández-Lobato (2024) tune each (task, optimiser) by 200 random samples under ASHA on
wall-clock time (grace 1 s, reduction factor 4, trials capped at 900 s, best trial by its last
validation loss) and re-run the best configuration 50 times. This script runs the same protocol
with ``qlrlab tune`` at the reduced scale of :data:`SCALE` (trials, time caps, evaluation cadence)
so that all four CPU tasks fit a few hours of a 2-core machine, then writes the tuned values into
``examples/paper/<task>.yaml`` with a comment naming the study that produced them.

Usage (from the repository root)::

    python examples/paper/study.py specs            # write examples/paper/tuning/<task>/<v>.yaml
    python examples/paper/study.py tune --jobs 2    # run the studies (resumable; skips finished)
    python examples/paper/study.py apply            # tuned values -> examples/paper/<task>.yaml
    qlrlab ablate examples/paper/<task>.yaml --workers 2 && qlrlab report results/paper/<task>
    python examples/paper/study.py figures          # reports -> docs/reproduction/ (PNG, tables)

``tune`` runs ``qlrlab tune SPEC --resume`` for each study (``--jobs`` at once, one torch thread
each) and keeps every study's output in ``results/paper-study/tuning/<task>/<variant>``;
``apply`` copies each ``best.json`` into ``examples/paper/tuning/<task>/<variant>.best.json`` (the
committed record) and rewrites the task's suite from it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "examples" / "paper"
RESULTS = Path("results/paper-study/tuning")

BATCH_SIZES = [50, 100, 200, 400, 800, 1600, 3200]


def log_u(low: float, high: float) -> dict[str, Any]:
    return {"type": "log_uniform", "low": low, "high": high}


#: paper §4.1: label -> (preset, search space besides the batch size)
TUNED: dict[str, tuple[str, dict[str, Any]]] = {
    "SGD Minimal": ("sgd_minimal", {"optimizer.step_size.lr": log_u(1e-6, 1e-1)}),
    "SGD Full": (
        "sgd_full",
        {
            "optimizer.step_size.lr": log_u(1e-6, 1e-1),
            "1-optimizer.direction.momentum": log_u(1e-4, 0.3),
            "optimizer.direction.weight_decay": log_u(1e-10, 1.0),
        },
    ),
    "Adam": ("adam", {"optimizer.step_size.lr": log_u(1e-6, 1.0)}),
    "Adam (Tuned eps)": (
        "adam_tuned_eps",
        {"optimizer.step_size.lr": log_u(1e-6, 1.0), "optimizer.direction.eps": log_u(1e-8, 1.0)},
    ),
    "K-FAC": ("kfac", {"optimizer.damping.initial": log_u(1e-8, 1.0)}),
    "K-FAC (Unadaptive)": (
        "kfac_unadaptive",
        {
            "optimizer.step_size.lr": log_u(1e-6, 1.0),
            "1-optimizer.step_size.momentum": log_u(1e-4, 0.3),
            "optimizer.damping.value": log_u(1e-8, 1.0),
        },
    ),
    "Baydin SGD": (
        "baydin_sgd",
        {"optimizer.step_size.lr": log_u(1e-6, 1.0), "optimizer.step_size.beta": log_u(1e-6, 1.0)},
    ),
    "AdamQLR (Tuned)": (
        "adamqlr",
        {
            "optimizer.damping.initial": log_u(1e-8, 1.0),
            "optimizer.damping.decrease": log_u(0.5, 1.0),
            "optimizer.damping.increase": log_u(1.0, 4.0),
        },
    ),
    # the damping ablation (paper §4.2): only the batch size is tuned
    "AdamQLR (Undamped)": ("adamqlr_undamped", {}),
    # paper §4.2, Rosenbrock: AdamQLR with the exact Hessian, tuned as AdamQLR (Tuned)
    "AdamQLR (Hessian, Tuned)": (
        "adamqlr_hessian",
        {
            "optimizer.damping.initial": log_u(1e-8, 1.0),
            "optimizer.damping.decrease": log_u(0.5, 1.0),
            "optimizer.damping.increase": log_u(1.0, 4.0),
        },
    ),
}

MAIN = [
    "SGD Minimal",
    "SGD Full",
    "Adam",
    "Adam (Tuned eps)",
    "K-FAC",
    "K-FAC (Unadaptive)",
    "Baydin SGD",
    "AdamQLR (Tuned)",
]

#: the reduced scale of this study (the paper: 200 trials, 900 s caps, 50 repeats, evaluation
#: after every step)
SCALE: dict[str, dict[str, Any]] = {
    "rosenbrock": {
        "tuned": ["SGD Minimal", "SGD Full", "Adam", "K-FAC", "AdamQLR (Hessian, Tuned)"],
        "n_trials": 100,
        "cap": 10.0,
        "budget": {"steps": 200},
        "batch": 1,
        "eval": {"every": 1, "splits": ["train"]},
        "metric": "train_loss",
        "trial_task": {"start": "normal"},
    },
    "uci_energy": {
        "tuned": MAIN,
        "n_trials": 50,
        "cap": 10.0,
        "budget": {"epochs": 4000},
        "suite_budget": {"epochs": 1000},  # the repeats: 1000 epochs (CPU time; the paper: 4000)
        "batch": 588,
        "eval": {"every_seconds": 0.25, "splits": ["val"]},
        "metric": "val_loss",
    },
    "uci_protein": {
        "tuned": MAIN,
        "n_trials": 20,  # 50 elsewhere: the session ran short of CPU time
        "cap": 16.0,
        "budget": {"epochs": 20},  # the paper: 200 epochs (see the suite's header)
        "suite_budget": {"epochs": 5},  # the repeats: 5 epochs (CPU time; the paper: 200)
        "batch": 1000,
        "eval": {"every_seconds": 0.5, "splits": ["val"]},
        "metric": "val_loss",
    },
    "fashion_mnist": {
        "tuned": [*MAIN, "AdamQLR (Undamped)"],
        "n_trials": 50,
        "cap": 16.0,
        "budget": {"epochs": 10},
        "batch": 50,
        "eval": {"every_seconds": 0.5, "splits": ["val"]},
        "metric": "val_loss",
    },
}


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def spec_path(task: str, label: str) -> Path:
    return HERE / "tuning" / task / f"{slug(label)}.yaml"


def tune_spec(task: str, label: str) -> dict[str, Any]:
    s = SCALE[task]
    preset, space = TUNED[label]
    space = dict(space)
    if task != "rosenbrock":
        space["batch_size"] = {"type": "choice", "choices": BATCH_SIZES}
    if not space:
        raise ValueError(f"{label}: nothing to tune on {task}")
    trial_overrides: dict[str, Any] = {
        "budget.seconds": s["cap"],
        "budget.count_eval_time": True,
    }
    for k, v in s.get("trial_task", {}).items():
        trial_overrides[f"task.{k}"] = v
    return {
        "name": f"{task}_{slug(label)}",
        "output_dir": str(RESULTS / task / slug(label)),
        "base": {
            "task": {"name": task},
            "optimizer": preset,
            "batch_size": s["batch"],
            "budget": s["budget"],
            "eval": s["eval"],
            "device": "cpu",
        },
        "space": space,
        "metric": s["metric"],
        "scope": "last",
        "n_trials": s["n_trials"],
        "sampler": "random",
        # a seed of the study's own: studies with the same search space draw different samples
        "sampler_seed": zlib.crc32(f"{task}/{label}".encode()) % 2**31,
        "scheduler": {
            "type": "asha",
            "resource": "seconds",
            "min_resource": 1,
            "reduction_factor": 4,
            "max_resource": s["cap"],
        },
        "trial_overrides": trial_overrides,
        "repeats": 0,
    }


def studies(tasks: list[str]) -> list[tuple[str, str]]:
    return [(t, label) for t in tasks for label in SCALE[t]["tuned"]]


def write_specs(tasks: list[str]) -> None:
    for task, label in studies(tasks):
        p = spec_path(task, label)
        p.parent.mkdir(parents=True, exist_ok=True)
        s = SCALE[task]
        head = (
            f"# {label} on {task}: the paper's tuning protocol (section 3.4) at this study's "
            f"reduced scale:\n# {s['n_trials']} random trials, ASHA on training seconds (grace "
            f"1 s, reduction factor 4), trials capped at {s['cap']:g} s\n# including "
            f"evaluation; best trial by its last {s['metric']}. Written by "
            "`python examples/paper/study.py specs`.\n#\n#   qlrlab tune "
            + str(p.relative_to(ROOT))
            + "\n"
        )
        p.write_text(head + yaml.safe_dump(tune_spec(task, label), sort_keys=False))
    print(f"wrote {len(studies(tasks))} tuning specs under {HERE / 'tuning'}")


def run_one(task: str, label: str) -> tuple[str, str, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "qlrlab", "tune", str(spec_path(task, label)), "--resume", "-q"]
    cmd += ["--no-report"]
    log = ROOT / RESULTS / task / f"{slug(label)}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env)
    print(f"[{rc}] {task} / {label}", flush=True)
    return task, label, rc


def tune(tasks: list[str], jobs: int) -> int:
    def done(task: str, label: str) -> bool:  # finished with at least SCALE's trial count
        p = ROOT / RESULTS / task / slug(label) / "best.json"
        return p.exists() and json.loads(p.read_text())["n_trials"] >= SCALE[task]["n_trials"]

    todo = [(t, v) for t, v in studies(tasks) if not done(t, v)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda tv: run_one(*tv), todo))
    return max([rc for *_, rc in results], default=0)


def export_trials(task: str, label: str) -> None:
    """Every trial of a study (state, value, parameters, seconds) as a small CSV beside its
    tuning file (the Optuna storage itself is 0.3-1 MB per study, so it stays in results/)."""
    db = ROOT / RESULTS / task / slug(label) / "optuna.db"
    if not db.exists():
        return
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=None, storage=f"sqlite:///{db}")
    df = study.trials_dataframe(attrs=("number", "state", "value", "duration", "params"))
    df["duration"] = df["duration"].dt.total_seconds().round(2)
    df.to_csv(spec_path(task, label).with_suffix(".trials.csv"), index=False)


def best(task: str, label: str) -> dict[str, Any] | None:
    p = ROOT / RESULTS / task / slug(label) / "best.json"
    if p.exists():
        export_trials(task, label)
        data: dict[str, Any] = json.loads(p.read_text())
        record = spec_path(task, label).with_suffix(".best.json")
        record.write_text(json.dumps(data, indent=2) + "\n")
        return data
    record = spec_path(task, label).with_suffix(".best.json")
    return json.loads(record.read_text()) if record.exists() else None


#: the docs page's reports: (results folder, report name, variants or None for all)
REPORTS: list[tuple[str, str, list[str] | None]] = [
    ("rosenbrock", "report", None),
    ("uci_energy", "report", None),
    ("uci_protein", "report", None),
    ("fashion_mnist", "report", None),
    ("fashion_mnist", "report-damping", ["Adam", "AdamQLR (Undamped)", "AdamQLR (Tuned)"]),
    ("fashion_mnist", "report-curvature", ["Adam", "AdamQLR (Hessian)", "AdamQLR (Tuned)"]),
    ("fashion_mnist_sensitivity", "report", None),
    ("fashion_mnist_beyond", "report", None),
]
DOCS = ROOT / "docs" / "reproduction"


SHORT = {
    "optimizer.step_size.lr": "lr",
    "optimizer.direction.momentum": "momentum",
    "optimizer.step_size.momentum": "momentum",
    "optimizer.direction.weight_decay": "weight decay",
    "optimizer.direction.eps": "eps",
    "optimizer.damping.initial": "lambda0",
    "optimizer.damping.value": "lambda",
    "optimizer.damping.decrease": "omega_dec",
    "optimizer.damping.increase": "omega_inc",
    "optimizer.step_size.beta": "beta",
    "batch_size": "batch",
}


def hyperparameters() -> str:
    """The tuned values of every study, as a Markdown table per task (paper's
    ``Hyperparameters`` table)."""
    out = []
    for task in SCALE:
        rows = []
        for label in SCALE[task]["tuned"]:
            rec = spec_path(task, label).with_suffix(".best.json")
            if not rec.exists():
                rows.append(f"| {label} | (no result) | | |")
                continue
            b = json.loads(rec.read_text())
            vals = ", ".join(
                f"{SHORT.get(k, k)} {v:.3g}" if isinstance(v, float) else f"{SHORT.get(k, k)} {v}"
                for k, v in b["overrides"].items()
            )
            rows.append(f"| {label} | {vals} | {b['value']:.4g} | {b['n_trials']} |")
        metric = SCALE[task]["metric"]
        out.append(
            f"**{task}** (best trial by its last {metric}; trials capped at "
            f"{SCALE[task]['cap']:g} s)\n\n| variant | tuned values | best {metric} | trials |\n"
            "|---|---|---|---|\n" + "\n".join(rows) + "\n"
        )
    return "\n".join(out)


def figures() -> int:
    """``qlrlab report`` on each suite's results, then copy the PNGs and tables into the docs."""
    import shutil

    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "hyperparameters.md").write_text(hyperparameters())
    rc = 0
    for folder, name, variants in REPORTS:
        out = ROOT / "results" / "paper" / folder
        if not (out / "index.json").exists():
            print(f"skip {folder}: no results (run qlrlab ablate examples/paper/{folder}.yaml)")
            continue
        cmd = [sys.executable, "-m", "qlrlab", "report", str(out), "--name", name]
        if variants:
            cmd += ["--variants", *variants]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        rc = rc or r.returncode
        if r.returncode:
            print(r.stderr)
            continue
        dest = DOCS / (folder if name == "report" else f"{folder}-{name.removeprefix('report-')}")
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted((out / name).iterdir()):
            if f.suffix == ".png" or f.name in ("table.md", "captions.md", "table.csv"):
                shutil.copy2(f, dest / f.name)
        print(f"{folder} ({name}) -> {dest.relative_to(ROOT)}")
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["specs", "tune", "apply", "figures"])
    ap.add_argument("--tasks", nargs="*", default=list(SCALE))
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    if a.command == "specs":
        write_specs(a.tasks)
        return 0
    if a.command == "tune":
        return tune(a.tasks, a.jobs)
    if a.command == "figures":
        return figures()
    from suites import write_beyond, write_sensitivity, write_suite  # type: ignore[import-not-found]

    for task in a.tasks:
        tuned = {label: best(task, label) for label in SCALE[task]["tuned"]}
        write_suite(task, tuned, SCALE[task])
        if task == "fashion_mnist":
            write_sensitivity(tuned["AdamQLR (Tuned)"])
            write_beyond(tuned)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(main())
