"""The L-BFGS direction against references (issue 18): dense BFGS, quadratic termination,
``torch.optim.LBFGS``, same-batch pairs, rejected steps, state."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import qlrlab
from qlrlab.directions.lbfgs import LBFGSDirection, LBFGSSpec, two_loop
from qlrlab.interfaces import DampingSchedule
from qlrlab.losses import HalfMSELoss
from qlrlab.step_sizes.fixed import FixedSpec, FixedStepSize

F64 = torch.float64


def dense_bfgs_inverse(s: torch.Tensor, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """:math:`H` from :math:`H_0 = \\gamma I` and the BFGS update for each pair, oldest first
    (Nocedal & Wright eq. 6.17), as a dense matrix."""
    n = s.shape[1]
    eye = torch.eye(n, dtype=s.dtype)
    h = gamma * eye
    for si, yi in zip(s, y):
        rho = 1.0 / (si @ yi)
        v = eye - rho * torch.outer(yi, si)
        h = v.T @ h @ v + rho * torch.outer(si, si)
    return h


def test_two_loop_equals_dense_bfgs_inverse_applied_to_g() -> None:
    g = torch.Generator().manual_seed(3)
    n, k = 7, 5
    a = torch.randn(n, n, generator=g, dtype=F64)
    hess = a @ a.T + n * torch.eye(n, dtype=F64)  # pairs of a convex quadratic: s^T y > 0
    s = torch.randn(k, n, generator=g, dtype=F64)
    y = s @ hess + 0.1 * torch.randn(k, n, generator=g, dtype=F64)
    assert bool(((s * y).sum(1) > 0).all())
    v = torch.randn(n, generator=g, dtype=F64)
    gamma = float(s[-1] @ y[-1] / (y[-1] @ y[-1]))
    expected = dense_bfgs_inverse(s, y, gamma) @ v
    got = two_loop(v, s, y)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)
    # H0 = I when scaling is off
    torch.testing.assert_close(two_loop(v, s, y, 1.0), dense_bfgs_inverse(s, y, 1.0) @ v)
    # without pairs: the gradient itself
    assert torch.equal(two_loop(v, s[:0], y[:0]), v)


# -- a convex quadratic in n unknowns: linear least squares ---------------------------------------
def _least_squares(n: int, seed: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, n, generator=g, dtype=F64)
    x = x * torch.linspace(0.5, 2.0, n, dtype=F64)  # condition number ~ 16
    target = torch.randn(40, 1, generator=g, dtype=F64)
    model = nn.Linear(n, 1, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(3.0 * torch.randn(1, n, generator=g, dtype=F64))
    theta_star = torch.linalg.lstsq(x, target).solution.reshape(1, n)
    return model, x, target, theta_star


@pytest.mark.parametrize("pairs", ["same_batch", "consecutive"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_exact_line_search_on_a_quadratic_terminates_in_n_plus_one_steps(
    pairs: str, seed: int
) -> None:
    """Quadratic step size (the exact line minimiser on a quadratic), no damping, full batch,
    history >= n: the minimiser to 1e-8 relative in <= n + 1 steps from any start."""
    n = 8
    model, x, target, theta_star = _least_squares(n, seed)
    spec = {
        "direction": {"name": "lbfgs", "history": n, "pairs": pairs},
        "curvature": {"name": "ggn"},
        "step_size": {"name": "quadratic"},
        "damping": {"name": "constant", "value": 0.0},
    }
    opt = qlrlab.build_optimizer(spec, model, HalfMSELoss())
    errors = []
    for _ in range(n + 1):
        info = opt.step((x, target))
        assert info.status == "ok"
        err = float(torch.linalg.vector_norm(model.weight.detach() - theta_star))
        errors.append(err / float(torch.linalg.vector_norm(theta_star)))
        if errors[-1] <= 1e-8:
            break
    assert errors[-1] <= 1e-8, errors
    assert len(errors) <= n + 1


def test_steepest_descent_control_does_not_terminate() -> None:
    """The same problem with d = g (SGD direction) is not solved in n + 1 steps, so the test
    above measures the quasi-Newton memory."""
    n = 8
    model, x, target, theta_star = _least_squares(n, 0)
    spec = {
        "direction": {"name": "sgd"},
        "curvature": {"name": "ggn"},
        "step_size": {"name": "quadratic"},
        "damping": {"name": "constant", "value": 0.0},
    }
    opt = qlrlab.build_optimizer(spec, model, HalfMSELoss())
    for _ in range(n + 1):
        opt.step((x, target))
    rel = torch.linalg.vector_norm(model.weight.detach() - theta_star) / torch.linalg.vector_norm(
        theta_star
    )
    assert float(rel) > 1e-4


# -- against torch.optim.LBFGS --------------------------------------------------------------------
def _tanh_net() -> nn.Module:
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(F64)
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    return net


def test_matches_torch_lbfgs_without_line_search_one_iteration_per_step() -> None:
    """torch.optim.LBFGS(max_iter=1, line_search_fn=None) takes θ ← θ + t d with t = lr after
    its first iteration and t = min(1, 1/‖g‖₁)·lr on the first; with ‖g₀‖₁ ≤ 1 the two define
    the same iteration as ``lbfgs`` (consecutive full-batch pairs) + ``fixed`` lr."""
    g = torch.Generator().manual_seed(1)
    x = 0.3 * torch.randn(32, 3, generator=g, dtype=F64)
    y = torch.randint(0, 2, (32,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    lr, history, steps = 0.5, 3, 12

    start = _tanh_net()
    grads0 = torch.autograd.grad(loss_fn(start(x), y), list(start.parameters()))
    assert float(sum(t.abs().sum() for t in grads0)) <= 1.0  # the precondition above

    for pairs in ("consecutive", "same_batch"):
        model = copy.deepcopy(start)
        ref = copy.deepcopy(start)
        spec = {
            "direction": {"name": "lbfgs", "history": history, "pairs": pairs},
            "step_size": {"name": "fixed", "lr": lr},
        }
        opt = qlrlab.build_optimizer(spec, model, loss_fn)
        topt = torch.optim.LBFGS(
            ref.parameters(), lr=lr, max_iter=1, history_size=history, line_search_fn=None,
            tolerance_grad=-1.0, tolerance_change=-1.0,
        )  # fmt: skip

        def closure(ref: nn.Module = ref, topt: torch.optim.Optimizer = topt) -> torch.Tensor:
            topt.zero_grad()
            loss = loss_fn(ref(x), y)
            loss.backward()
            return loss

        for _ in range(steps):
            topt.step(closure)
            opt.step((x, y))
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        assert opt.direction.skipped == 0
        assert opt.direction.s.shape[0] == history  # the memory was full and evicted


def test_direction_through_the_optimizer_equals_dense_bfgs_of_the_observed_pairs() -> None:
    """Record θ and g independently of the component; the fifth step's displacement must be
    −lr·H g₅ with H the dense BFGS matrix of the four observed pairs."""
    net = _tanh_net()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 3, generator=g, dtype=F64)
    y = torch.randint(0, 2, (24,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    lr = 0.3
    opt = qlrlab.build_optimizer(
        {"direction": {"name": "lbfgs", "history": 10, "pairs": "consecutive"},
         "step_size": {"name": "fixed", "lr": lr}},
        net, loss_fn,
    )  # fmt: skip

    def flat_state() -> tuple[torch.Tensor, torch.Tensor]:
        theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        gr = torch.autograd.grad(loss_fn(net(x), y), list(net.parameters()))
        return theta, torch.cat([t.reshape(-1) for t in gr])

    thetas, grads = [], []
    for _ in range(5):
        th, gr = flat_state()
        thetas.append(th)
        grads.append(gr)
        opt.step((x, y))
    theta_new = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    s = torch.stack([thetas[i + 1] - thetas[i] for i in range(4)])
    yy = torch.stack([grads[i + 1] - grads[i] for i in range(4)])
    gamma = float(s[-1] @ yy[-1] / (yy[-1] @ yy[-1]))
    expected = thetas[4] - lr * dense_bfgs_inverse(s, yy, gamma) @ grads[4]
    torch.testing.assert_close(theta_new, expected, rtol=1e-10, atol=1e-12)


# -- same-batch pairs --------------------------------------------------------------------------
def _bn_net() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2)).to(F64)


def test_same_batch_pair_is_the_gradient_difference_on_the_new_batch_without_side_effects() -> None:
    net = _bn_net()
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(16, 3, generator=g, dtype=F64), torch.randint(0, 2, (16,), generator=g))
        for _ in range(2)
    ]
    opt = qlrlab.build_optimizer(
        {"direction": {"name": "lbfgs", "pairs": "same_batch"},
         "step_size": {"name": "fixed", "lr": 0.1}},
        net, loss_fn,
    )  # fmt: skip
    theta0 = copy.deepcopy(net)
    opt.step(batches[0])
    theta1 = copy.deepcopy(net)
    expected_buffers = copy.deepcopy(net)
    expected_buffers(batches[1][0])  # one train-mode forward: what the gradient pass does
    opt.step(batches[1])

    def grad(m: nn.Module) -> torch.Tensor:
        m = copy.deepcopy(m)
        m[1].track_running_stats = False  # batch statistics, no buffer writes
        gr = torch.autograd.grad(loss_fn(m(batches[1][0]), batches[1][1]), list(m.parameters()))
        return torch.cat([t.reshape(-1) for t in gr])

    flat = lambda m: torch.cat([p.detach().reshape(-1) for p in m.parameters()])  # noqa: E731
    d = opt.direction
    assert d.s.shape[0] == 1
    torch.testing.assert_close(d.s[0], flat(theta1) - flat(theta0), rtol=0, atol=0)
    torch.testing.assert_close(d.y[0], grad(theta1) - grad(theta0), rtol=1e-12, atol=1e-14)
    # buffers as after exactly one forward; .grad is the optimiser's own gradient at θ1
    for b, e in zip(net.buffers(), expected_buffers.buffers()):
        assert torch.equal(b, e)
    g1 = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    torch.testing.assert_close(g1, grad(theta1), rtol=1e-12, atol=1e-14)


# -- rejected steps --------------------------------------------------------------------------
class RejectSteps(DampingSchedule):
    """Rejects the listed steps (λ = 0)."""

    may_reject = True

    def __init__(self, reject: set[int]) -> None:
        super().__init__()
        self.reject = reject

    @property
    def value(self) -> float:
        return 0.0

    def update(self, *, rho: float | None, loss: float, new_loss: float | None, step: int) -> bool:
        return step not in self.reject


@pytest.mark.parametrize("pairs", ["same_batch", "consecutive"])
def test_rejected_step_never_enters_the_memory(pairs: str) -> None:
    net = _tanh_net()
    g = torch.Generator().manual_seed(7)
    batches = [
        (torch.randn(16, 3, generator=g, dtype=F64), torch.randint(0, 2, (16,), generator=g))
        for _ in range(6)
    ]
    direction = LBFGSDirection(LBFGSSpec(pairs=pairs))  # type: ignore[arg-type]
    opt = qlrlab.ComposedOptimizer(
        None, model=net, loss_fn=nn.CrossEntropyLoss(), direction=direction,
        step_size=FixedStepSize(FixedSpec(lr=0.2)), damping=RejectSteps({3, 4}),
    )  # fmt: skip
    accepted = [torch.cat([p.detach().reshape(-1) for p in net.parameters()])]
    before: dict[str, Any] = {}
    for t, b in enumerate(batches, start=1):
        if t == 3:
            before = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                      for k, v in direction.state_dict().items()}  # fmt: skip
        info = opt.step(b)
        assert info.status == ("rejected" if t in (3, 4) else "ok")
        theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
        if info.status == "ok":
            accepted.append(theta)
        else:
            assert torch.equal(theta, accepted[-1])
        if t == 4:  # two rejections in a row: state exactly as before step 3
            after = direction.state_dict()
            for k, v in before.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(after[k], v), k
                else:
                    assert after[k] == v, k
    # every stored displacement is a difference of consecutive accepted iterates
    diffs = [accepted[i + 1] - accepted[i] for i in range(len(accepted) - 1)]
    for s in direction.s:
        assert any(torch.equal(s, d) for d in diffs)
    assert direction.s.shape[0] == len(diffs) - 1  # the newest step's pair forms next time


def test_state_dict_round_trip_is_bit_identical() -> None:
    g = torch.Generator().manual_seed(9)
    batches = [
        (torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g)) for _ in range(8)
    ]
    spec = {"direction": {"name": "lbfgs", "history": 3}, "step_size": {"name": "fixed", "lr": 0.2}}
    net = _tanh_net().float()
    opt = qlrlab.build_optimizer(spec, net, nn.CrossEntropyLoss())
    for b in batches[:4]:
        opt.step(b)
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    rest_a = [opt.step(b).as_dict() for b in batches[4:]]
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    net2 = _tanh_net().float()
    net2.load_state_dict(ckpt["model"])
    opt2 = qlrlab.build_optimizer(spec, net2, nn.CrossEntropyLoss())
    opt2.load_state_dict(ckpt["opt"])
    rest_b = [opt2.step(b).as_dict() for b in batches[4:]]
    assert rest_a == rest_b
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)


def test_pair_skipping_rule() -> None:
    d = LBFGSDirection(LBFGSSpec(eps=0.5))
    d.setup([torch.zeros(2, dtype=F64)], nn.Linear(1, 1), nn.MSELoss())
    s = torch.tensor([1.0, 0.0], dtype=F64)
    d._add_pair(s, torch.tensor([1.0, 1.0], dtype=F64))  # cos = 0.707 > 0.5: kept
    d._add_pair(s, torch.tensor([1.0, 2.0], dtype=F64))  # cos = 0.447 <= 0.5: skipped
    d._add_pair(s, torch.tensor([-1.0, 0.0], dtype=F64))  # negative curvature: skipped
    assert d.s.shape[0] == 1 and d.skipped == 2


def test_spec_validation_and_mixed_dtypes() -> None:
    with pytest.raises(ValidationError, match="history"):
        LBFGSSpec(history=0)
    with pytest.raises(ValidationError, match="pairs"):
        LBFGSSpec(pairs="sometimes")  # type: ignore[arg-type]
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1).double())
    with pytest.raises(ValueError, match="one dtype and device"):
        qlrlab.build_optimizer({"direction": "lbfgs"}, net, nn.MSELoss())


# -- FAdam ---------------------------------------------------------------------------------------
def fadam_reference(
    params: list[torch.Tensor],
    grad_fn: Any,
    steps: int,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    eps2: float | None,
    c: float,
    p: float,
    weight_decay: float,
) -> tuple[list[torch.Tensor], dict[str, int]]:
    """Hwang (2024), Algorithm 1, written out element by element for each tensor."""
    theta = [t.detach().clone() for t in params]
    m = [torch.zeros_like(t) for t in theta]
    fim = [torch.zeros_like(t) for t in theta]
    events = {"clip_nat": 0, "clip_wd": 0, "adaptive_eps": 0}
    for t in range(1, steps + 1):
        grads = grad_fn(theta)
        b2 = beta2 * (1 - beta2 ** (t - 1)) / (1 - beta2**t)
        new_theta = []
        for i, g in enumerate(grads):
            fim[i] = b2 * fim[i] + (1 - b2) * g * g
            rms_g = float(torch.sqrt(torch.mean(g * g)))
            e = eps if eps2 is None else min(eps, eps2 * rms_g)
            if eps2 is not None and eps2 * rms_g < eps:
                events["adaptive_eps"] += 1
            base = fim[i] ** p + e ** (2 * p)
            gbar = g / base
            rms = float(torch.sqrt(torch.mean(gbar * gbar)))
            if rms / c > 1:
                events["clip_nat"] += 1
            gbar = gbar / max(1.0, rms / c)
            m[i] = beta1 * m[i] + (1 - beta1) * gbar
            gw = theta[i] / base
            rms_w = float(torch.sqrt(torch.mean(gw * gw)))
            if rms_w / c > 1:
                events["clip_wd"] += 1
            gw = gw / max(1.0, rms_w / c)
            new_theta.append(theta[i] - lr * (m[i] + weight_decay * gw))
        theta = new_theta
    return theta, events


@pytest.mark.parametrize(
    "hp",
    [
        {"eps": 1e-8, "eps2": 0.01, "c": 1.0, "p": 0.5, "weight_decay": 0.0},
        {"eps": 1e-2, "eps2": 0.01, "c": 0.5, "p": 0.5, "weight_decay": 0.1},
        {"eps": 1e-3, "eps2": None, "c": 2.0, "p": 0.4, "weight_decay": 0.01},
    ],
)
def test_fadam_matches_a_hand_written_reference_over_25_steps(hp: dict[str, Any]) -> None:
    net = _tanh_net()
    g = torch.Generator().manual_seed(11)
    x = torch.randn(20, 3, generator=g, dtype=F64)
    y = torch.randint(0, 2, (20,), generator=g)
    loss_fn = nn.CrossEntropyLoss()
    names = [n for n, _ in net.named_parameters()]
    lr, steps = 0.05, 25

    def grad_fn(theta: list[torch.Tensor]) -> list[torch.Tensor]:
        th = [t.clone().requires_grad_(True) for t in theta]
        out = torch.func.functional_call(net, dict(zip(names, th)), (x,))
        return list(torch.autograd.grad(loss_fn(out, y), th))

    expected, events = fadam_reference(
        list(net.parameters()), grad_fn, steps, lr=lr, beta1=0.9, beta2=0.999, **hp
    )
    spec = {
        "direction": {"name": "fadam", "beta1": 0.9, "beta2": 0.999, **hp},
        "step_size": {"name": "fixed", "lr": lr},
    }
    opt = qlrlab.build_optimizer(spec, net, loss_fn)
    for _ in range(steps):
        assert opt.step((x, y)).status == "ok"
    for p_, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p_.detach(), e, rtol=1e-12, atol=1e-14)
    if hp["c"] == 0.5:  # the second case exercises clipping and the adaptive epsilon
        assert events["clip_nat"] > 0 and events["clip_wd"] > 0 and events["adaptive_eps"] > 0


def test_fadam_second_moment_is_adams_bias_corrected_one() -> None:
    """With F0 = 0 the debiased EMA equals Adam's v_t / (1 - β2^t)."""
    net = _tanh_net()
    g = torch.Generator().manual_seed(12)
    batches = [
        (torch.randn(8, 3, generator=g, dtype=F64), torch.randint(0, 2, (8,), generator=g))
        for _ in range(6)
    ]
    fad = qlrlab.build_optimizer({"direction": "fadam"}, copy.deepcopy(net), nn.CrossEntropyLoss())
    adam_net = copy.deepcopy(net)
    adam = torch.optim.Adam(adam_net.parameters(), lr=0.0)  # lr 0: same gradients every step
    fad.param_groups[0]["lr"] = 0.0
    for t, (xb, yb) in enumerate(batches, start=1):
        fad.step((xb, yb))
        adam.zero_grad()
        nn.CrossEntropyLoss()(adam_net(xb), yb).backward()
        adam.step()
        for f, p_ in zip(fad.direction.fim, adam_net.parameters()):
            v = adam.state[p_]["exp_avg_sq"]
            torch.testing.assert_close(f, v / (1 - 0.999**t), rtol=1e-12, atol=1e-18)


def test_fadam_state_round_trip_is_bit_identical() -> None:
    g = torch.Generator().manual_seed(13)
    batches = [
        (torch.randn(16, 3, generator=g), torch.randint(0, 2, (16,), generator=g)) for _ in range(8)
    ]
    spec = {"direction": {"name": "fadam", "weight_decay": 0.01}, "step_size": {"name": "fixed"}}
    net = _tanh_net().float()
    opt = qlrlab.build_optimizer(spec, net, nn.CrossEntropyLoss())
    for b in batches[:4]:
        opt.step(b)
    sd = copy.deepcopy(opt.state_dict())
    model_sd = copy.deepcopy(net.state_dict())
    rest_a = [opt.step(b).as_dict() for b in batches[4:]]
    net2 = _tanh_net().float()
    net2.load_state_dict(model_sd)
    opt2 = qlrlab.build_optimizer(spec, net2, nn.CrossEntropyLoss())
    opt2.load_state_dict(sd)
    assert rest_a == [opt2.step(b).as_dict() for b in batches[4:]]


def test_fadam_spec_names_and_bounds() -> None:
    s = qlrlab.DIRECTIONS.validate({"name": "fadam"})
    assert {"beta1", "beta2", "eps", "eps2", "c", "p", "weight_decay"} <= set(s.model_dump())
    for bad in ({"c": 0.0}, {"p": 0.0}, {"beta2": 1.0}, {"weight_decay": -1.0}):
        with pytest.raises(ValidationError):
            qlrlab.DIRECTIONS.validate({"name": "fadam", **bad})


# -- AdaFisher -----------------------------------------------------------------------------------
def _patches_by_loops(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Rows [N·T, C_in·kh·kw] of a conv input, built by slicing (c, i, j) row-major."""
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    xp = torch.nn.functional.pad(x, (pw, pw, ph, ph))
    n, _, hh, ww = xp.shape
    rows = []
    for b in range(n):
        for i in range(0, hh - kh + 1, sh):
            for j in range(0, ww - kw + 1, sw):
                rows.append(xp[b, :, i : i + kh, j : j + kw].reshape(-1))
    return torch.stack(rows)


def adafisher_reference_diagonals(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (H_D with the bias entry, S_D)} from retained layer outputs."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}
    m_ = copy.deepcopy(model)  # keep the model's buffers as they are
    for m in m_.modules():
        if getattr(m, "inplace", False):
            m.inplace = False  # the layer output's own gradient, not that of its ReLU
    handles = []
    for n, m in m_.named_modules():
        if n in layers:

            def hook(mod: nn.Module, a: Any, o: torch.Tensor, n: str = n) -> None:
                ins[n] = a[0].detach()
                o.retain_grad()
                outs[n] = o

            handles.append(m.register_forward_hook(hook))
    loss_fn(m_(x), y).backward()  # mean cross-entropy: n = len(y) terms
    for h in handles:
        h.remove()
    res = {}
    for n, m in layers.items():
        if isinstance(m, nn.Conv2d):
            rows = _patches_by_loops(ins[n], m)
            s = len(y) * outs[n].grad.permute(0, 2, 3, 1).reshape(-1, m.out_channels)
        else:
            rows = ins[n].reshape(-1, m.in_features)
            s = len(y) * outs[n].grad.reshape(-1, m.out_features)  # per-term gradients
        if m.bias is not None:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
        res[n] = ((rows**2).mean(0), (s**2).mean(0))
    return res


def _mm(v: torch.Tensor) -> torch.Tensor:
    return (v - v.min()) / (v.max() - v.min() + 1e-6)


def adafisher_dense_reference(
    model: nn.Module, loss_fn: nn.Module, batches: list[Any], *, lr: float, beta: float,
    gamma: float, damping: float, normalize: str,
) -> list[torch.Tensor]:  # fmt: skip
    """θ after each AdaFisher step, with F̃ assembled as a dense diagonal matrix over all
    parameters (identity for parameters of other layers) and d = solve(F̃, m̂)."""
    model = copy.deepcopy(model)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    m_t = [torch.zeros_like(p) for p in params]
    ema: dict[str, list[torch.Tensor]] = {}
    out = []
    for t, (x, y) in enumerate(batches, start=1):
        diags = adafisher_reference_diagonals(model, loss_fn, x, y)
        grads = torch.autograd.grad(loss_fn(model(x), y), params)
        for n, (h, s) in diags.items():
            if normalize == "before_ema":
                h, s = _mm(h), _mm(s)
            if n not in ema:
                ema[n] = [h, s]
            else:
                ema[n] = [gamma * ema[n][0] + (1 - gamma) * h, gamma * ema[n][1] + (1 - gamma) * s]
        fdiag = []
        for pn, p in zip(names, params):
            lname, kind = pn.rsplit(".", 1)
            if lname in layers:
                h, s = ema[lname]
                if normalize == "after_ema":
                    h, s = _mm(h), _mm(s)
                full = torch.outer(s, h) + damping  # [out, in' (+1)]
                block = (
                    full[:, :-1] if kind == "weight" and layers[lname].bias is not None else full
                )
                block = full[:, -1] if kind == "bias" else block
                fdiag.append(block.reshape(-1))
            else:
                fdiag.append(torch.ones(p.numel(), dtype=p.dtype))
        m_t = [beta * m + (1 - beta) * g for m, g in zip(m_t, grads)]
        mhat = torch.cat([m.reshape(-1) for m in m_t]) / (1 - beta**t)
        dense = torch.diag(torch.cat(fdiag))
        d = torch.linalg.solve(dense, mhat)
        with torch.no_grad():
            off = 0
            for p in params:
                p.sub_(lr * d[off : off + p.numel()].view_as(p))
                off += p.numel()
        out.append(torch.cat([p.detach().reshape(-1) for p in params]))
    return out


def _tiny_mlp() -> nn.Module:
    torch.manual_seed(21)
    return nn.Sequential(
        nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3, bias=False), nn.ReLU(),
        nn.Linear(3, 3),
    ).to(F64)  # fmt: skip


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(22)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(3, 2, 2, stride=2),
        nn.Flatten(), nn.Linear(2 * 2 * 2, 3),
    ).to(F64)  # fmt: skip


@pytest.mark.parametrize("normalize", ["after_ema", "before_ema"])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_adafisher_matches_a_dense_float64_reference(arch: str, normalize: str) -> None:
    g = torch.Generator().manual_seed(5)
    shape = (8, 4) if arch == "mlp" else (8, 2, 4, 4)
    batches = [
        (torch.randn(*shape, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g))
        for _ in range(6)
    ]
    model = _tiny_mlp() if arch == "mlp" else _tiny_cnn()
    loss_fn = nn.CrossEntropyLoss()
    hp = {"beta": 0.9, "gamma": 0.7, "damping": 1e-2}
    expected = adafisher_dense_reference(
        model, loss_fn, batches, lr=0.01, normalize=normalize, **hp
    )
    spec = {
        "direction": {"name": "adafisher", "normalize": normalize, **hp},
        "step_size": {"name": "fixed", "lr": 0.01},
    }
    opt = qlrlab.build_optimizer(spec, model, loss_fn)
    if arch == "mlp":
        assert len(opt.direction.layers) == 3 and len(opt.direction.fallback) == 2  # LayerNorm
    else:
        assert len(opt.direction.layers) == 3 and not opt.direction.fallback
    for b, e in zip(batches, expected):
        assert opt.step(b).status == "ok"
        got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        torch.testing.assert_close(got, e, rtol=1e-11, atol=1e-13)


def test_adafisher_factor_period_and_state_round_trip() -> None:
    g = torch.Generator().manual_seed(6)
    batches = [
        (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(8)
    ]
    spec = {
        "direction": {"name": "adafisher", "factor_period": 3, "fallback": "adam"},
        "step_size": {"name": "fixed", "lr": 0.01},
    }
    model = _tiny_mlp().float()
    opt = qlrlab.build_optimizer(spec, model, nn.CrossEntropyLoss())
    seen = []
    for b in batches[:4]:
        opt.step(b)
        seen.append(opt.direction.H[0].clone())
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])  # steps 2, 3 reuse
    assert not torch.equal(seen[2], seen[3])  # step 4 refreshes
    sd = copy.deepcopy(opt.state_dict())
    msd = copy.deepcopy(model.state_dict())
    rest_a = [opt.step(b).as_dict() for b in batches[4:]]
    model2 = _tiny_mlp().float()
    model2.load_state_dict(msd)
    opt2 = qlrlab.build_optimizer(spec, model2, nn.CrossEntropyLoss())
    opt2.load_state_dict(sd)
    assert rest_a == [opt2.step(b).as_dict() for b in batches[4:]]


def test_adafisher_fallback_error_names_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"'1.weight'.*LayerNorm.*fallback: identity"):
        qlrlab.build_optimizer(
            {"direction": {"name": "adafisher", "fallback": "error"}},
            _tiny_mlp(),
            nn.CrossEntropyLoss(),
        )


# -- presets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lbfgs", "fadam", "adafisher"])
def test_qlr_presets_are_adamqlr_with_the_direction_swapped(name: str) -> None:
    from qlrlab.presets import get_preset

    alone, qlr = get_preset(name), get_preset(f"{name}_qlr")
    reference = get_preset("adamqlr").model_dump()
    got = qlr.model_dump()
    assert got["direction"]["name"] == name == alone.direction.name
    assert got["direction"] == alone.model_dump()["direction"]
    for family in ("curvature", "step_size", "damping"):
        assert got[family] == reference[family], family
    own_rule = {"lbfgs": "backtracking", "fadam": "fixed", "adafisher": "fixed"}[name]
    assert alone.step_size.name == own_rule and alone.curvature is None


def test_new_presets_are_listed_by_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from qlrlab.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("lbfgs", "lbfgs_qlr", "fadam", "fadam_qlr", "adafisher", "adafisher_qlr"):
        assert any(line.split()[:1] == [name] for line in out.splitlines()), name


def test_adafisher_diagonals_are_the_kfac_back_ends_factor_diagonals() -> None:
    from qlrlab.backends.kfac_hooks import input_factor, output_factor
    from qlrlab.directions.adafisher import input_diagonal, output_diagonal

    g = torch.Generator().manual_seed(8)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1).to(F64)
    lin = nn.Linear(5, 2).to(F64)
    xs_conv = [torch.randn(6, 3, 7, 7, generator=g, dtype=F64) for _ in range(2)]  # two calls
    xs_lin = [torch.randn(6, 4, 5, generator=g, dtype=F64)]  # a sequence dimension
    for mod, xs in ((conv, xs_conv), (lin, xs_lin)):
        outs = [mod(x) for x in xs]
        grads = [torch.randn(o.shape, generator=g, dtype=F64) for o in outs]
        rows = sum(gr.numel() // gr.shape[1 if isinstance(mod, nn.Conv2d) else -1] for gr in grads)
        full_a = input_factor(mod, xs, approx="expand", joint_bias=True)
        full_g = output_factor(mod, [gr.unsqueeze(0) for gr in grads], scale=1.0 / rows)
        torch.testing.assert_close(input_diagonal(mod, xs, joint_bias=True), full_a.diagonal())
        torch.testing.assert_close(output_diagonal(mod, grads), full_g.diagonal())


@pytest.mark.parametrize("name", ["lbfgs", "fadam", "adafisher"])
def test_float32_state_loads_into_a_float64_copy(name: str) -> None:
    g = torch.Generator().manual_seed(14)
    batches = [
        (torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)
    ]
    spec = {"direction": name, "step_size": {"name": "fixed", "lr": 0.01}}
    model = _tiny_mlp().float()
    opt = qlrlab.build_optimizer(spec, model, nn.CrossEntropyLoss())
    for b in batches[:3]:
        opt.step(b)
    model64 = copy.deepcopy(model).double()
    opt64 = qlrlab.build_optimizer(spec, model64, nn.CrossEntropyLoss())
    opt64.load_state_dict(opt.state_dict())
    x, y = batches[3]
    assert opt64.step((x.double(), y)).status == "ok"
    for t in opt64.direction.state_dict().values():
        for u in t if isinstance(t, list) else [t]:
            assert not isinstance(u, torch.Tensor) or u.dtype == F64


def test_lbfgs_snapshot_by_reference_is_not_written_by_later_steps() -> None:
    """The undo record holds the stored tensors themselves (no copy); later steps must replace,
    never modify, them."""
    net = _tanh_net()
    g = torch.Generator().manual_seed(15)
    batches = [
        (torch.randn(8, 3, generator=g, dtype=F64), torch.randint(0, 2, (8,), generator=g))
        for _ in range(8)
    ]
    opt = qlrlab.build_optimizer(
        {"direction": {"name": "lbfgs", "history": 2}, "step_size": {"name": "fixed", "lr": 0.1}},
        net,
        nn.CrossEntropyLoss(),
    )
    for b in batches[:3]:
        opt.step(b)
    snap = opt.direction.snapshot()
    assert snap["s"] is opt.direction.s  # by reference
    frozen = {k: v.clone() for k, v in snap.items() if isinstance(v, torch.Tensor)}
    for b in batches[3:]:  # memory full: eviction on every step
        opt.step(b)
    for k, v in frozen.items():
        assert torch.equal(snap[k], v), k
    opt.direction.restore(snap)
    assert opt.direction.step == 3 and torch.equal(opt.direction.s, frozen["s"])


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_adafisher_statistics_do_not_depend_on_the_batch_size(loss: str) -> None:
    """The same examples twice (a batch twice as large) give the same factor diagonals: S_D is
    built from per-term gradients, not from the 1/n-scaled gradients of the mean loss."""
    g = torch.Generator().manual_seed(16)
    x = torch.randn(6, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (6,), generator=g) if loss == "ce" else torch.randn(6, 3, dtype=F64)
    loss_fn = nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()
    diags = []
    for xb, yb in ((x, y), (torch.cat([x, x]), torch.cat([y, y]))):
        model = _tiny_mlp()
        opt = qlrlab.build_optimizer({"direction": "adafisher"}, model, loss_fn)
        opt.step((xb, yb))
        diags.append((opt.direction.H, opt.direction.S))
    for a, b in zip(diags[0][0] + diags[0][1], diags[1][0] + diags[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
