"""The step as a transaction: a rejected or refused step restores every component, the
curvature oracle included, and the step reads as named phases."""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

import qlrlab
from qlrlab.interfaces import StepSizeRule
from qlrlab.losses import HalfMSELoss
from qlrlab.optimizer import ComposedOptimizer


def _fisher_spec(damping: dict) -> dict:
    return {
        "direction": {"name": "adam"},
        "curvature": {"name": "fisher_mc", "seed": 3},
        "step_size": {"name": "quadratic"},
        "damping": damping,
    }


def test_rejected_step_restores_the_curvature_bind_counter() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = qlrlab.build_optimizer(
        _fisher_spec({"name": "accept_reject", "initial": 1e-3}), model, nn.CrossEntropyLoss()
    )
    for _ in range(2):
        opt.step((x, y))
    before = copy.deepcopy(opt.state_dict()["qlrlab"])
    opt.param_groups[0]["lr"] = 1e4  # overshoot: the loss rises, the step is rejected
    info = opt.step((x, y))
    assert info.status == "rejected"
    after = opt.state_dict()["qlrlab"]
    assert after["curvature"] == before["curvature"]  # the fisher_mc bind counter
    assert after["direction"]["step"] == before["direction"]["step"]


def test_refused_step_restores_direction_and_curvature_state() -> None:
    """A non-finite α (gᵀd / 0) refuses the step after the direction and curvature ran; without
    an accept/reject schedule their state used to keep the refused step's changes."""
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    # J = 1e-20: gᵀd ~ 1e-32 while dᵀCd ~ 1e-64 underflows to 0 in float32: alpha = inf
    x = torch.full((4, 2), 1e-20)
    opt = qlrlab.build_optimizer(
        _fisher_spec({"name": "constant", "value": 0.0}), model, HalfMSELoss()
    )
    info = opt.step((x, torch.ones(4, 1)))
    assert info.status == "nonfinite_alpha"
    assert opt.direction.step == 0
    assert opt.curvature.count == 0
    assert torch.equal(model.weight, torch.zeros(1, 2))


def test_initial_group_lr_is_an_attribute_of_the_rule() -> None:
    """Any step-size rule may ask for the initial group lr (no isinstance check in the core)."""

    class Halved(StepSizeRule):
        initial_group_lr = 0.5

        def propose(self, ctx):  # pragma: no cover - not stepped
            raise AssertionError

    model = nn.Linear(2, 1)
    opt = ComposedOptimizer(
        None,
        model=model,
        loss_fn=HalfMSELoss(),
        direction=qlrlab.directions.SGDDirection(),
        step_size=Halved(),
    )
    assert opt.param_groups[0]["lr"] == 0.5
    assert opt.damping.value == 0.0  # default: no damping


def test_step_reads_in_one_screen() -> None:
    lines = inspect.getsource(ComposedOptimizer.step).splitlines()
    assert len(lines) <= 45, len(lines)
