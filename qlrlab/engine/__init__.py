"""The experiment engine: specs, runs, ablations, tuning studies and reports.

Typical use is the command line (``qlrlab run|ablate|tune|report``); the same pieces are
available from Python::

    from qlrlab.engine import AblationSpec, plan_ablation, run_ablation, build_report

    spec = AblationSpec.model_validate(yaml.safe_load(open("examples/quickstart.yaml")))
    run_ablation(spec, "results/quickstart")
    build_report("results/quickstart")
"""

from qlrlab.engine.ablation import AblationResult, execute_planned, preflight, run_ablation
from qlrlab.engine.report import bootstrap_se, build_report, collect_runs, summary_table
from qlrlab.engine.runner import RunInterrupted, RunResult, execute_run, run_safely
from qlrlab.engine.specs import (
    AblationSpec,
    BudgetSpec,
    EvalSpec,
    ParamSpec,
    PlannedRun,
    RunSpec,
    SchedulerSpec,
    SpecError,
    SweepSpec,
    TuneSpec,
    apply_overrides,
    expand_values,
    load_yaml,
    parse_override,
    plan_ablation,
    resolve_run,
    run_hash,
)
from qlrlab.engine.storage import RunStore, load_checkpoint, save_checkpoint
from qlrlab.engine.tuning import TuneResult, run_tune

__all__ = [
    "AblationResult",
    "AblationSpec",
    "BudgetSpec",
    "EvalSpec",
    "ParamSpec",
    "PlannedRun",
    "RunInterrupted",
    "RunResult",
    "RunSpec",
    "RunStore",
    "SchedulerSpec",
    "SpecError",
    "SweepSpec",
    "TuneResult",
    "TuneSpec",
    "apply_overrides",
    "bootstrap_se",
    "build_report",
    "collect_runs",
    "execute_planned",
    "execute_run",
    "expand_values",
    "load_checkpoint",
    "load_yaml",
    "parse_override",
    "plan_ablation",
    "preflight",
    "resolve_run",
    "run_ablation",
    "run_hash",
    "run_safely",
    "run_tune",
    "save_checkpoint",
    "summary_table",
]
