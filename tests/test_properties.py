"""Property-based tests of the quadratic step and the damping rule (issue 2)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qlrlab
from qlrlab.damping import LevenbergMarquardt, LevenbergMarquardtSpec
from qlrlab.losses import HalfMSELoss


class _Residual(nn.Module):
    """r(θ) = Lθ − c: a linear model whose ½·MSE is a convex quadratic in θ."""

    def __init__(self, L: torch.Tensor, c: torch.Tensor, theta: torch.Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(theta.clone())
        self.register_buffer("L", L)
        self.register_buffer("c", c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.L @ self.theta - self.c).unsqueeze(0).expand(x.shape[0], -1)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 6),
    curvature=st.sampled_from(["ggn", "hessian"]),
    direction=st.sampled_from(["adam", "sgd"]),
)
def test_quadratic_step_lands_on_line_minimiser(
    seed: int, n: int, curvature: str, direction: str
) -> None:
    g = torch.Generator().manual_seed(seed)
    m = n + 2
    L = torch.randn(m, n, generator=g, dtype=torch.float64)
    c = torch.randn(m, generator=g, dtype=torch.float64)
    model = _Residual(L, c, torch.randn(n, generator=g, dtype=torch.float64))
    spec = qlrlab.OptimizerSpec.model_validate(
        {
            "direction": {"name": direction},
            "curvature": {"name": curvature},
            "step_size": {"name": "quadratic"},
            "damping": {"name": "constant", "value": 0.0},
        }
    )
    opt = qlrlab.build_optimizer(spec, model, HalfMSELoss())
    x, y = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, m, dtype=torch.float64)
    for _ in range(3):
        theta0 = model.theta.detach().clone()
        info = opt.step((x, y))
        if info.status != "ok":  # converged exactly: zero gradient gives 0/0
            assert info.grad_norm is not None and info.grad_norm < 1e-12
            return
        if info.alpha == 0.0:  # already at the minimum (gᵀd == 0 to round-off)
            assert info.grad_norm is not None and info.grad_norm < 1e-12
            return
        d = (theta0 - model.theta.detach()) / info.alpha
        # gradient at the new point is orthogonal to the direction: exact line minimum
        grad_new = L.T @ (L @ model.theta.detach() - c) / m
        assert abs(float(grad_new @ d)) <= 1e-9 * (1 + float(d.norm()) * float(L.norm()) ** 2)
        # and the model predicted the change exactly (quadratic objective, λ = 0)
        assert info.rho is None or math.isclose(info.rho, 1.0, rel_tol=1e-6)


@settings(max_examples=200, deadline=None)
@given(
    initial=st.floats(0, 1e3, allow_nan=False),
    decrease=st.floats(0.01, 1.0),
    increase=st.floats(1.0, 10.0),
    floor=st.floats(1e-10, 1e-2),
    ceiling=st.one_of(st.none(), st.floats(1e-2, 1e4)),
    nan_policy=st.sampled_from(["keep", "increase"]),
    rhos=st.lists(
        st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.none()), max_size=40
    ),
    failures=st.lists(st.booleans(), max_size=40),
)
def test_damping_stays_within_bounds_and_moves_the_right_way(
    initial, decrease, increase, floor, ceiling, nan_policy, rhos, failures
) -> None:
    spec = LevenbergMarquardtSpec(
        initial=initial,
        decrease=decrease,
        increase=increase,
        min_damping=floor,
        max_damping=ceiling,
        nan_policy=nan_policy,
    )
    lm = LevenbergMarquardt(spec)
    hi = math.inf if ceiling is None else ceiling
    assert floor <= lm.value <= hi
    for step, rho in enumerate(rhos, start=1):
        before = lm.value
        if step <= len(failures) and failures[step - 1]:
            lm.on_nonfinite()
            assert lm.value == min(before * increase, hi) or lm.value == max(
                floor, min(before * increase, hi)
            )
        else:
            assert lm.update(rho=rho, loss=1.0, new_loss=1.0, step=step) is True
            after = lm.value
            if rho is None:
                assert after == before
            elif rho != rho:
                assert after == (before if nan_policy == "keep" else min(before * increase, hi))
            elif rho > 0.75:
                assert after <= before and after == max(floor, before * decrease)
            elif rho < 0.25:
                assert after >= before and after == min(hi, before * increase)
            else:
                assert after == before
        assert floor <= lm.value <= hi


@settings(max_examples=30, deadline=None)
@given(interval=st.integers(1, 5), steps=st.integers(1, 20))
def test_damping_adjusts_only_every_interval(interval: int, steps: int) -> None:
    lm = LevenbergMarquardt(LevenbergMarquardtSpec(initial=1.0, interval=interval))
    changes = 0
    for t in range(1, steps + 1):
        before = lm.value
        lm.update(rho=1.0, loss=1.0, new_loss=0.0, step=t)
        changes += lm.value != before
        assert lm.needs_new_loss(t) == (t % interval == 0)
    assert changes == steps // interval
