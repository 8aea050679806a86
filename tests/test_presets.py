"""Every preset builds, validates, round-trips through YAML and trains a small MLP."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qlrlab
from qlrlab.presets import PRESETS, get_preset

PAPER_BASELINES = [
    "sgd_minimal",
    "sgd_full",
    "adam",
    "adam_untuned",
    "adam_tuned_eps",
    "kfac",
    "kfac_untuned",
    "kfac_unadaptive",
    "baydin_sgd",
    "adamqlr",
    "adamqlr_undamped",
    "adamqlr_hessian",
    "adamqlr_v1",
]

OVERRIDES = {  # presets whose untuned defaults are too timid for 15 steps
    "kfac_unadaptive": {"lr": 0.05},
    "sgd_minimal": {"lr": 0.5},
    "sgd": {"lr": 0.5},
    "sgd_full": {"lr": 0.1},
    "baydin_sgd": {"lr": 0.3},
    "adam": {"lr": 1e-2},
    "adam_untuned": {},
    "adam_tuned_eps": {"lr": 1e-2, "eps": 1e-4},
    "hessian_free": {"max_iter": 10},
}


def test_every_paper_baseline_exists():
    assert set(PAPER_BASELINES) <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_trains_small_mlp(name):
    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    spec = get_preset(name, **OVERRIDES.get(name, {}))
    assert qlrlab.OptimizerSpec.from_yaml(spec.to_yaml()) == spec
    opt = qlrlab.build_optimizer(spec, model, nn.CrossEntropyLoss())
    first = opt.step((x, y)).loss
    for _ in range(14):
        info = opt.step((x, y))
    with torch.no_grad():
        final = float(nn.CrossEntropyLoss()(model(x), y))
    assert info.status in ("ok", "rejected")
    assert final < first


def test_kfac_preset_matches_paper_configuration():
    spec = qlrlab.presets.kfac()
    assert spec.direction.name == "kfac" and spec.direction.curvature_ema == 0.95
    assert spec.direction.inverse_period == 1 and spec.direction.fisher == "mc"
    assert spec.step_size.name == "kfac_adaptive" and spec.step_size.momentum
    assert spec.damping.name == "kfac" and spec.damping.initial == 1.0
    assert spec.damping.interval == 1 and spec.damping.omega == pytest.approx(0.9)
    assert spec.curvature.name == "ggn"


def test_adamqlr_v1_clips_learning_rate():
    spec = qlrlab.presets.adamqlr_v1()
    assert spec.step_size.clip == 0.1 and spec.damping.initial == 1e-3
    assert spec.damping.decrease == 0.5 and spec.damping.increase == 2.0


def test_kfac_unadaptive_needs_no_curvature_oracle():
    spec = qlrlab.presets.kfac_unadaptive(lr=0.01, momentum=0.5, damping=0.1)
    assert spec.curvature is None and spec.damping.value == 0.1
    assert spec.step_size.name == "momentum" and spec.step_size.momentum == 0.5
