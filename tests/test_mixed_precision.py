"""Mixed precision (issue 13, item 5): under bf16 autocast every built-in curvature computes
dᵀCd and Cv in float32; bf16 parameters work with adamqlr."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qlrlab


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 3 * 3, 4)
    )


def _data(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 6, generator=g) if kind == "mlp" else torch.randn(64, 1, 8, 8, generator=g)
    return x, torch.randint(0, 4, (64,), generator=g)


CURVATURES = [
    {"name": "ggn"},
    {"name": "ggn", "backend": "jvp"},
    {"name": "hessian"},
    {"name": "fisher_mc"},
    {"name": "empirical_fisher"},
    {"name": "kfac"},
]


def _spec(curvature: dict) -> qlrlab.OptimizerSpec:
    return qlrlab.OptimizerSpec.model_validate(
        {
            "direction": "sgd",
            "curvature": curvature,
            "step_size": "quadratic",
            "damping": {"name": "levenberg_marquardt", "initial": 1e-3},
        }
    )


class _Capture:
    """Queries the bound curvature with v = g as soon as it is bound (before the update), in the
    autocast state of the step."""

    def __init__(self, oracle) -> None:
        self._bind = oracle.bind
        oracle.bind = self

    def __call__(self, problem):
        bound = self._bind(problem)
        v = [p.grad.detach().clone() for p in problem.params]
        self.q, self.cv = bound.quadratic_form(v), bound.matvec(v)
        return bound


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("curvature", CURVATURES, ids=lambda c: "-".join(map(str, c.values())))
def test_curvature_under_bf16_autocast_is_float32_and_close(kind: str, curvature: dict) -> None:
    torch.manual_seed(0)
    model = _mlp() if kind == "mlp" else _cnn()
    model_amp = copy.deepcopy(model)
    x, y = _data(kind)
    loss_fn = nn.CrossEntropyLoss()
    opt = qlrlab.build_optimizer(_spec(curvature), model, loss_fn)
    opt_amp = qlrlab.build_optimizer(_spec(curvature), model_amp, loss_fn)
    cap, cap_amp = _Capture(opt.curvature), _Capture(opt_amp.curvature)
    ref = opt.step((x, y))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        info = opt_amp.step((x, y))
    assert info.status == "ok"
    assert info.curvature == pytest.approx(ref.curvature, rel=0.05)
    assert cap_amp.q.dtype == torch.float32
    assert float(cap_amp.q) == pytest.approx(float(cap.q), rel=0.05)
    gv, gv_ref = cap_amp.cv, cap.cv
    assert all(t.dtype == torch.float32 for t in gv)
    num = sum(((a - b) ** 2).sum() for a, b in zip(gv, gv_ref)).sqrt()
    den = sum((b**2).sum() for b in gv_ref).sqrt()
    assert float(num / den) < 0.05
    if curvature == {"name": "ggn"}:  # the fast path keeps working under autocast
        assert opt_amp.curvature.last_path == "fast", opt_amp.curvature.last_fallback


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_adamqlr_trains_with_bf16_parameters(kind: str) -> None:
    torch.manual_seed(0)
    model = (_mlp() if kind == "mlp" else _cnn()).bfloat16()
    x, y = _data(kind)
    x = x.bfloat16()
    opt = qlrlab.build_optimizer("adamqlr", model, nn.CrossEntropyLoss())
    infos = [opt.step((x, y)) for _ in range(15)]
    assert all(i.status in ("ok", "rejected") for i in infos)
    assert infos[-1].loss < 0.9 * infos[0].loss
    assert opt.curvature.last_path == "fast"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize(
    "preset,backend", [("kfac", None), ("adamqlr", "jvp"), ("adamqlr", "auto"), ("sgd", None)]
)
def test_a_step_inside_autocast_is_seen_by_the_next_forward_in_that_region(
    preset: str, backend: str | None
) -> None:
    """``torch.autocast`` caches the bf16 cast of each parameter for its whole region. A step
    taken inside the region updates the parameters in place: the loss at the new parameters
    (for rho) and the caller's next forward in the same region must see the new weights, not
    the cached casts of the old ones (found with K-FAC: rho was exactly 0 under autocast)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    spec = qlrlab.presets.get_preset(preset)
    if backend is not None:
        data = spec.model_dump()
        data["curvature"]["backend"] = backend
        spec = type(spec).model_validate(data)
    opt = qlrlab.build_optimizer(spec, model, nn.CrossEntropyLoss())
    x, y = torch.randn(64, 10), torch.randint(0, 4, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(x)  # fills the cast cache with the old weights
        info = opt.step((x, y))
        after = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fresh = model(x)  # a new region: casts of the current weights
    assert info.status == "ok"
    assert not torch.equal(before, fresh)  # the step changed the outputs
    assert torch.equal(after, fresh)
    if info.new_loss is not None:
        with torch.no_grad():
            assert info.new_loss == pytest.approx(float(nn.CrossEntropyLoss()(fresh, y)), rel=1e-2)
        assert info.new_loss != info.loss
