"""The "Writing a new heuristic" example (examples/custom_heuristic/) works as documented."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

import qlrlab
from qlrlab.registry import DAMPINGS, STEP_SIZES

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_heuristic"


@pytest.fixture
def mh():
    """Import the example module (registering its components); unregister afterwards."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        import my_heuristics
    finally:
        sys.path.remove(str(EXAMPLE))
    # a previous test may have unregistered them: register the (cached) classes again
    if "capped_quadratic" not in STEP_SIZES:
        STEP_SIZES.register("capped_quadratic")(my_heuristics.CappedQuadraticSpec)
    if "smooth_rho" not in DAMPINGS:
        DAMPINGS.register("smooth_rho")(my_heuristics.SmoothRhoSpec)
    yield my_heuristics
    STEP_SIZES.unregister("capped_quadratic")
    DAMPINGS.unregister("smooth_rho")


def _spec(**kw):
    base = {
        "direction": "adam",
        "curvature": "ggn",
        "step_size": {"name": "capped_quadratic", "radius": 0.05},
        "damping": {"name": "smooth_rho", "initial": 1e-3, "factor": 2.0},
    }
    base.update(kw)
    return qlrlab.OptimizerSpec.model_validate(base)


def test_specs_are_registered_and_validated(mh):
    spec = _spec()
    assert isinstance(spec.step_size, mh.CappedQuadraticSpec)
    assert isinstance(spec.damping, mh.SmoothRhoSpec)
    assert qlrlab.OptimizerSpec.from_yaml(spec.to_yaml()) == spec
    with pytest.raises(ValidationError, match="radius"):
        _spec(step_size={"name": "capped_quadratic", "radius": -1.0})
    with pytest.raises(ValidationError, match="extra"):
        _spec(damping={"name": "smooth_rho", "bogus": 1})
    with pytest.raises(ValidationError, match="max_damping"):
        _spec(damping={"name": "smooth_rho", "min_damping": 1.0, "max_damping": 0.5})
    with pytest.raises(ValidationError, match="needs a curvature oracle"):
        _spec(curvature=None)
    schema = qlrlab.optimizer_json_schema()
    assert "CappedQuadraticSpec" in schema["$defs"] and "SmoothRhoSpec" in schema["$defs"]


def test_capped_step_respects_the_radius_and_smooth_rho_moves_lambda(mh):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randn(32, 1, dtype=torch.float64)
    opt = qlrlab.build_optimizer(_spec(), model, qlrlab.HalfMSELoss())
    lams = [opt.damping.value]
    for _ in range(5):
        info = opt.step((x, y))
        assert info.status == "ok" and info.rho is not None and math.isfinite(info.rho)
        assert info.update_norm <= 0.05 * (1 + 1e-9)
        s = min(1.0, max(-1.0, 1.0 - 2.0 * info.rho))
        assert info.damping == pytest.approx(max(lams[-1] * 2.0**s, 1e-8))
        lams.append(info.damping)
    assert len(set(lams)) > 1
    # uncapped (huge radius) it is exactly AdamQLR's quadratic step with the same damping
    big = _spec(step_size={"name": "capped_quadratic", "radius": 1e9}, damping={"name": "constant"})
    ref = _spec(step_size={"name": "quadratic"}, damping={"name": "constant"})
    torch.manual_seed(1)
    m1 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    m2 = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    m2.load_state_dict(m1.state_dict())
    o1 = qlrlab.build_optimizer(big, m1, qlrlab.HalfMSELoss())
    o2 = qlrlab.build_optimizer(ref, m2, qlrlab.HalfMSELoss())
    for _ in range(3):
        assert o1.step((x, y)).alpha == pytest.approx(o2.step((x, y)).alpha, rel=1e-12)
    # state round-trip
    sd = opt.state_dict()
    fresh = qlrlab.build_optimizer(_spec(), model, qlrlab.HalfMSELoss())
    fresh.load_state_dict(sd)
    assert fresh.damping.value == opt.damping.value


def test_example_ablation_runs_and_reports(mh, tmp_path, capsys):
    sys.path.insert(0, str(EXAMPLE))
    try:
        import run_ablation
    finally:
        sys.path.remove(str(EXAMPLE))
    data = yaml.safe_load((EXAMPLE / "ablation.yaml").read_text())
    assert set(data["variants"]) == {"adamqlr", "capped", "smooth_rho", "both"}
    out = tmp_path / "out"
    code = run_ablation.main(["--out", str(out), "--steps", "4", "--repeats", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    for variant in data["variants"]:
        assert variant in printed
    from qlrlab.engine import collect_runs

    runs = collect_runs(out)
    assert len(runs) == 4 and set(runs["variant"]) == set(data["variants"])
    assert (runs["status"] != "failed").all()
    assert (out / "report" / "table.md").exists()


@pytest.mark.slow
def test_cli_ablation_with_plugin_runs_in_spawned_workers(tmp_path) -> None:
    """`qlrlab ablate ... --plugin my_heuristics.py --workers 2` in a fresh process: the user's
    components exist in the spawned workers; without the plugin the spec is rejected before any
    run starts (exit 2), and an unimportable plugin is bad input too."""
    import json
    import os
    import subprocess

    example = Path(__file__).resolve().parents[1] / "examples" / "custom_heuristic"
    env = {k: v for k, v in os.environ.items() if k != "QLRLAB_PLUGINS"}
    common = [sys.executable, "-m", "qlrlab", "ablate", str(example / "ablation.yaml"),
              "--set", "base.budget.steps=10", "--set", "repeats=1", "--no-report", "-q"]  # fmt: skip

    def qlrlab_cli(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*common, *extra], capture_output=True, text=True, timeout=300, env=env
        )

    bare = qlrlab_cli("--out", str(tmp_path / "none"))
    assert bare.returncode == 2, bare.stderr
    assert "capped_quadratic" in bare.stderr and "registered" in bare.stderr
    assert not list((tmp_path / "none").glob("runs/*/summary.json"))

    out = tmp_path / "with"
    ok = qlrlab_cli(
        "--out", str(out), "--workers", "2", "--plugin", str(example / "my_heuristics.py")
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in out.glob("runs/*/summary.json")]
    assert len(summaries) == 4 and all(s["status"] == "completed" for s in summaries)

    missing = qlrlab_cli("--plugin", "no_such_plugin_module")
    assert missing.returncode == 2 and "no_such_plugin_module" in missing.stderr
