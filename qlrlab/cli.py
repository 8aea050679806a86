"""The ``qlrlab`` command line.

Commands::

    qlrlab run RUN.yaml          [--set k=v ...] [--out DIR] [--resume | --overwrite] [--threads N]
    qlrlab ablate ABLATION.yaml  [--set k=v ...] [--out DIR] [--resume | --overwrite] [--workers N]
                                 [--backend local|ray] [--address ADDR] [--dry-run]
    qlrlab tune TUNE.yaml        [--set k=v ...] [--out DIR] [--resume | --overwrite]
                                 [--backend optuna|ray] [--address ADDR]
    qlrlab report DIR            [--time-axis train|wall] [--include-trials] [--no-plots]
                                 [--variants V ...] [--name FOLDER]
    qlrlab presets | tasks | schema [run|ablation|tune|optimizer]

Exit codes: 0 success; 1 a run failed (or an unexpected error); 2 bad input (spec, override,
data), reported before anything runs; 130 interrupted (a checkpoint is kept; use ``--resume``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def _common(p: argparse.ArgumentParser, *, runs: bool = True) -> None:
    p.add_argument("spec", type=Path, help="the YAML spec file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a dotted field, e.g. --set optimizer.damping.initial=1e-2 (for ablate and "
        "tune, prefix run fields with 'base.': --set base.budget.steps=100); repeatable",
    )
    p.add_argument(
        "--out", type=Path, help="output directory (default: output_dir or results/NAME)"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted invocation")
    p.add_argument(
        "--overwrite", action="store_true", help="delete previous results in the output directory"
    )
    p.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE|FILE.py",
        help="import a module that registers your own components before reading the spec "
        "(repeatable; worker processes import it too)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="do not write the table and plots")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``qlrlab``."""
    parser = argparse.ArgumentParser(
        prog="qlrlab",
        description="Run, ablate, tune and report second-order-optimiser experiments.",
        epilog="Exit codes: 0 ok, 1 a run failed, 2 bad input, 130 interrupted.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="train one run", description="Train one run from RUN.yaml.")
    _common(p)
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        metavar="N",
        help="torch intra-op threads for the run (default 1, fastest for small models)",
    )
    p = sub.add_parser(
        "ablate",
        help="run an ablation (variants x tasks x grid x sweeps x seeds)",
        description="Run every run of ABLATION.yaml, in parallel worker processes.",
    )
    _common(p)
    p.add_argument("--workers", type=int, help="parallel worker processes (default: spec.workers)")
    p.add_argument("--backend", choices=["local", "ray"], default="local")
    p.add_argument("--address", help="Ray cluster address (with --backend ray)")
    p.add_argument("--dry-run", action="store_true", help="list the planned runs and exit")
    p = sub.add_parser(
        "tune",
        help="tune hyperparameters, then repeat the best configuration",
        description="Run the study in TUNE.yaml (Optuna by default, or Ray Tune).",
    )
    _common(p)
    p.add_argument("--backend", choices=["optuna", "ray"], default="optuna")
    p.add_argument("--address", help="Ray cluster address (with --backend ray)")
    p.add_argument("--workers", type=int, default=1, help="worker processes for the repeats")
    p.add_argument("--dry-run", action="store_true", help="validate the study and exit")
    p = sub.add_parser(
        "report",
        help="write tables and plots for an output directory",
        description="Median ± bootstrap SE tables (Markdown, CSV, LaTeX) and plots (PNG, PDF).",
    )
    p.add_argument("dir", type=Path, help="an output directory of run/ablate/tune")
    p.add_argument(
        "--time-axis",
        choices=["train", "wall"],
        default="train",
        help="time axis: training time excluding evaluation (default) or wall time",
    )
    p.add_argument("--include-trials", action="store_true", help="include tuning trials")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="VARIANT",
        help="only these variants, in this order (e.g. an ablation's subset of a suite)",
    )
    p.add_argument(
        "--name",
        default="report",
        help="the report's folder under DIR (default: report); e.g. --name report-damping",
    )
    sub.add_parser("presets", help="list optimiser presets", description="List optimiser presets.")
    sub.add_parser("tasks", help="list tasks", description="List registered tasks.")
    p = sub.add_parser(
        "schema",
        help="print the JSON schema of the specs",
        description="Print the JSON schema of a spec (default: all).",
    )
    p.add_argument(
        "which", nargs="?", default="all", choices=["all", "run", "ablation", "tune", "optimizer"]
    )
    return parser


def _first_line(obj: Any) -> str:
    """The docstring's first sentence-line, with reST roles and literals made plain text."""
    import re

    doc = (getattr(obj, "__doc__", None) or "").strip()
    line = doc.splitlines()[0] if doc else ""
    line = re.sub(r":(?:math|func|class|meth|mod|attr):`~?([^`]*)`", r"\1", line)
    return line.replace("``", "")


def _split_overrides(texts: Sequence[str]) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    from qlrlab.engine.specs import parse_override

    base, top = [], []
    for t in texts:
        key, value = parse_override(t)
        if key.startswith("base."):
            base.append((key[5:], value))
        elif key.startswith("1-base."):
            base.append(("1-" + key[7:], value))
        else:
            top.append((key, value))
    return base, top


def _load_top(model: Any, path: Path, top: list[tuple[str, Any]]) -> tuple[Any, dict[str, int]]:
    """Load an ablation/tune YAML, apply top-level overrides, validate."""
    from pydantic import ValidationError

    from qlrlab.engine.dotted import _set_path
    from qlrlab.engine.errors import SpecError, _format_validation
    from qlrlab.engine.yaml_io import load_yaml

    raw, lines = load_yaml(path)
    try:
        spec = model.model_validate(raw)
    except ValidationError as exc:
        raise _format_validation(exc, source=str(path), lines=lines) from None
    for key, value in top:
        data = spec.model_dump(mode="json")
        try:
            _set_path(data, key.split("."), value, strict=True)
        except KeyError as exc:
            raise SpecError(
                str(exc.args[0]),
                source="--set",
                fix="use an existing field; run fields need the 'base.' prefix",
            ) from None
        try:
            spec = model.model_validate(data)
        except ValidationError as exc:
            err = _format_validation(exc, source="--set", lines=None)
            raise SpecError(
                f"override {key}={value!r}: {err.message}", source="--set", fix=err.fix
            ) from None
    return spec, lines


def _out_dir(args: argparse.Namespace, spec: Any) -> Path:
    from qlrlab.engine.storage import safe_name

    if args.out is not None:
        return args.out
    if getattr(spec, "output_dir", None):
        return Path(spec.output_dir)
    return Path("results") / safe_name(spec.name)


def _check_out(out: Path, field: str = "--out") -> None:
    """Create the output directory and check that it is writable, before anything runs."""
    from qlrlab.engine.specs import SpecError

    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".qlrlab-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SpecError(
            f"cannot write the output directory {out}: {exc.strerror or exc}"
            + (f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out) else ""),
            field=field,
            fix="pass a writable directory with --out DIR (a path whose parents are directories "
            "you may write)",
        ) from None


def _check_workers(workers: int | None) -> None:
    from qlrlab.engine.specs import SpecError

    if workers is not None and workers < 1:
        raise SpecError(
            f"{workers} worker processes", field="--workers", fix="pass --workers 1 or more"
        )


#: errors of the file system that are the environment's, not a bug: a message, no traceback
_FS_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
)


def _report(out: Path, quiet: bool) -> None:
    from qlrlab.engine.report import build_report

    paths = build_report(out)
    if "table_md" in paths:
        print(Path(paths["table_md"]).read_text(encoding="utf-8"))
    print(f"results: {out.resolve()}")
    for key in ("table_md", "table_csv", "table_tex", "best_md"):
        if key in paths:
            print(f"table:   {paths[key]}")
    if paths["plots"]:
        print(f"plots:   {len(paths['plots'])} files in {paths['dir']}")
        for p in paths["plots"]:
            if str(p).endswith(".png"):
                print(f"         {p}")


def _finish(result: Any, out: Path, args: argparse.Namespace) -> int:
    counts = result.counts()
    print(
        f"runs: {', '.join(f'{v} {k}' for k, v in sorted(counts.items())) or 'none'}",
        file=sys.stderr,
    )
    if result.errors:  # the first failure once, then a count (tracebacks: summary.json)
        h, err = next(iter(result.errors.items()))
        print(f"run {h} failed: {err} (see {out / 'runs' / h / 'summary.json'})", file=sys.stderr)
        if len(result.errors) > 1:
            print(f"... and {len(result.errors) - 1} more failed run(s)", file=sys.stderr)
    if not args.no_report:
        _report(out, args.quiet)
    return EXIT_FAILED if result.failed else EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from qlrlab.distributed import init_from_env, shutdown
    from qlrlab.engine.ablation import execute_planned, preflight, prepare_output
    from qlrlab.engine.specs import PlannedRun, resolve_run, run_hash

    spec = resolve_run(args.spec, args.overrides)
    # under torchrun: join the process group (gloo on CPU, NCCL on GPUs); a no-op otherwise
    dist_info = init_from_env(device="cpu" if spec.device == "cpu" else None)
    out = _out_dir(args, spec)
    if not dist_info.is_main:  # under torchrun only rank 0 writes results and reports
        import tempfile

        out = Path(tempfile.mkdtemp(prefix=f"qlrlab-rank{dist_info.rank}-"))
        args.quiet, args.no_report = True, True
    _check_out(out)
    preflight([spec])
    store = prepare_output(out, resume=args.resume, overwrite=args.overwrite, kind="run")
    labels = {"kind": "run", "task": spec.task["name"], "variant": spec.name, "seed": spec.seed}
    planned = [PlannedRun(labels=labels, spec=spec, hash=run_hash(spec))]
    try:
        store.add_entries(
            [{"hash": planned[0].hash, "labels": labels}],
            replace=True,
            kind="run",
            name=spec.name,
            spec=spec.model_dump(mode="json"),
        )
        result = execute_planned(
            planned, store, quiet=args.quiet, desc=spec.name, threads_per_worker=args.threads
        )
    finally:
        store.lock.release()
    code = _finish(result, out, args)
    shutdown()  # under torchrun: the workers leave the process group together
    return code


def _cmd_ablate(args: argparse.Namespace) -> int:
    from qlrlab.engine.ablation import run_ablation
    from qlrlab.engine.specs import AblationSpec, plan_ablation

    base_over, top = _split_overrides(args.overrides)
    spec, lines = _load_top(AblationSpec, args.spec, top)
    planned = plan_ablation(spec, base_overrides=base_over, source=str(args.spec), lines=lines)
    _check_workers(args.workers)
    out = _out_dir(args, spec)
    if args.dry_run:
        for p in planned:
            print(p.hash, json.dumps(p.labels, sort_keys=True))
        print(f"{len(planned)} runs ({len({p.hash for p in planned})} distinct) -> {out}")
        return EXIT_OK
    _check_out(out)
    result = run_ablation(
        spec,
        out,
        planned=planned,
        resume=args.resume,
        overwrite=args.overwrite,
        workers=args.workers,
        quiet=args.quiet,
        backend=args.backend,
        address=args.address,
    )
    return _finish(result, out, args)


def _cmd_tune(args: argparse.Namespace) -> int:
    from qlrlab.engine.specs import TuneSpec
    from qlrlab.engine.tuning import TrialsFailed, failure_summary, run_tune

    base_over, top = _split_overrides(args.overrides)
    spec, _ = _load_top(TuneSpec, args.spec, top)
    _check_workers(args.workers)
    out = _out_dir(args, spec)
    if args.dry_run:
        from qlrlab.engine.tuning import trial_base, validate_space

        validate_space(spec, trial_base(spec, base_over))
        for key, p in spec.space.items():
            print(f"{key}: {p.model_dump(exclude_none=True)}")
        print(f"{spec.n_trials} trials + {len(spec.repeat_seed_list())} repeats -> {out}")
        return EXIT_OK
    _check_out(out)
    try:
        res = run_tune(
            spec,
            out,
            base_overrides=base_over,
            resume=args.resume,
            overwrite=args.overwrite,
            quiet=args.quiet,
            backend=args.backend,
            address=args.address,
            workers=args.workers,
        )
    except TrialsFailed as exc:  # no best configuration: no report that looks like a result
        print(f"error: {exc}", file=sys.stderr)
        print(f"  (tracebacks: {out / 'runs'}/*/summary.json)", file=sys.stderr)
        return EXIT_FAILED
    print(
        f"trials: {res.n_trials}; best {spec.metric} ({spec.scope}) = {res.best_value}",
        file=sys.stderr,
    )
    if res.failures:
        print(f"warning: {failure_summary(res.failures, res.n_trials)}", file=sys.stderr)
    for k, v in res.best_overrides:
        print(f"  {k} = {v}", file=sys.stderr)
    if res.repeats is not None:
        code = _finish(res.repeats, out, args)
        return EXIT_FAILED if res.failures else code
    if not args.no_report:
        _report(out, args.quiet)
    return EXIT_OK if res.best_params and not res.failures else EXIT_FAILED


def _cmd_report(args: argparse.Namespace) -> int:
    from qlrlab.engine.report import build_report
    from qlrlab.engine.specs import SpecError

    if not (args.dir / "index.json").exists():
        raise SpecError(
            f"{args.dir} is not a qlrlab output directory (no index.json)",
            fix="pass the --out directory of qlrlab run/ablate/tune",
        )
    kinds = ("run", "repeat", "trial") if args.include_trials else ("run", "repeat")
    try:
        paths = build_report(
            args.dir,
            kinds=kinds,
            time_axis=args.time_axis,
            plots=not args.no_plots,
            variants=args.variants,
            name=args.name,
        )
    except ValueError as exc:
        raise SpecError(str(exc), field="--variants", fix="pass variant names as listed") from None
    if "table_md" in paths:
        print(Path(paths["table_md"]).read_text(encoding="utf-8"))
    for key in ("table_md", "table_csv", "table_tex", "best_md"):
        if key in paths:
            print(f"table: {paths[key]}")
    for p in paths["plots"]:
        print(f"plot:  {p}")
    return EXIT_OK


def _cmd_presets(args: argparse.Namespace) -> int:
    from qlrlab.presets import PRESETS

    for name in sorted(PRESETS):
        print(f"{name:24s} {_first_line(PRESETS[name])}")
    return EXIT_OK


def _cmd_tasks(args: argparse.Namespace) -> int:
    from qlrlab.tasks import TASKS

    for name in TASKS.names():
        print(f"{name:16s} {_first_line(TASKS.get(name))}")
    return EXIT_OK


def _cmd_schema(args: argparse.Namespace) -> int:
    from qlrlab.engine.specs import AblationSpec, RunSpec, TuneSpec

    schemas: dict[str, Any] = {
        "run": RunSpec.model_json_schema(),
        "ablation": AblationSpec.model_json_schema(),
        "tune": TuneSpec.model_json_schema(),
    }
    try:
        import qlrlab

        schemas["optimizer"] = qlrlab.optimizer_json_schema()
    except (ImportError, AttributeError):
        from qlrlab import OptimizerSpec

        schemas["optimizer"] = OptimizerSpec.model_json_schema()
    out = schemas if args.which == "all" else schemas[args.which]
    print(json.dumps(out, indent=2))
    return EXIT_OK


_COMMANDS = {
    "run": _cmd_run,
    "ablate": _cmd_ablate,
    "tune": _cmd_tune,
    "report": _cmd_report,
    "presets": _cmd_presets,
    "tasks": _cmd_tasks,
    "schema": _cmd_schema,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qlrlab`` console script.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code (also used by ``sys.exit`` when run as a script).
    """
    from qlrlab.engine.runner import RunInterrupted
    from qlrlab.engine.specs import SpecError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        parser.error("--resume and --overwrite exclude each other")
    try:
        if getattr(args, "plugins", None):
            from qlrlab.plugins import PluginError, load_plugins

            try:
                load_plugins(args.plugins)
            except PluginError as exc:
                print(f"error: --plugin: {exc}", file=sys.stderr)
                return EXIT_BAD_INPUT
        return _COMMANDS[args.command](args)
    except SpecError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, RunInterrupted) as exc:
        print(f"interrupted: {exc}; continue with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        if exc.errno not in _FS_ERRNOS:
            traceback.print_exc()
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        where = f" {exc.filename}" if exc.filename else ""
        fix = (
            "free disk space (or pass --out on another disk)"
            if exc.errno in (errno.ENOSPC, errno.EDQUOT)
            else "make the path writable, or pass --out DIR elsewhere"
        )
        print(
            f"error: cannot write{where}: {exc.strerror or exc}\n  fix: {fix}; finished runs are "
            "kept: continue with --resume",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    except Exception as exc:
        traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
