"""Wrong labels and false alarms (issue 15): a run stopped by a refused step says why, and a
finite gradient whose float32 sum of squares overflows is not called non-finite."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import qlrlab
from qlrlab._tensorlist import norm
from qlrlab.engine.runner import execute_run
from qlrlab.engine.specs import RunSpec
from qlrlab.engine.storage import RunStore
from qlrlab.optimizer import ComposedOptimizer, StepInfo

pytestmark = pytest.mark.usefixtures("one_thread")

BASE = {
    "task": {"name": "uci_energy", "subset": 64},
    "optimizer": "adamqlr",
    "batch_size": 32,
    "budget": {"steps": 6},
    "eval": {"every": 2},
    "device": "cpu",
}


@pytest.mark.parametrize("status", ["nonfinite_grad", "nonfinite_alpha", "nonfinite_loss"])
def test_stop_reason_names_what_was_nonfinite(tmp_path, monkeypatch, status):
    """The optimiser refuses step 3 with a finite loss (or a non-finite one for
    nonfinite_loss): the summary's stop_reason is the optimiser's status, not always
    nonfinite_loss."""
    real = ComposedOptimizer.step

    def step(self, batch):
        info = real(self, batch)
        if info.step >= 3:
            loss = float("nan") if status == "nonfinite_loss" else info.loss
            return StepInfo(loss=loss, damping=info.damping, status=status, step=info.step)
        return info

    monkeypatch.setattr(ComposedOptimizer, "step", step)
    spec = RunSpec.model_validate(BASE)
    res = execute_run(spec, RunStore(tmp_path))
    assert res.status == "diverged"
    assert res.summary["stop_reason"] == status
    assert math.isfinite(res.summary["final_test_loss"])


def test_norm_of_finite_tensors_does_not_overflow():
    g = [torch.full((10,), 2.0e19), torch.full((5,), 1.0e19), torch.ones(3)]
    want = math.sqrt(10 * 2.0e19**2 + 5 * 1.0e19**2 + 3)
    assert float(norm(g)) == pytest.approx(want, rel=1e-6)
    assert float(norm(g[:1])) == pytest.approx(math.sqrt(10) * 2.0e19, rel=1e-6)
    assert norm(g).dtype == torch.float32
    assert math.isinf(float(norm([torch.tensor([float("inf"), 1.0]), torch.ones(2)])))
    assert math.isnan(float(norm([torch.tensor([float("nan")]), torch.ones(2)])))
    small = [torch.randn(7), torch.randn(3, 4)]
    ref = torch.cat([x.reshape(-1) for x in small]).double().norm()
    assert float(norm(small)) == pytest.approx(float(ref), rel=1e-6)


def test_huge_finite_gradient_is_not_nonfinite_grad():
    """Largest gradient element 2.0e19, true norm about 8.5e19: the step is not refused as
    nonfinite_grad (the float32 sum of squares overflowed)."""
    torch.manual_seed(0)
    model = nn.Linear(18, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    # loss = mean over one row of 0.5 (w.x - y)^2 with w = 0: gradient = -y x
    x = torch.full((1, 18), 2.0e10)
    y = torch.full((1, 1), 1.0e9)
    opt = qlrlab.build_optimizer("adam", model, qlrlab.losses.HalfMSELoss())
    info = opt.step((x, y))
    assert info.status != "nonfinite_grad", info
    assert info.grad_norm == pytest.approx(math.sqrt(18) * 2.0e19, rel=1e-5)
