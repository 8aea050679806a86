"""``python -m qlrlab.testing [--plugin M ...] [--family F] [--name N] [--distributed]``:
run the component contract over every registry entry; exit code 1 when any component fails,
2 on bad arguments or a plugin that cannot be imported."""

from __future__ import annotations

import argparse
import sys

from qlrlab.plugins import PluginError, load_plugins
from qlrlab.registry import CURVATURES, DAMPINGS, DIRECTIONS, STEP_SIZES
from qlrlab.testing import CHECKS, check_component, check_distributed, contract_cases


def main(argv: list[str] | None = None) -> int:
    """Run the contract; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m qlrlab.testing", description=__doc__)
    parser.add_argument("--plugin", action="append", default=[], help="module or .py file")
    parser.add_argument(
        "--family", action="append", choices=["direction", "curvature", "step_size", "damping"]
    )
    parser.add_argument("--name", action="append", help="only these component names")
    parser.add_argument(
        "--only-plugins", action="store_true", help="only what the plugins registered"
    )
    parser.add_argument(
        "--check", action="append", choices=sorted(CHECKS), help="only these checks"
    )
    parser.add_argument("--distributed", action="store_true", help="also two gloo processes vs one")
    args = parser.parse_args(argv)
    registries = (DIRECTIONS, CURVATURES, STEP_SIZES, DAMPINGS)
    builtin = {(r.family, n) for r in registries for n in r.names()}
    try:
        load_plugins(args.plugin)
    except PluginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cases = contract_cases(args.family)
    if args.name:
        cases = [c for c in cases if c.name in args.name]
    if args.only_plugins:
        cases = [c for c in cases if (c.family, c.name) not in builtin]
    if not cases:
        print("error: no component matches the selection", file=sys.stderr)
        return 2
    failed = 0
    for case in cases:
        result = check_component(case, args.check)
        status = "PASS" if result.ok else "FAIL"
        print(f"{status} {case.id} ({len(result.passed)} checks passed, {len(result.skipped)} n/a)")
        for check, why in result.failures.items():
            print(f"     {check}: {why}")
        failed += not result.ok
    if args.distributed:
        for case, why in check_distributed(cases).items():  # type: ignore[assignment]
            print(
                f"{'PASS' if why is None else 'FAIL'} {case.id} distributed"
                + (f": {why}" if why else "")
            )
            failed += why is not None
    print(f"{len(cases)} components, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
