"""Behaviour of the composed optimiser: torch.optim contract, buffers, state, bad input (issue 2)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import qlrlab
from qlrlab.losses import HalfMSELoss


def _bn_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


def _batch(dtype: torch.dtype = torch.float32, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 4, dtype=dtype), torch.randint(0, 3, (n,))


@pytest.mark.parametrize("preset", ["adamqlr", "adamqlr_hessian"])
def test_extra_passes_leave_batchnorm_buffers_as_one_forward_does(preset: str) -> None:
    model = _bn_model()
    expected = copy.deepcopy(model)
    x, y = _batch()
    expected(x)  # exactly one train-mode forward: what the gradient pass does to the buffers
    spec = qlrlab.presets.get_preset(preset)
    spec.track_rho = True
    opt = qlrlab.build_optimizer(spec, model, nn.CrossEntropyLoss())
    info = opt.step((x, y))
    assert info.rho is not None and info.new_loss is not None
    for (n, b), (_, e) in zip(model.named_buffers(), expected.named_buffers()):
        assert torch.equal(b, e), n
    assert model.training


def test_rho_uses_train_mode_batch_statistics() -> None:
    """f(θ_new) is computed in the model's current (train) mode on the same batch."""
    model = _bn_model(torch.float64)
    x, y = _batch(torch.float64)
    opt = qlrlab.build_optimizer(qlrlab.presets.adamqlr(), model, nn.CrossEntropyLoss())
    info = opt.step((x, y))
    probe = copy.deepcopy(model)
    probe[1].track_running_stats = False  # batch statistics, no buffer writes
    assert info.new_loss == pytest.approx(nn.CrossEntropyLoss()(probe(x), y).item(), rel=1e-12)


@pytest.mark.parametrize("preset", ["adamqlr", "adam", "sgd"])
def test_state_dict_round_trip_mid_run_is_bit_identical(preset: str) -> None:
    torch.manual_seed(0)
    model = _bn_model()
    loss_fn = nn.CrossEntropyLoss()
    batches = [_batch() for _ in range(10)]
    opt = qlrlab.build_optimizer(qlrlab.presets.get_preset(preset), model, loss_fn)
    for b in batches[:5]:
        opt.step(b)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    rest_a = [opt.step(b) for b in batches[5:]]

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2 = _bn_model()
    model2.load_state_dict(ckpt["model"])
    opt2 = qlrlab.build_optimizer(qlrlab.presets.get_preset(preset), model2, loss_fn)
    opt2.load_state_dict(ckpt["opt"])
    rest_b = [opt2.step(b) for b in batches[5:]]
    assert [i.as_dict() for i in rest_a] == [i.as_dict() for i in rest_b]
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt2.step_count == opt.step_count == 10


def test_state_dict_carries_damping_and_counters() -> None:
    model = _bn_model()
    opt = qlrlab.build_optimizer(qlrlab.presets.adamqlr(), model, nn.CrossEntropyLoss())
    for _ in range(3):
        opt.step(_batch())
    sd = opt.state_dict()
    assert sd["qlrlab"]["step"] == 3
    assert sd["qlrlab"]["damping"]["damping"] == opt.damping.value
    assert sd["qlrlab"]["direction"]["step"] == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adamqlr_trains_in_both_dtypes(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1)).to(dtype)
    x = torch.randn(64, 4, dtype=dtype)
    y = x[:, :1] * 2 - x[:, 1:2]
    opt = qlrlab.build_optimizer(qlrlab.presets.adamqlr(), model, HalfMSELoss())
    infos = [opt.step((x, y)) for _ in range(60)]
    assert all(i.status == "ok" for i in infos)
    assert infos[-1].loss < 0.1 * infos[0].loss
    assert all(p.dtype == dtype for p in model.parameters())


class _Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1)
        self.poison = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.lin(x)
        return out * float("nan") if self.poison else out


def test_nonfinite_loss_leaves_parameters_and_state_untouched_and_increases_damping() -> None:
    torch.manual_seed(0)
    model = _Exploding()
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    opt = qlrlab.build_optimizer(qlrlab.presets.adamqlr(), model, HalfMSELoss())
    opt.step((x, y))
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.direction.state_dict())
    lam = opt.damping.value
    model.poison = True
    info = opt.step((x, y))
    assert info.status == "nonfinite_loss"
    assert not math.isfinite(info.loss)
    assert info.damping == pytest.approx(2 * lam)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    after = opt.direction.state_dict()
    for a, b in zip(after["exp_avg"], state_before["exp_avg"]):
        assert torch.equal(a, b)
    assert after["step"] == state_before["step"]
    model.poison = False
    assert opt.step((x, y)).status == "ok"


def test_nonfinite_alpha_leaves_parameters_untouched() -> None:
    """Zero curvature and zero damping give α = gᵀd/0: the step is refused and reported.
    (At g = 0 the model is flat and α = 0: see test_a_stationary_point_is_a_zero_step_...)"""
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    # J = 1e-20: g ~ 1e-20 and Adam's d ~ g / eps ~ 1e-12, so gᵀd ~ 1e-32 > 0 while
    # dᵀGd = (J d)² ~ 1e-64 underflows to 0 in float32 => gᵀd / 0 = inf
    x = torch.full((4, 2), 1e-20)
    spec = qlrlab.presets.adamqlr_undamped()
    opt = qlrlab.build_optimizer(spec, model, HalfMSELoss())
    info = opt.step((x, torch.ones(4, 1)))
    assert info.status == "nonfinite_alpha"
    assert info.grad_dot_direction != 0.0 and info.curvature == 0.0
    assert torch.equal(model.weight, torch.zeros(1, 2))


def test_step_requires_a_batch() -> None:
    model = nn.Linear(2, 1)
    opt = qlrlab.build_optimizer(qlrlab.presets.adam(), model, HalfMSELoss())
    with pytest.raises(qlrlab.ObservationError, match=r"opt.step\(\(inputs, targets\)\)"):
        opt.step()  # nothing observed: no forward since the last step


def test_step_computes_its_own_gradient() -> None:
    """Stale .grad from the caller is ignored: step zeroes and recomputes."""
    torch.manual_seed(0)
    m1 = nn.Linear(3, 1)
    m2 = copy.deepcopy(m1)
    x, y = torch.randn(5, 3), torch.randn(5, 1)
    HalfMSELoss()(m2(x), y).mul(100).backward()  # garbage gradient left behind
    o1 = qlrlab.build_optimizer(qlrlab.presets.sgd(lr=0.1), m1, HalfMSELoss())
    o2 = qlrlab.build_optimizer(qlrlab.presets.sgd(lr=0.1), m2, HalfMSELoss())
    o1.step((x, y))
    o2.step((x, y))
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


def test_is_a_torch_optimizer_with_param_groups() -> None:
    model = nn.Linear(3, 2)
    opt = qlrlab.build_optimizer(qlrlab.presets.adamqlr(), model, HalfMSELoss())
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups[0]["lr"] == 1.0
    opt.step((torch.randn(4, 3), torch.randn(4, 2)))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_group_lr_multiplies_quadratic_alpha() -> None:
    torch.manual_seed(0)
    m1 = nn.Linear(3, 1)
    m2 = copy.deepcopy(m1)
    x, y = torch.randn(6, 3, dtype=torch.float32), torch.randn(6, 1)
    o1 = qlrlab.build_optimizer(qlrlab.presets.adamqlr(), m1, HalfMSELoss())
    o2 = qlrlab.build_optimizer(qlrlab.presets.adamqlr(), m2, HalfMSELoss())
    for g in o2.param_groups:
        g["lr"] = 0.5
    i1, i2 = o1.step((x, y)), o2.step((x, y))
    assert i2.alpha == pytest.approx(0.5 * i1.alpha, rel=1e-6)
    assert i2.predicted_change != pytest.approx(i1.predicted_change)


def test_params_outside_model_rejected() -> None:
    model = nn.Linear(2, 1)
    stray = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="must belong to `model`"):
        qlrlab.build_optimizer(qlrlab.presets.adam(), model, HalfMSELoss(), [stray])


# -- specs and bad input ---------------------------------------------------------------------------


def _base() -> dict:
    return {
        "direction": {"name": "adam"},
        "curvature": {"name": "ggn"},
        "step_size": {"name": "quadratic"},
        "damping": {"name": "levenberg_marquardt"},
    }


@pytest.mark.parametrize(
    "path,value,match",
    [
        (("direction", "beta1"), 1.0, "direction.beta1"),
        (("direction", "beta2"), -0.1, "direction.beta2"),
        (("direction", "eps"), float("nan"), "direction.eps"),
        (("direction", "eps"), -1.0, "direction.eps"),
        (("step_size", "clip"), -1.0, "step_size.clip"),
        (("step_size", "amplification"), float("inf"), "step_size.amplification"),
        (("damping", "decrease"), 1.5, "damping.decrease"),
        (("damping", "increase"), 0.5, "damping.increase"),
        (("damping", "initial"), -1e-3, "damping.initial"),
        (("damping", "interval"), 0, "damping.interval"),
        (("damping", "lower_threshold"), 0.9, "lower_threshold"),
        (("damping", "nan_policy"), "ignore", "damping.nan_policy"),
        (("damping", "model"), "both", "damping.model"),
        (("direction", "momentum"), 0.9, "direction.momentum"),  # unknown key for adam
        (("curvature", "backend"), "jax", "curvature.backend"),
    ],
)
def test_invalid_specs_name_the_field(path: tuple, value: object, match: str) -> None:
    spec = _base()
    spec[path[0]][path[1]] = value
    with pytest.raises(ValidationError, match=match.replace(".", r"\.")):
        qlrlab.OptimizerSpec.model_validate(spec)


def test_unknown_top_level_key_rejected() -> None:
    with pytest.raises(ValidationError, match="learning_rate"):
        qlrlab.OptimizerSpec.model_validate({**_base(), "learning_rate": 1.0})


def test_unknown_component_lists_registered_names() -> None:
    spec = _base()
    spec["damping"] = {"name": "lm"}
    with pytest.raises(ValidationError, match=r"registered: .*constant.*levenberg_marquardt"):
        qlrlab.OptimizerSpec.model_validate(spec)


def test_incompatible_combination_rejected_with_reason() -> None:
    with pytest.raises(ValidationError, match="step_size 'quadratic' needs a curvature oracle"):
        qlrlab.OptimizerSpec.model_validate(
            {"direction": {"name": "adam"}, "step_size": {"name": "quadratic"}}
        )
    with pytest.raises(ValidationError, match="damping 'levenberg_marquardt' needs a curvature"):
        qlrlab.OptimizerSpec.model_validate(
            {"direction": {"name": "adam"}, "damping": {"name": "levenberg_marquardt"}}
        )


def test_sgd_nesterov_without_momentum_rejected() -> None:
    with pytest.raises(ValidationError, match="nesterov"):
        qlrlab.OptimizerSpec.model_validate({"direction": {"name": "sgd", "nesterov": True}})


def test_yaml_round_trip(tmp_path) -> None:
    for name, fn in qlrlab.presets.PRESETS.items():
        try:
            spec = fn()
        except TypeError:
            continue  # presets with required arguments
        path = tmp_path / f"{name}.yaml"
        spec.to_yaml(path)
        assert qlrlab.OptimizerSpec.from_yaml(path) == spec
        assert qlrlab.OptimizerSpec.from_yaml(spec.to_yaml()) == spec


def test_issue_example_api() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    spec = qlrlab.OptimizerSpec.model_validate(
        {
            "direction": {"name": "adam", "beta1": 0.9, "beta2": 0.999, "eps": 1e-8},
            "curvature": {"name": "ggn"},
            "step_size": {"name": "quadratic"},
            "damping": {
                "name": "levenberg_marquardt",
                "initial": 1e-3,
                "decrease": 0.5,
                "increase": 2.0,
            },
        }
    )
    opt = qlrlab.build_optimizer(spec, model, nn.CrossEntropyLoss())
    info = opt.step((torch.randn(10, 4), torch.randint(0, 3, (10,))))
    for field in (
        "loss",
        "alpha",
        "damping",
        "rho",
        "grad_dot_direction",
        "curvature",
        "predicted_change",
        "new_loss",
        "grad_norm",
        "direction_norm",
    ):
        assert isinstance(getattr(info, field), float), field
    # ΔM is the damped model change of the step taken, and ρ its ratio
    lam0 = 1e-3
    a, gd, q = info.alpha, info.grad_dot_direction, info.curvature
    dd = info.direction_norm**2
    assert info.predicted_change == pytest.approx(0.5 * a * a * (q + lam0 * dd) - a * gd, rel=1e-5)
    assert info.rho == pytest.approx((info.new_loss - info.loss) / info.predicted_change, rel=1e-5)


def test_json_schema_lists_every_registered_component() -> None:
    schema = qlrlab.optimizer_json_schema()
    text = str(schema)
    for reg in (qlrlab.DIRECTIONS, qlrlab.CURVATURES, qlrlab.STEP_SIZES, qlrlab.DAMPINGS):
        for name in reg.names():
            assert name in text


@pytest.mark.parametrize("preset", ["adamqlr", "adamqlr_hessian", "sgdqlr", "kfac", "lbfgs_qlr"])
def test_a_stationary_point_is_a_zero_step_not_a_divergence(preset):
    """At an exact minimum (g = 0, so d = 0) the quadratic model is flat: alpha = 0 and the step
    is ``ok``. It was 0/0 = NaN, refused as ``nonfinite_alpha``, and the engine ended the run as
    diverged (K-FAC's Gauss-Newton steps reach Rosenbrock's minimum exactly in float32)."""
    from qlrlab import build_optimizer
    from qlrlab.tasks import TASKS

    task = TASKS.validate({"name": "rosenbrock", "start": (1.0, 1.0)}).build()
    opt = build_optimizer(preset, task.model, task.loss_fn)
    batch = next(iter(task.train_batches(1, torch.Generator())))
    for _ in range(2):
        info = opt.step(batch)
        assert info.status == "ok" and info.alpha == 0.0 and info.loss == 0.0
    assert float(task.model.x) == 1.0 and float(task.model.y) == 1.0


def test_proposal_scalars_carry_the_step_info_names_and_the_old_ones_still_work():
    """One name per quantity: a Proposal's g'd and d'Cd are ``grad_dot_direction`` and
    ``curvature``, as in StepInfo; rules written with ``grad_dot=``/``quad_form=`` keep working."""
    from qlrlab.interfaces import Proposal

    a, g, q = torch.tensor(0.5), torch.tensor(-2.0), torch.tensor(3.0)
    new = Proposal(alpha=a, grad_dot_direction=g, curvature=q)
    old = Proposal(alpha=a, grad_dot=g, quad_form=q)
    for p in (new, old):
        assert p.grad_dot_direction is g and p.curvature is q
        assert p.grad_dot is g and p.quad_form is q  # the earlier names, read-only aliases
        assert p.update is None and p.extras == {}
