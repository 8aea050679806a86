"""Losses the quadratic model cannot serve are refused at construction (issue 13, item 9)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qlrlab
from qlrlab.losses import OUTPUT_HESSIANS, UnsupportedLossError, generic_output_hvp


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.mark.parametrize("curvature", ["ggn", "fisher_mc", "empirical_fisher"])
@pytest.mark.parametrize("loss", [nn.L1Loss(), nn.NLLLoss(), nn.KLDivLoss(reduction="batchmean")])
def test_zero_output_hessian_losses_are_refused_at_construction(curvature, loss) -> None:
    with pytest.raises(UnsupportedLossError) as exc:
        qlrlab.build_optimizer(qlrlab.presets.adamqlr(curvature=curvature), _mlp(), loss)
    msg = str(exc.value)
    assert type(loss).__name__ in msg
    assert "hessian" in msg  # the alternative
    assert isinstance(exc.value, ValueError)


def test_l1_with_the_hessian_oracle_is_accepted_and_registered_hessians_win() -> None:
    qlrlab.build_optimizer(qlrlab.presets.adamqlr(curvature="hessian"), _mlp(), nn.L1Loss())

    class MyL1(nn.L1Loss):
        pass

    with pytest.raises(UnsupportedLossError, match="MyL1"):  # subclasses inherit the refusal
        qlrlab.build_optimizer("adamqlr", _mlp(), MyL1())
    OUTPUT_HESSIANS[MyL1] = lambda loss_fn, z, y, u: u / z.numel()  # a user's surrogate
    try:
        opt = qlrlab.build_optimizer("adamqlr", _mlp(), MyL1())
        info = opt.step((torch.randn(16, 4), torch.randn(16, 3)))
        assert info.curvature is not None and info.curvature > 0
    finally:
        del OUTPUT_HESSIANS[MyL1]


def test_curved_losses_without_a_closed_form_still_work() -> None:
    opt = qlrlab.build_optimizer("adamqlr", _mlp(), nn.HuberLoss())
    info = opt.step((torch.randn(16, 4), torch.randn(16, 3)))
    assert info.status == "ok" and info.curvature is not None and info.curvature > 0


def test_a_custom_loss_linear_in_the_output_is_refused_at_the_first_curvature() -> None:
    class Linear(nn.Module):
        def forward(self, z, y):
            return (z * y).mean()

    z, y = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(UnsupportedLossError, match="Linear is linear in the model output"):
        generic_output_hvp(Linear(), z, y, torch.randn(4, 3))
