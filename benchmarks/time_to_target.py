"""Wall-clock seconds for untuned optimisers to reach a target test loss (not part of the tests).

Each optimiser trains the task's model from the same initialisation with the paper's untuned
batch size (3200; a batch above the dataset size is the full batch) until its test loss reaches
``--target`` or ``--budget`` seconds of *training* time pass. The test loss is evaluated every
``--eval-every`` steps with the clock stopped. Optimisers: ``adam`` (lr 1e-3), ``adamqlr``
(untuned v3), and ``kfac_untuned`` when that preset exists.

Usage::

    python benchmarks/time_to_target.py --task uci_energy --target 0.01 --budget 60
    python benchmarks/time_to_target.py --task fashion_mnist --target 0.40 --budget 300
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from typing import Any

import torch

from qlrlab import build_optimizer
from qlrlab.presets import PRESETS
from qlrlab.tasks import build_task

DEFAULT_TARGETS = {"uci_energy": 0.01, "fashion_mnist": 0.40}


def run_one(task: Any, preset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one optimiser; return the time to target and the loss curve."""
    model = copy.deepcopy(task.model)
    opt = build_optimizer(preset, model, task.loss_fn)
    gen = torch.Generator().manual_seed(args.seed)
    elapsed, steps, reached = 0.0, 0, None
    curve: list[tuple[float, int, float]] = []
    best = float("inf")
    while elapsed < args.budget and reached is None:
        for batch in task.train_batches(args.batch_size, gen):
            t0 = time.perf_counter()
            info = opt.step(batch)
            elapsed += time.perf_counter() - t0
            steps += 1
            if info.status.startswith("nonfinite"):
                return {"preset": preset, "seconds": None, "steps": steps, "diverged": True}
            if steps % args.eval_every == 0:
                test = task.evaluate(model, "test")["loss"]
                best = min(best, test)
                curve.append((elapsed, steps, test))
                if test <= args.target:
                    reached = elapsed
                    break
            if elapsed >= args.budget:
                break
    return {
        "preset": preset,
        "seconds": reached,
        "steps": steps,
        "best_test_loss": best,
        "curve": curve,
    }


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", default="uci_energy")
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--budget", type=float, default=60.0, help="training seconds per optimiser")
    ap.add_argument("--batch-size", type=int, default=3200)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--presets", nargs="*", default=None)
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args()
    if args.target is None:
        args.target = DEFAULT_TARGETS.get(args.task, 0.1)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task = build_task(args.task)
    presets = args.presets or [p for p in ("adam", "adamqlr", "kfac_untuned") if p in PRESETS]
    rows = [run_one(task, p, args) for p in presets]
    print("| task | target test loss | optimiser | seconds to target | steps | best test loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        secs = "not reached" if r.get("seconds") is None else f"{r['seconds']:.2f}"
        print(
            f"| {args.task} | {args.target} | {r['preset']} | {secs} | {r['steps']} | "
            f"{r.get('best_test_loss', float('nan')):.4g} |"
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"task": args.task, "target": args.target, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
