"""Run the custom-heuristic ablation: ``python examples/custom_heuristic/run_ablation.py``.

Loads ``my_heuristics`` as a plugin (registering ``capped_quadratic`` and ``smooth_rho``), loads
``ablation.yaml`` next to this file, runs it with the experiment engine's Python API and
prints the summary table; the report (table and plots) goes to the output directory.

Options: ``--out DIR`` (default ``results/custom_heuristic``), ``--steps N`` (override the
budget), ``--repeats N`` (override the number of seeds), ``--no-report``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from qlrlab.engine import (
    AblationSpec,
    build_report,
    collect_runs,
    plan_ablation,
    run_ablation,
    summary_table,
)
from qlrlab.plugins import load_plugins

HERE = Path(__file__).resolve().parent
# registers capped_quadratic and smooth_rho here, and (through QLRLAB_PLUGINS) in the worker
# processes the ablation spawns -- the same as `qlrlab ablate ... --plugin my_heuristics.py`
load_plugins([str(HERE / "my_heuristics.py")])


def main(argv: list[str] | None = None) -> int:
    """Run the ablation; return a process exit code (0: every run finished)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/custom_heuristic"))
    parser.add_argument("--steps", type=int, help="override budget.steps")
    parser.add_argument("--repeats", type=int, help="override the number of seeds")
    parser.add_argument("--no-report", action="store_true", help="skip the table and plots")
    args = parser.parse_args(argv)

    data = yaml.safe_load((HERE / "ablation.yaml").read_text())
    if args.repeats is not None:
        data["repeats"] = args.repeats
    spec = AblationSpec.model_validate(data)
    overrides = [("budget.steps", args.steps)] if args.steps is not None else []
    planned = plan_ablation(spec, base_overrides=overrides)  # validates every run up front
    result = run_ablation(spec, args.out, planned=planned, overwrite=True, quiet=True)

    table = summary_table(collect_runs(args.out))
    wanted = ("variant", "n", "diverged", "final_train_loss_median", "final_test_loss_median")
    print(table[[c for c in wanted if c in table]].to_string(index=False))
    if not args.no_report:
        build_report(args.out)
        print(f"report written to {args.out}")
    return 0 if not result.errors else 1


if __name__ == "__main__":
    sys.exit(main())
