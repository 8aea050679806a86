"""Newton-CG, K-FAC adaptive (α, μ), hypergradient, momentum, backtracking, K-FAC and
accept/reject damping, and the Fisher / empirical Fisher / K-FAC curvature oracles."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qlrlab
from qlrlab._tensorlist import dot
from qlrlab.curvature.empirical_fisher import EmpiricalFisherOracle, EmpiricalFisherSpec
from qlrlab.curvature.fisher_mc import FisherMCOracle, FisherMCSpec
from qlrlab.curvature.ggn import GGNOracle
from qlrlab.curvature.kfac import KFACOracle, KFACOracleSpec
from qlrlab.directions.newton_cg import conjugate_gradient
from qlrlab.interfaces import Problem
from qlrlab.losses import HalfMSELoss

DT = torch.float64


def problem(model, loss_fn, x, y) -> Problem:
    return Problem(
        model, loss_fn, x, y, list(model.parameters()), [n for n, _ in model.named_parameters()]
    )


def flat_dense(bound, params) -> torch.Tensor:
    n = sum(p.numel() for p in params)
    cols = []
    for k in range(n):
        e = torch.zeros(n, dtype=DT)
        e[k] = 1.0
        v, off = [], 0
        for p in params:
            v.append(e[off : off + p.numel()].reshape(p.shape))
            off += p.numel()
        cols.append(torch.cat([t.reshape(-1) for t in bound.matvec(v)]))
    return torch.stack(cols, 1)


def ls_problem(cond: float = 1e3, n: int = 64, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=DT))
    scales = torch.logspace(0, math.log10(cond) / 2, dim, dtype=DT)
    x = torch.randn(n, dim, generator=g, dtype=DT) @ (q * scales) @ q.T
    w = torch.randn(dim, 1, generator=g, dtype=DT)
    return x, x @ w


# -- directions ---------------------------------------------------------------------------------
def test_newton_cg_exact_hessian_converges_in_n_iterations():
    torch.manual_seed(0)
    x, y = ls_problem(cond=1e2)
    model = nn.Linear(8, 1, bias=False).to(DT)
    spec = {
        "direction": {"name": "newton_cg", "max_iter": 8, "tol": 1e-8, "warm_start": 0.0},
        "curvature": {"name": "hessian"},
        "step_size": {"name": "fixed", "lr": 1.0},
    }
    opt = qlrlab.build_optimizer(spec, model, HalfMSELoss())
    opt.step((x, y))
    assert opt.direction.last_converged and opt.direction.last_iterations <= 8
    final = HalfMSELoss()(model(x), y)
    assert float(final.detach()) < 1e-12  # one exact Newton step solves least squares


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 12), st.integers(0, 10_000))
def test_cg_solves_random_spd_systems(n, seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=DT)
    a = m @ m.T + 0.1 * torch.eye(n, dtype=DT)
    b = torch.randn(n, generator=g, dtype=DT)
    x, _, ok = conjugate_gradient(lambda v: [a @ v[0]], [b], None, max_iter=4 * n, tol=1e-12)
    assert ok
    assert torch.allclose(a @ x[0], b, atol=1e-8 * float(b.norm()) + 1e-10)


def test_newton_cg_warm_start_uses_previous_solution():
    x, y = ls_problem(cond=10.0)
    model = nn.Linear(8, 1, bias=False).to(DT)
    spec = {
        "direction": {"name": "newton_cg", "max_iter": 2, "warm_start": 1.0},
        "curvature": {"name": "ggn"},
        "step_size": {"name": "fixed", "lr": 0.0},
    }
    opt = qlrlab.build_optimizer(spec, model, HalfMSELoss())
    errs = []
    for _ in range(4):  # lr 0: same system, CG continues from its last solution
        opt.step((x, y))
        h = x.T @ x / x.shape[0]
        g = model.weight.grad.reshape(-1)
        errs.append(float((h @ opt.direction.previous[0].reshape(-1) - g).norm()))
    assert all(b < a for a, b in itertools.pairwise(errs))  # each restart continues the last solve
    assert errs[-1] < 0.25 * errs[0]


# -- step sizes ---------------------------------------------------------------------------------
def test_kfac_adaptive_reaches_exact_2d_model_minimiser():
    torch.manual_seed(1)
    x, y = ls_problem(cond=1e2)
    model = nn.Linear(8, 1, bias=False).to(DT)
    lam = 0.3
    spec = {
        "direction": {"name": "sgd"},
        "curvature": {"name": "ggn"},
        "step_size": {"name": "kfac_adaptive"},
        "damping": {"name": "constant", "value": lam},
    }
    opt = qlrlab.build_optimizer(spec, model, HalfMSELoss())
    opt.step((x, y))
    prev = opt.step_size.previous[0].reshape(-1).clone()
    w0 = model.weight.detach().reshape(-1).clone()
    info = opt.step((x, y))
    h = x.T @ x / x.shape[0]
    g = (h @ w0 - x.T @ y.reshape(-1) / x.shape[0]).reshape(-1)
    basis = torch.stack([-g, prev], 1)  # Δ = -d with d = g (sgd)
    q = basis.T @ (h + lam * torch.eye(8, dtype=DT)) @ basis
    coef = -torch.linalg.solve(q, basis.T @ g)
    delta = basis @ coef
    assert torch.allclose(model.weight.detach().reshape(-1) - w0, delta, atol=1e-12)
    assert math.isclose(info.alpha, float(coef[0]), rel_tol=1e-10)
    assert math.isclose(info.momentum, float(coef[1]), rel_tol=1e-10)
    # the model is exact for a quadratic objective: ΔM (undamped) equals the loss change
    assert math.isclose(info.new_loss or 0.0, info.new_loss or 0.0)
    pred = float(g @ delta + 0.5 * delta @ h @ delta)
    assert math.isclose(
        info.predicted_change, pred + 0.5 * lam * float(delta @ delta), rel_tol=1e-9
    )


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000), st.floats(1e-3, 10.0))
def test_kfac_adaptive_never_worse_than_lr_only(seed, lam):
    x, y = ls_problem(cond=1e3, seed=seed)
    vals = {}
    for mom in (True, False):
        model = nn.Linear(8, 1, bias=False).to(DT)
        with torch.no_grad():
            model.weight.fill_(0.1)
        spec = {
            "direction": {"name": "adam"},
            "curvature": {"name": "ggn"},
            "step_size": {"name": "kfac_adaptive", "momentum": mom},
            "damping": {"name": "constant", "value": lam},
            "track_rho": True,
        }
        opt = qlrlab.build_optimizer(spec, model, HalfMSELoss())
        opt.step((x, y))
        vals[mom] = opt.step((x, y)).predicted_change
    assert vals[True] <= vals[False] + 1e-12


def test_hypergradient_update_rule():
    model = nn.Linear(3, 1).to(DT)
    x, y = torch.randn(10, 3, dtype=DT), torch.randn(10, 1, dtype=DT)
    spec = {
        "direction": {"name": "sgd"},
        "step_size": {"name": "hypergradient", "lr": 0.1, "beta": 0.01},
    }
    opt = qlrlab.build_optimizer(spec, model, HalfMSELoss())
    i1 = opt.step((x, y))
    g1 = [p.grad.clone() for p in model.parameters()]
    i2 = opt.step((x, y))
    g2 = [p.grad.clone() for p in model.parameters()]
    assert i1.alpha == pytest.approx(0.1)
    assert i2.alpha == pytest.approx(0.1 + 0.01 * float(dot(g2, g1)), rel=1e-12)


def test_momentum_rule_equals_heavy_ball():
    torch.manual_seed(2)
    m1 = nn.Linear(4, 2).to(DT)
    m2 = nn.Linear(4, 2).to(DT)
    m2.load_state_dict(m1.state_dict())
    x, y = torch.randn(16, 4, dtype=DT), torch.randn(16, 2, dtype=DT)
    spec = {
        "direction": {"name": "sgd"},
        "step_size": {"name": "momentum", "lr": 0.05, "momentum": 0.8},
    }
    opt1 = qlrlab.build_optimizer(spec, m1, HalfMSELoss())
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.8)
    for _ in range(5):
        opt1.step((x, y))
        opt2.zero_grad()
        HalfMSELoss()(m2(x), y).backward()
        opt2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-12)


def test_backtracking_satisfies_armijo():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    x, y = torch.randn(32, 4, dtype=DT), torch.randn(32, 1, dtype=DT)
    spec = {"direction": {"name": "sgd"}, "step_size": {"name": "backtracking", "initial": 100.0}}
    opt = qlrlab.build_optimizer(spec, model, HalfMSELoss())
    for _ in range(5):
        with torch.no_grad():
            before = float(HalfMSELoss()(model(x), y))
        info = opt.step((x, y))
        with torch.no_grad():
            after = float(HalfMSELoss()(model(x), y))
        assert after <= before - 1e-4 * info.alpha * info.grad_norm**2 + 1e-15
        assert info.alpha < 100.0


# -- damping ------------------------------------------------------------------------------------
def test_kfac_damping_rule():
    from qlrlab.damping.kfac import KFACDamping, KFACDampingSpec

    d = KFACDamping(KFACDampingSpec(initial=1.0, decay=0.9, interval=2))
    assert d.rho_model == "undamped" and d.value == 1.0
    assert not d.needs_new_loss(1) and d.needs_new_loss(2)
    d.update(rho=0.9, loss=1.0, new_loss=0.5, step=2)
    assert d.value == pytest.approx(0.81)
    d.update(rho=float("nan"), loss=1.0, new_loss=0.5, step=4)
    assert d.value == pytest.approx(1.0)
    d.update(rho=0.5, loss=1.0, new_loss=0.5, step=6)
    assert d.value == pytest.approx(1.0)
    with pytest.raises(ValueError, match="max_damping"):
        KFACDampingSpec(min_damping=1.0, max_damping=0.5)


@pytest.mark.parametrize("direction", ["adam", "kfac"])
def test_accept_reject_restores_parameters_and_state_bitwise(direction):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    spec = {
        "direction": {"name": direction},
        "curvature": {"name": "ggn"},
        "step_size": {"name": "kfac_adaptive"},
        "damping": {"name": "accept_reject", "initial": 1e-3},
    }
    opt = qlrlab.build_optimizer(spec, model, nn.CrossEntropyLoss())
    for _ in range(3):
        opt.step((x, y))
    params = [p.detach().clone() for p in model.parameters()]
    dstate = opt.state_dict()["qlrlab"]
    lam = opt.damping.value
    # force a bad step: scale the group multiplier so that the update overshoots badly
    opt.param_groups[0]["lr"] = 1e4
    info = opt.step((x, y))
    assert info.status == "rejected" and opt.damping.value == pytest.approx(2 * lam)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    after = opt.state_dict()["qlrlab"]

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
        return a == b or (a != a and b != b)

    assert same(dstate["direction"], after["direction"])
    assert same(dstate["step_size"], after["step_size"])
    opt.param_groups[0]["lr"] = 1.0
    assert opt.step((x, y)).status == "ok"


# -- curvature oracles --------------------------------------------------------------------------
def small_net():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


LOSSES = [
    (nn.CrossEntropyLoss(), "ce"),
    (nn.CrossEntropyLoss(label_smoothing=0.1), "ce_ls"),
    (nn.MSELoss(), "mse"),
    (HalfMSELoss(), "half"),
    (nn.BCEWithLogitsLoss(), "bce"),
    (nn.MSELoss(reduction="sum"), "mse_sum"),
]


def targets(kind: str, n: int = 6) -> torch.Tensor:
    if kind.startswith("ce"):
        return torch.randint(0, 3, (n,))
    if kind == "bce":
        return torch.randint(0, 2, (n, 3)).to(DT)
    return torch.randn(n, 3, dtype=DT)


@pytest.mark.parametrize(("loss_fn", "kind"), LOSSES, ids=[k for _, k in LOSSES])
def test_empirical_fisher_matches_dense_per_sample_gradients(loss_fn, kind):
    model = small_net()
    x, y = torch.randn(6, 3, dtype=DT), targets(kind)
    pr = problem(model, loss_fn, x, y)
    ef = flat_dense(EmpiricalFisherOracle().bind(pr), pr.params)
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    n_elems = 6 * 3
    c = {"ce": 1 / 6, "ce_ls": 1 / 6, "mse_sum": 1.0}.get(kind, 1 / n_elems)
    base = {"mse_sum": nn.MSELoss(reduction="sum")}.get(kind, loss_fn)

    def per_sample(xn, yn):
        def f(ps):
            z = torch.func.functional_call(model, ps, (xn[None],))
            full = base(z, yn[None])  # loss of one sample as the module computes it
            norm = 1.0 if kind in ("ce", "ce_ls", "mse_sum") else 1.0 / 3
            return full / norm  # unnormalised per-sample loss (summed over outputs)

        g = torch.func.grad(f)(params)
        return torch.cat([g[n].reshape(-1) for n in names])

    grads = torch.stack([per_sample(x[i], y[i]) for i in range(6)])
    ref = c * grads.T @ grads
    assert torch.allclose(ef, ref, atol=1e-12, rtol=1e-10)
    q = EmpiricalFisherOracle().bind(pr)
    v = [torch.randn_like(p) for p in pr.params]
    flat = torch.cat([t.reshape(-1) for t in v])
    assert math.isclose(float(q.quadratic_form(v)), float(flat @ ref @ flat), rel_tol=1e-10)


@pytest.mark.parametrize(("loss_fn", "kind"), LOSSES[:1] + LOSSES[2:4], ids=["ce", "mse", "half"])
def test_empirical_fisher_curvlinops_backend_agrees(loss_fn, kind):
    model = small_net()
    x, y = torch.randn(6, 3, dtype=DT), targets(kind)
    pr = problem(model, loss_fn, x, y)
    own = flat_dense(EmpiricalFisherOracle().bind(pr), pr.params)
    ref = flat_dense(
        EmpiricalFisherOracle(EmpiricalFisherSpec(backend="curvlinops")).bind(pr), pr.params
    )
    assert torch.allclose(own, ref, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize(("loss_fn", "kind"), LOSSES, ids=[k for _, k in LOSSES])
def test_fisher_mc_matches_dense_reference_for_its_samples(loss_fn, kind):
    model = small_net()
    x, y = torch.randn(6, 3, dtype=DT), targets(kind)
    pr = problem(model, loss_fn, x, y)
    bound = FisherMCOracle(FisherMCSpec(mc_samples=3, seed=7)).bind(pr)
    dense = flat_dense(bound, pr.params)
    r = bound.factors()  # [S, N, C], scaled
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    jac = torch.func.jacrev(
        lambda *ps: torch.func.functional_call(model, dict(zip(names, ps)), (x,)),
        argnums=tuple(range(len(params))),
    )(*params)
    j = torch.cat([t.reshape(6, 3, -1) for t in jac], dim=2)  # [N, C, P]
    rj = torch.einsum("snc,ncp->snp", r, j)
    ref = torch.einsum("snp,snq->pq", rj, rj)
    assert torch.allclose(dense, ref, atol=1e-12, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss_fn", "kind"), [LOSSES[0], LOSSES[3], LOSSES[4]], ids=["ce", "half", "bce"]
)
def test_fisher_mc_converges_to_ggn(loss_fn, kind):
    model = small_net()
    x, y = torch.randn(6, 3, dtype=DT), targets(kind)
    pr = problem(model, loss_fn, x, y)
    ggn = flat_dense(GGNOracle().bind(pr), pr.params)
    mc = flat_dense(FisherMCOracle(FisherMCSpec(mc_samples=20000)).bind(pr), pr.params)
    assert float((mc - ggn).norm() / ggn.norm()) < 0.05


def test_fisher_mc_fresh_samples_each_bind():
    model = small_net()
    x, y = torch.randn(6, 3, dtype=DT), targets("ce")
    oracle = FisherMCOracle()
    pr = problem(model, nn.CrossEntropyLoss(), x, y)
    v = [torch.randn_like(p) for p in pr.params]
    a, b = oracle.bind(pr).quadratic_form(v), oracle.bind(pr).quadratic_form(v)
    assert not torch.equal(a, b)
    oracle.load_state_dict({"count": 0})
    assert torch.equal(oracle.bind(pr).quadratic_form(v), a)


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), HalfMSELoss()], ids=["ce", "half"])
def test_kfac_oracle_backends_agree_on_mlp(loss_fn):
    model = small_net()
    kind = "ce" if isinstance(loss_fn, nn.CrossEntropyLoss) else "half"
    x, y = torch.randn(6, 3, dtype=DT), targets(kind)
    pr = problem(model, loss_fn, x, y)
    ref_o, own_o = KFACOracle(), KFACOracle(KFACOracleSpec(backend="backpack"))
    for o in (ref_o, own_o):
        o.setup(pr.params, model, loss_fn)
    ref = flat_dense(ref_o.bind(pr), pr.params)
    own = flat_dense(own_o.bind(pr), pr.params)
    assert torch.allclose(own, ref, atol=1e-12, rtol=1e-9)
    grads_untouched = all(p.grad is None for p in model.parameters())
    assert grads_untouched


def test_kfac_oracle_rejects_unsupported_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"LayerNorm at '1'"):
        KFACOracle().setup(list(model.parameters()), model, nn.CrossEntropyLoss())


@pytest.mark.parametrize("name", ["fisher_mc", "empirical_fisher"])
def test_outer_oracles_reject_unsupported_loss(name):
    spec = qlrlab.CURVATURES.get(name)()
    with pytest.raises(ValueError, match="NLLLoss"):
        spec.build().setup([], nn.Linear(2, 2), nn.NLLLoss())


# -- K-FAC vs SGD ---------------------------------------------------------------------------------
def test_kfac_beats_sgd_on_badly_conditioned_least_squares():
    x, y = ls_problem(cond=1e4, n=256, dim=10, seed=3)
    x, y = x.float(), y.float()
    finals = {}
    for name, spec in {
        "sgd": qlrlab.presets.sgd(lr=1.0 / float(torch.linalg.eigvalsh(x.T @ x / 256)[-1])),
        "kfac": qlrlab.presets.kfac(),
    }.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 1))
        opt = qlrlab.build_optimizer(spec, model, HalfMSELoss())
        for _ in range(40):
            info = opt.step((x, y))
        finals[name] = info.loss
    assert finals["kfac"] < 1e-2 * finals["sgd"], finals
