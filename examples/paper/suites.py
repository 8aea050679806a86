"""Write ``examples/paper/<task>.yaml`` (the fixed-epoch suites) from the tuning studies' results.

Called by ``python examples/paper/study.py apply``; see that script. A variant whose study has a
result carries the tuned values with a comment naming the study; a variant without one keeps its
preset's defaults and is labelled "(defaults, not tuned)", never "Tuned".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

#: the fixed-epoch suite's evaluation at this study's scale (the paper: after every step)
EVAL = {
    "rosenbrock": "{every: 1, splits: [val, test], final_splits: [train, val, test]}",
    "uci_energy": "{every_seconds: 0.25, splits: [val, test], final_splits: [train, val, test]}",
    "uci_protein": "{every_seconds: 0.5, splits: [val, test], final_splits: [train, val, test]}",
    "fashion_mnist": "{every_seconds: 0.5, splits: [val, test], final_splits: [train, val, test]}",
}
TITLE = {
    "rosenbrock": "Rosenbrock (a=1, b=100), 200 steps from the fixed start (1, -1)",
    "uci_energy": "UCI Energy, MLP 8-50-1, 1/2 MSE on standardised targets; 1000 epochs (the paper: 4000)",
    "uci_protein": "UCI Protein, MLP 9-100-1, 1/2 MSE; 5 epochs (the paper: 200; tuned with 20)",
    "fashion_mnist": "Fashion-MNIST, MLP 784-50-10, cross-entropy; 10 epochs",
}
REPEATS = {"rosenbrock": 1, "uci_energy": 10, "uci_protein": 10, "fashion_mnist": 10}
#: variants of the suites that nobody tunes: (label, YAML mapping)
UNTUNED: dict[str, list[tuple[str, str]]] = {
    "rosenbrock": [
        ("Adam (Untuned)", "{optimizer: adam_untuned}"),
        ("K-FAC (Untuned)", "{optimizer: kfac_untuned}"),
        ("AdamQLR (Untuned, Hessian)", "{optimizer: adamqlr_hessian}"),
    ],
    "default": [
        ("Adam (Untuned)", "{optimizer: adam_untuned}"),
        ("K-FAC (Untuned)", "{optimizer: kfac_untuned, batch_size: 3200}"),
        ("AdamQLR (Untuned)", "{optimizer: adamqlr, batch_size: 3200}"),
    ],
}
#: paper label -> label in the suite (Rosenbrock is deterministic gradient descent)
RENAME = {"rosenbrock": {"SGD Minimal": "GD Minimal", "SGD Full": "GD Full"}}


def display_name(task: str, label: str) -> str:
    """The variant's name in the suite of ``task`` (GD instead of SGD on Rosenbrock)."""
    return RENAME.get(task, {}).get(label, label)


def _items(best: dict[str, Any]) -> str:
    """A study's best ``overrides`` as YAML flow-mapping items (``k: v, ...``)."""
    return ", ".join(f"{k}: {_value(v)}" for k, v in best["overrides"].items())


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _variant(
    task: str, label: str, preset: str, best: dict[str, Any] | None, study: str
) -> tuple[str, str]:
    name = display_name(task, label)
    if best is None:
        name = name.replace(" (Tuned)", "").replace(", Tuned", "") + " (defaults, not tuned)"
        return name, f"  {name}: {{optimizer: {preset}}}   # no study result: preset defaults"
    body = f"{{optimizer: {preset}, {_items(best)}}}"
    comment = (
        f"# tuned: {study} ({best['n_trials']} trials; best last {best['metric']} "
        f"{best['value']:.4g})"
    )
    return name, f"  {name}: {body}\n    {comment}"


def write_suite(task: str, tuned: dict[str, dict[str, Any] | None], scale: dict[str, Any]) -> Path:
    """Write ``examples/paper/<task>.yaml`` from the tuning results ``tuned`` (label -> best.json
    or ``None``)."""
    from study import ROOT, TUNED, spec_path  # type: ignore[import-not-found]

    lines = []
    for label, best in tuned.items():
        preset = TUNED[label][0]
        study = str(spec_path(task, label).relative_to(ROOT))
        lines.append(_variant(task, label, preset, best, study)[1])
    for label, body in UNTUNED.get(task, UNTUNED["default"]):
        lines.append(f"  {label}: {body}")
    qlr = tuned.get("AdamQLR (Tuned)")
    if task == "fashion_mnist" and qlr is not None:  # the curvature ablation (paper §4.2)
        items = _items(qlr)
        lines.append(
            f"  AdamQLR (Hessian): {{optimizer: adamqlr_hessian, {items}}}\n"
            "    # the curvature ablation: AdamQLR (Tuned)'s hyperparameters, exact Hessian"
        )
    n_tuned = sum(b is not None for b in tuned.values())
    head = f"""\
# The paper's fixed-epoch suite (sections 3.3-3.4, 4.1) on {task}, at this study's CPU scale.
# {TITLE[task]}.
# Written by `python examples/paper/study.py apply` from the tuning studies in
# examples/paper/tuning/{task}/ ({n_tuned} tuned variants; each tuned variant's comment names its
# study, its trial count and its best value). Regenerate the figures and tables with
#
#   qlrlab ablate examples/paper/{task}.yaml --workers 2
#   qlrlab report results/paper/{task}
#
# Reduced scale, against the paper: {scale["n_trials"]} tuning trials per optimiser (the paper: 200),
# trials capped at {scale["cap"]:g} s (900 s); {REPEATS[task]} repeat(s) per optimiser (50); evaluation
# as `eval` below (the paper: full evaluation after every step; the figures' time axes exclude
# evaluation and the warm-up step).
"""
    text = (
        head
        + f"""\
name: paper_{task}
output_dir: results/paper/{task}
workers: 2
threads_per_worker: 1
base:
  task: {{name: {task}}}
  optimizer: adamqlr
  batch_size: {scale["batch"]}
  budget: {_flow(scale.get("suite_budget", scale["budget"]))}
  eval: {EVAL[task]}
  device: auto
  dtype: float32
  checkpoint_every: 1000
variants:
"""
        + "\n".join(lines)
        + f"\nrepeats: {REPEATS[task]}\n"
    )
    path = HERE / f"{task}.yaml"
    path.write_text(text)
    print(f"wrote {path}")
    return path


def _flow(d: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"


def _qlr_items(best: dict[str, Any] | None) -> tuple[str, str]:
    """AdamQLR (Tuned)'s overrides as flow-mapping items, and where they come from."""
    if best is None:
        return "batch_size: 50", "AdamQLR's untuned defaults (no study result)"
    items = _items(best)
    return items, "examples/paper/tuning/fashion_mnist/adamqlr_tuned.yaml"


def write_sensitivity(best: dict[str, Any] | None) -> Path:
    """``examples/paper/fashion_mnist_sensitivity.yaml``: the λ0 and batch-size sensitivity
    studies (paper §4.2) from AdamQLR (Tuned)'s configuration."""
    items, source = _qlr_items(best)
    name = "AdamQLR (Tuned)" if best is not None else "AdamQLR (defaults, not tuned)"
    text = f"""\
# Sensitivity of AdamQLR on Fashion-MNIST (paper section 4.2) at this study's CPU scale: starting
# from AdamQLR (Tuned) ({source}), one setting changes at a time:
# the initial damping lambda0 over 10^(-8..0) (9 values; the paper: 17) and the batch size over
# {{50, ..., 3200}}; 3 seeds per value (the paper: 50). Written by `python examples/paper/study.py
# apply`.
#
#   qlrlab ablate examples/paper/fashion_mnist_sensitivity.yaml --workers 2
#   qlrlab report results/paper/fashion_mnist_sensitivity
name: paper_fashion_mnist_sensitivity
output_dir: results/paper/fashion_mnist_sensitivity
workers: 2
threads_per_worker: 1
base:
  task: {{name: fashion_mnist}}
  optimizer: adamqlr
  budget: {{epochs: 10}}
  eval: {{every: null, final_splits: [train, val, test]}}
  device: auto
  dtype: float32
variants:
  {name}: {{optimizer: adamqlr, {items}}}
    # {"tuned: " + source if best is not None else "no study result: AdamQLR's defaults"}
sweeps:
  - name: initial_damping
    set:
      optimizer.damping.initial: {{logspace: [-8, 0, 9]}}
  - name: batch_size
    set:
      batch_size: [50, 100, 200, 400, 800, 1600, 3200]
repeats: 3
"""
    path = HERE / "fashion_mnist_sensitivity.yaml"
    path.write_text(text)
    print(f"wrote {path}")
    return path


def write_beyond(tuned: dict[str, dict[str, Any] | None]) -> Path:
    """``examples/paper/fashion_mnist_beyond.yaml``: the QLR heuristics on other directions."""

    def tuned_line(label: str, preset: str) -> str:
        b = tuned.get(label)
        if b is None:
            return f"  {label} (defaults, not tuned): {{optimizer: {preset}}}"
        items = _items(b)
        return f"  {label}: {{optimizer: {preset}, {items}}}   # tuned, as in fashion_mnist.yaml"

    text = f"""\
# Beyond the paper: AdamQLR's heuristics (GGN quadratic-model learning rate, Levenberg-Marquardt
# damping; untuned defaults lambda0 = 1e-3, omega 0.5 / 2, batch 3200) on directions other than
# Adam, on Fashion-MNIST, against the tuned baselines of the main suite: SGD with heavy-ball
# momentum 0.9, and torch.optim.RMSprop through the `torch_optim` direction (any torch.optim
# optimiser's update used as the direction). 10 seeds. Written by
# `python examples/paper/study.py apply`.
#
#   qlrlab ablate examples/paper/fashion_mnist_beyond.yaml --workers 2
#   qlrlab report results/paper/fashion_mnist_beyond
name: paper_fashion_mnist_beyond
output_dir: results/paper/fashion_mnist_beyond
workers: 2
threads_per_worker: 1
base:
  task: {{name: fashion_mnist}}
  optimizer: adamqlr
  batch_size: 3200
  budget: {{epochs: 10}}
  eval: {EVAL["fashion_mnist"]}
  device: auto
  dtype: float32
variants:
{tuned_line("Adam", "adam")}
{tuned_line("SGD Full", "sgd_full")}
  AdamQLR (Untuned): {{optimizer: adamqlr}}
  SGD-momentum QLR (Untuned): {{optimizer: sgdqlr, optimizer.direction.momentum: 0.9}}
  RMSprop QLR (Untuned): {{optimizer: adamqlr, optimizer.direction: {{name: torch_optim, optimizer: RMSprop}}}}
repeats: 10
"""
    path = HERE / "fashion_mnist_beyond.yaml"
    path.write_text(text)
    print(f"wrote {path}")
    return path
