"""torch.optim citizenship (issue 13, item 4): deepcopy and pickle round trips, add_param_group,
state_dict from another composition, per-parameter state in ``opt.state``."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import qlrlab

PRESETS = ["adamqlr", "adam", "sgd_full", "adamqlr_hessian", "kfac"]


def _model() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3))


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(9)
    return [
        (torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)) for _ in range(n)
    ]


@pytest.mark.parametrize(
    ("how", "preset"),
    [("deepcopy", p) for p in PRESETS]
    # K-FAC's BackPACK extension holds a local function and does not pickle (issue 14)
    + [("pickle", p) for p in PRESETS if p != "kfac"],
)
def test_copies_of_model_and_optimizer_continue_identically(how: str, preset: str) -> None:
    model = _model()
    opt = qlrlab.build_optimizer(preset, model, nn.CrossEntropyLoss())
    bs = _batches(6)
    for b in bs[:3]:
        opt.step(b)
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.model is model2
    assert all(any(p is q for q in model2.parameters()) for p in opt2.param_groups[0]["params"])
    for i, b in enumerate(bs[3:]):
        torch.manual_seed(i)  # K-FAC samples from the global generator
        ia = opt.step(b)
        torch.manual_seed(i)
        ib = opt2.step(b)
        assert ia.as_dict() == ib.as_dict()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert p is not q


@pytest.mark.parametrize("preset", PRESETS)
def test_add_param_group_is_refused_with_a_clear_error(preset: str) -> None:
    model = _model()
    extra = nn.Linear(3, 3)
    opt = qlrlab.build_optimizer(preset, model, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"add_param_group.*build"):
        opt.add_param_group({"params": list(extra.parameters())})
    assert len(opt.param_groups) == 1


def test_param_groups_at_construction_still_work() -> None:
    model = _model()
    groups = [
        {"params": list(model[0].parameters()), "lr": 0.5},
        {"params": list(model[1].parameters()) + list(model[3].parameters())},
    ]
    opt = qlrlab.build_optimizer("adamqlr", model, nn.CrossEntropyLoss(), params=groups)
    assert opt.step(_batches(1)[0]).status == "ok"


def test_state_dict_of_another_composition_is_refused_naming_both() -> None:
    model = _model()
    a = qlrlab.build_optimizer("adamqlr", model, nn.CrossEntropyLoss())
    a.step(_batches(1)[0])
    b = qlrlab.build_optimizer("sgd_full", model, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=r"adam.*ggn.*quadratic.*levenberg_marquardt.*sgd.*fixed"):
        b.load_state_dict(a.state_dict())
    c = qlrlab.build_optimizer(
        {"direction": {"name": "torch_optim", "optimizer": "SGD"}, "step_size": "fixed"},
        model,
        nn.CrossEntropyLoss(),
    )
    d = qlrlab.build_optimizer(
        {"direction": {"name": "torch_optim", "optimizer": "Adam"}, "step_size": "fixed"},
        model,
        nn.CrossEntropyLoss(),
    )
    with pytest.raises(ValueError, match=r"torch_optim\(Adam\).*torch_optim\(SGD\)"):
        c.load_state_dict(d.state_dict())


@pytest.mark.parametrize(
    ("spec", "keys"),
    [
        ("adamqlr", {"exp_avg", "exp_avg_sq", "step"}),
        ("sgd_full", {"momentum_buffer"}),
        (
            {"direction": {"name": "torch_optim", "optimizer": "Adam"}, "step_size": "fixed"},
            {"exp_avg", "exp_avg_sq", "step"},
        ),
    ],
)
def test_per_parameter_state_is_visible_in_opt_state(spec, keys) -> None:
    model = _model()
    opt = qlrlab.build_optimizer(spec, model, nn.CrossEntropyLoss())
    for b in _batches(2):
        opt.step(b)
    params = list(model.parameters())
    assert set(opt.state) == set(params)
    for p in params:
        assert keys <= set(opt.state[p])
        for k in keys - {"step"}:
            assert opt.state[p][k].shape == p.shape
    # a live view: it follows the next step and a load_state_dict
    before = {k: v.clone() for k, v in opt.state[params[0]].items() if k != "step"}
    opt.step(_batches(3)[2])
    assert any(not torch.equal(before[k], opt.state[params[0]][k]) for k in before)
    sd = opt.state_dict()
    opt2 = qlrlab.build_optimizer(spec, model, nn.CrossEntropyLoss())
    opt2.load_state_dict(sd)
    for k in keys - {"step"}:
        assert torch.equal(opt2.state[params[0]][k], opt.state[params[0]][k])
