"""Composed optimisers reduce to known optimisers (issue 2)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import qlrlab


def _problem(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, nn.Module, list]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)
    loss_fn = nn.CrossEntropyLoss()
    batches = [(torch.randn(20, 6, dtype=dtype), torch.randint(0, 4, (20,))) for _ in range(40)]
    return model, loss_fn, batches


def _run_torch(
    model: nn.Module,
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    batches: list,
    sched: object | None = None,
) -> list[float]:
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def _run_ours(
    model: nn.Module, loss_fn: nn.Module, spec: dict, batches: list, sched_fn: object | None = None
) -> list[float]:
    opt = qlrlab.build_optimizer(spec, model, loss_fn)
    sched = sched_fn(opt) if sched_fn is not None else None
    losses = []
    for b in batches:
        info = opt.step(b)
        assert info.status == "ok"
        if sched is not None:
            sched.step()
        losses.append(info.loss)
    return losses


def _assert_same(
    m1: nn.Module, m2: nn.Module, l1: list[float], l2: list[float], tol: float
) -> None:
    assert l1 == pytest.approx(l2, rel=tol, abs=tol)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_adam_fixed_equals_torch_adam(weight_decay: float, dtype: torch.dtype, tol: float) -> None:
    model, loss_fn, batches = _problem(dtype)
    ref = copy.deepcopy(model)
    kw = {"lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-7, "weight_decay": weight_decay}
    torch_opt = (
        torch.optim.AdamW(ref.parameters(), **kw)
        if weight_decay
        else torch.optim.Adam(ref.parameters(), **kw)
    )
    l_ref = _run_torch(ref, loss_fn, torch_opt, batches)
    spec = {
        "direction": {
            "name": "adam",
            "beta1": 0.8,
            "beta2": 0.99,
            "eps": 1e-7,
            "weight_decay": weight_decay,
        },
        "step_size": {"name": "fixed", "lr": 3e-3},
    }
    l_ours = _run_ours(model, loss_fn, spec, batches)
    _assert_same(model, ref, l_ours, l_ref, tol)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 1e-6)])
def test_fused_adam_direction_equals_the_foreach_formula(
    weight_decay: float, dtype: torch.dtype, tol: float
) -> None:
    """The fused-kernel direction (views of one flat buffer) and the foreach path agree."""
    from qlrlab.directions.adam import AdamDirection, AdamSpec

    model, loss_fn, batches = _problem(dtype)
    params = list(model.parameters())
    spec = AdamSpec(beta1=0.8, beta2=0.99, eps=1e-7, weight_decay=weight_decay)
    fused, plain = AdamDirection(spec), AdamDirection(spec)
    plain.fused = False
    for comp in (fused, plain):
        comp.setup(params, model, loss_fn)

    # the direction only reads ctx.problem.params (weight decay)
    ctx = SimpleNamespace(problem=SimpleNamespace(params=params))
    for x, y in batches[:10]:
        grads = list(torch.autograd.grad(loss_fn(model(x), y), params))
        assert fused._can_fuse(grads)
        d1 = fused.compute(grads, ctx)  # type: ignore[arg-type]
        d2 = plain.compute(grads, ctx)  # type: ignore[arg-type]
        base = d1[0].untyped_storage().data_ptr()
        assert all(t.untyped_storage().data_ptr() == base for t in d1)  # one flat buffer
        for a, b in zip(d1, d2):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        for a, b in zip(fused.exp_avg + fused.exp_avg_sq, plain.exp_avg + plain.exp_avg_sq):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        with torch.no_grad():
            for p, t in zip(params, d1):
                p.sub_(1e-2 * t)
    # a non-contiguous moment buffer disables the kernel (the foreach path takes over)
    fused.exp_avg[0] = fused.exp_avg[0].t().contiguous().t()
    assert not fused._can_fuse(grads)


@pytest.mark.parametrize(
    "kw",
    [
        {"momentum": 0.0},
        {"momentum": 0.9},
        {"momentum": 0.9, "nesterov": True},
        {"momentum": 0.5, "dampening": 0.3, "weight_decay": 1e-2},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
    ],
)
def test_sgd_fixed_equals_torch_sgd(kw: dict) -> None:
    model, loss_fn, batches = _problem()
    ref = copy.deepcopy(model)
    l_ref = _run_torch(ref, loss_fn, torch.optim.SGD(ref.parameters(), lr=0.05, **kw), batches)
    l_ours = _run_ours(
        model,
        loss_fn,
        {"direction": {"name": "sgd", **kw}, "step_size": {"name": "fixed", "lr": 0.05}},
        batches,
    )
    _assert_same(model, ref, l_ours, l_ref, 1e-12)


def test_fixed_step_follows_lr_scheduler() -> None:
    model, loss_fn, batches = _problem()
    ref = copy.deepcopy(model)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    l_ref = _run_torch(
        ref,
        loss_fn,
        opt_ref,
        batches,
        torch.optim.lr_scheduler.StepLR(opt_ref, step_size=5, gamma=0.5),
    )
    l_ours = _run_ours(
        model,
        loss_fn,
        {"direction": {"name": "adam"}, "step_size": {"name": "fixed", "lr": 1e-2}},
        batches,
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5),
    )
    _assert_same(model, ref, l_ours, l_ref, 1e-12)


def test_param_groups_with_different_lr_match_torch() -> None:
    model, loss_fn, batches = _problem()
    ref = copy.deepcopy(model)
    groups_ref = [{"params": ref[0].parameters(), "lr": 1e-2}, {"params": ref[2].parameters()}]
    l_ref = _run_torch(ref, loss_fn, torch.optim.SGD(groups_ref, lr=1e-1, momentum=0.9), batches)
    spec = qlrlab.OptimizerSpec.model_validate(
        {"direction": {"name": "sgd", "momentum": 0.9}, "step_size": {"name": "fixed", "lr": 1e-1}}
    )
    groups = [{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters()}]
    opt = qlrlab.build_optimizer(spec, model, loss_fn, groups)
    l_ours = [opt.step(b).loss for b in batches]
    _assert_same(model, ref, l_ours, l_ref, 1e-12)


def test_adam_preset_is_torch_adam_default() -> None:
    model, loss_fn, batches = _problem()
    ref = copy.deepcopy(model)
    l_ref = _run_torch(ref, loss_fn, torch.optim.Adam(ref.parameters()), batches)
    l_ours = _run_ours(model, loss_fn, qlrlab.presets.adam(), batches)
    _assert_same(model, ref, l_ours, l_ref, 1e-12)


def test_flat_span_and_sq_norm_of_views_of_one_buffer() -> None:
    from qlrlab._tensorlist import dot, flat_span, sq_norm

    torch.manual_seed(0)
    flat = torch.randn(17, dtype=torch.float64)
    xs = [flat[:12].view(3, 4), flat[12:15], flat[15:]]
    span = flat_span(xs)
    assert span is not None and torch.equal(span, flat)
    assert sq_norm(xs) == pytest.approx(float(flat @ flat), rel=1e-14)
    separate = [x.clone() for x in xs]
    assert flat_span(separate) is None
    assert sq_norm(separate) == pytest.approx(float(flat @ flat), rel=1e-14)
    assert flat_span([flat[:4], flat[5:9]]) is None  # a gap
    assert flat_span([flat[:12].view(4, 3).t(), flat[12:]]) is None  # not contiguous
    assert flat_span([flat[4:8], flat[:4]]) is None  # out of order
    assert dot(xs, separate) == pytest.approx(float(flat @ flat), rel=1e-14)


def _clipped_sgd_reference(model, loss_fn, batches, group_lrs, bound, momentum=0.0, mults=None):
    """Plain-torch K-FAC norm constraint with d = g: kappa = min(1, sqrt(c / sum lr_i^2 |g_i|^2)),
    then delta = -lr_i kappa g + mu m_i delta_prev (kfac-jax: constrain before momentum; the
    momentum rule multiplies its whole update, momentum term included, by the group's lr m_i)."""
    mults = mults or [1.0] * len(group_lrs)
    losses, kappas, prev = [], [], None
    for x, y in batches:
        model.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        with torch.no_grad():
            ps = list(model.parameters())
            total = sum(lr**2 * (p.grad * p.grad).sum() for p, lr in zip(ps, group_lrs))
            kappa = min(1.0, float(torch.sqrt(bound / total)))
            delta = [-lr * kappa * p.grad for p, lr in zip(ps, group_lrs)]
            if prev is not None:
                delta = [d + momentum * m * q for d, q, m in zip(delta, prev, mults)]
            for p, d in zip(ps, delta):
                p.add_(d)
            prev = delta
        losses.append(loss.item())
        kappas.append(kappa)
    return losses, kappas


@pytest.mark.parametrize("rule", ["fixed", "momentum"])
@pytest.mark.parametrize("groups", [False, True])
def test_norm_constraint_equals_clipped_sgd(rule: str, groups: bool) -> None:
    """K-FAC's norm constraint with the SGD direction is gradient clipping in the metric
    sum_i lr_i^2 |g_i|^2 (before momentum for the momentum rule); per-group learning rates
    enter the norm; the constraint is active on some steps and not on others."""
    model, loss_fn, batches = _problem()
    ref = copy.deepcopy(model)
    lr, bound, mu = 0.5, 0.03, (0.5 if rule == "momentum" else 0.0)
    mults = [0.2, 0.2, 1.0, 1.0] if groups else [1.0] * 4
    l_ref, kappas = _clipped_sgd_reference(
        ref, loss_fn, batches, [lr * m for m in mults], bound, mu, mults
    )
    assert min(kappas) < 0.9 and max(kappas) == 1.0  # both regimes occur
    step = {"name": rule, "lr": lr, "norm_constraint": bound}
    if rule == "momentum":
        step["momentum"] = mu
    spec = qlrlab.OptimizerSpec.model_validate({"direction": {"name": "sgd"}, "step_size": step})
    params: object = None
    if groups:
        params = [{"params": model[0].parameters(), "lr": 0.2}, {"params": model[2].parameters()}]
    opt = qlrlab.build_optimizer(spec, model, loss_fn, params)
    if rule == "fixed":  # fixed writes its lr into the groups; the first group keeps 0.2 * lr
        if groups:
            opt.param_groups[0]["lr"] = 0.2 * lr
    elif groups:  # the momentum rule's update is multiplied by the group's lr (default 1)
        opt.param_groups[0]["lr"] = 0.2
        opt.param_groups[1]["lr"] = 1.0
    l_ours = [opt.step(b).loss for b in batches]
    _assert_same(model, ref, l_ours, l_ref, 1e-12)


@pytest.mark.parametrize("rule", ["fixed", "momentum"])
def test_inactive_norm_constraint_changes_nothing(rule: str) -> None:
    model, loss_fn, batches = _problem()
    twin = copy.deepcopy(model)
    step = {"name": rule, "lr": 0.1}
    plain = qlrlab.build_optimizer(
        {"direction": {"name": "adam"}, "step_size": step}, model, loss_fn
    )
    big = {"direction": {"name": "adam"}, "step_size": {**step, "norm_constraint": 1e30}}
    constrained = qlrlab.build_optimizer(big, twin, loss_fn)
    for b in batches[:10]:
        assert plain.step(b).loss == constrained.step(b).loss
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_norm_constraint_is_validated_and_only_on_fixed_rates() -> None:
    with pytest.raises(ValueError, match="norm_constraint"):
        qlrlab.OptimizerSpec.model_validate(
            {"direction": {"name": "sgd"}, "step_size": {"name": "fixed", "norm_constraint": 0}}
        )
    with pytest.raises(ValueError, match="norm_constraint"):  # adaptive rules do not take it
        qlrlab.OptimizerSpec.model_validate(
            {
                "direction": {"name": "adam"},
                "curvature": {"name": "ggn"},
                "step_size": {"name": "quadratic", "norm_constraint": 1e-3},
            }
        )
