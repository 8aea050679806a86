"""K-FAC direction: factors vs dense float64 GGN blocks and curvlinops, damping modes, fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qlrlab
from qlrlab.directions.kfac import KFACDirection, KFACSpec
from qlrlab.interfaces import Problem, StepContext
from qlrlab.losses import HalfMSELoss

DT = torch.float64


def dense_ggn(
    model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Dense GGN J^T H_z J of the loss as computed (torch.func, float64)."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def f(*ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    z = f(*params)
    jac = torch.func.jacrev(f, argnums=tuple(range(len(params))))(*params)
    j = torch.cat([t.reshape(z.numel(), -1) for t in jac], dim=1)
    h = torch.func.hessian(lambda zz: loss_fn(zz, y))(z).reshape(z.numel(), z.numel())
    return j.T @ h @ j


def run_pass(d: KFACDirection, model, loss_fn, x, y, lam: float = 1e-2):
    params = list(model.parameters())
    model.zero_grad()
    with d.gradient_pass(model) as twin:
        loss_fn(twin(x), y).backward()
    g = [p.grad.clone() for p in params]
    prob = Problem(model, loss_fn, x, y, params, [n for n, _ in model.named_parameters()])
    ctx = StepContext(prob, g, 1, lam, None, [{"lr": 1.0}], [0] * len(params))
    return g, d.compute(g, ctx)


def make_dir(model, loss_fn, **kw) -> KFACDirection:
    d = KFACDirection(KFACSpec(**{"fisher": "type-2", "curvature_ema": 0.0, **kw}))
    d.setup(list(model.parameters()), model, loss_fn)
    return d


def kfac_dense(d: KFACDirection) -> torch.Tensor:
    blocks = []
    for f in d.factors:
        assert f is not None
        blocks.append(torch.kron(f[0], f[1]) if len(f) == 2 else f[0])
    return torch.block_diag(*blocks)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


@pytest.mark.parametrize(
    "loss_fn",
    [nn.CrossEntropyLoss(), nn.MSELoss(), HalfMSELoss(), nn.CrossEntropyLoss(reduction="sum")],
    ids=["ce", "mse", "halfmse", "ce_sum"],
)
def test_factors_match_curvlinops_type2(loss_fn):
    from curvlinops import KFACLinearOperator

    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(7, 5, dtype=DT)
    ce = isinstance(loss_fn, nn.CrossEntropyLoss)
    y = torch.randint(0, 3, (7,)) if ce else torch.randn(7, 3, dtype=DT)
    d = make_dir(model, loss_fn)
    run_pass(d, model, loss_fn, x, y)
    ref_loss = nn.MSELoss() if isinstance(loss_fn, HalfMSELoss) else loss_fn
    scale = 0.5 if isinstance(loss_fn, HalfMSELoss) else 1.0
    params = list(model.parameters())
    k = KFACLinearOperator(
        model, ref_loss, params, [(x, y)], fisher_type="type-2", check_deterministic=False
    )
    dense_ref = scale * (k @ torch.eye(sum(p.numel() for p in params), dtype=DT))
    err = (kfac_dense(d) - dense_ref).norm() / dense_ref.norm()
    assert err < 1e-12


@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), HalfMSELoss()], ids=["ce", "halfmse"])
def test_exact_for_one_linear_layer_one_sample(loss_fn):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    x = torch.randn(1, 4, dtype=DT)
    y = (
        torch.tensor([2])
        if isinstance(loss_fn, nn.CrossEntropyLoss)
        else torch.randn(1, 3, dtype=DT)
    )
    d = make_dir(model, loss_fn)
    run_pass(d, model, loss_fn, x, y)
    ggn = dense_ggn(model, loss_fn, x, y)
    w, b = d.factors
    assert torch.allclose(torch.kron(w[0], w[1]), ggn[:12, :12], atol=1e-13, rtol=0)
    assert torch.allclose(b[0], ggn[12:, 12:], atol=1e-13, rtol=0)


@pytest.mark.parametrize(
    ("backend", "approx"), [("backpack", "expand"), ("hooks", "expand"), ("hooks", "reduce")]
)
def test_conv_factors_rescaled_to_kfc(backend, approx):
    """BackPACK's conv factors: expand-style A (rescaled by 1/T), G the exact bias GGN
    (reduce-style); the hook back-end: expand A = mean patch outer product, reduce G = the
    exact bias GGN."""
    torch.manual_seed(2)
    conv = nn.Conv2d(2, 3, 3)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).to(DT)
    x = torch.randn(5, 2, 6, 6, dtype=DT)
    y = torch.randint(0, 3, (5,))
    loss_fn = nn.CrossEntropyLoss()
    d = make_dir(model, loss_fn, backend=backend, kfac_approx=approx)
    assert d.backend == backend
    run_pass(d, model, loss_fn, x, y)
    g, a = d.factors[0]
    patches = F.unfold(x, 3)  # [N, in*k*k, T]
    n, _, t = patches.shape
    ggn = dense_ggn(model, loss_fn, x, y)
    nw = conv.weight.numel()
    bias_block = ggn[nw : nw + 3, nw : nw + 3]
    if approx == "expand":
        a_ref = torch.einsum("nit,njt->ij", patches, patches) / (n * t)
        assert torch.allclose(a, a_ref, atol=1e-12, rtol=0)
    if backend == "backpack" or approx == "reduce":
        assert torch.allclose(g, bias_block, atol=1e-12, rtol=0)  # G is the exact bias GGN
    ratio = torch.kron(g, a).trace() / ggn[:nw, :nw].trace()
    assert 0.04 < float(ratio) < 5.0  # BackPACK's unscaled A would be T = 16 times larger


@pytest.mark.parametrize(
    ("mode", "kw"),
    [("factored_pi", {"use_heuristic_damping": True}), ("exact", {"use_exact_damping": True})],
)
def test_direction_matches_kfac_inverse_operator(mode, kw):
    from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

    torch.manual_seed(3)
    model = mlp()
    x, y = torch.randn(9, 5, dtype=DT), torch.randint(0, 3, (9,))
    loss_fn = nn.CrossEntropyLoss()
    d = make_dir(model, loss_fn, damping_mode=mode)
    g, out = run_pass(d, model, loss_fn, x, y, lam=3e-2)
    params = list(model.parameters())
    k = KFACLinearOperator(
        model, loss_fn, params, [(x, y)], fisher_type="type-2", check_deterministic=False
    )
    ref = KFACInverseLinearOperator(k, damping=3e-2, **kw) @ g
    for a, b in zip(out, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_factored_modes_differ_from_exact():
    torch.manual_seed(4)
    model = mlp()
    x, y = torch.randn(9, 5, dtype=DT), torch.randint(0, 3, (9,))
    loss_fn = nn.CrossEntropyLoss()
    outs = {}
    for mode in ("factored_pi", "factored", "exact"):
        outs[mode] = run_pass(make_dir(model, loss_fn, damping_mode=mode), model, loss_fn, x, y)[1]
    diff = (outs["factored_pi"][0] - outs["exact"][0]).norm() / outs["exact"][0].norm()
    assert diff > 1e-3


class LNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x):
        return self.body(x)


def test_fallback_error_names_layer():
    model = LNNet().to(DT)
    with pytest.raises(ValueError, match=r"LayerNorm at 'body\.1'.*fallback"):
        make_dir(model, nn.CrossEntropyLoss(), fallback="error")


def test_fallback_identity_uses_gradient_for_batchnorm():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).to(DT)
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    loss_fn = nn.CrossEntropyLoss()
    running = model[1].running_mean.clone()
    d = make_dir(model, loss_fn, fallback="identity")
    g, out = run_pass(d, model, loss_fn, x, y)
    assert torch.equal(out[2], g[2]) and torch.equal(out[3], g[3])  # BN weight and bias
    assert not torch.equal(out[0], g[0])
    assert not torch.equal(model[1].running_mean, running)  # the gradient pass updates BN stats
    assert all(torch.isfinite(t).all() for t in out)


def test_fallback_diag_ggn_matches_dense_diagonal():
    torch.manual_seed(6)
    model = LNNet().to(DT)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    d = make_dir(model, loss_fn, fallback="diag_ggn")
    run_pass(d, model, loss_fn, x, y)
    ggn = dense_ggn(model, loss_fn, x, y)
    sizes = [p.numel() for p in model.parameters()]
    offs = torch.tensor([0, *sizes]).cumsum(0)
    for i in (2, 3):  # LayerNorm weight and bias
        ref = ggn.diagonal()[offs[i] : offs[i + 1]]
        assert torch.allclose(d.factors[i][0], ref, atol=1e-12, rtol=1e-9)


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.block = nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.inp(x))
        h = h + self.block(h)
        return self.out(h)


def test_residual_net_trains_and_user_model_stays_torch_func_safe():
    torch.manual_seed(7)
    model = ResNet()
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    loss_fn = nn.CrossEntropyLoss()
    opt = qlrlab.build_optimizer(qlrlab.presets.kfac(backend="backpack"), model, loss_fn)
    assert opt.direction.twin.converted
    infos = [opt.step((x, y)) for _ in range(6)]
    assert infos[-1].loss < infos[0].loss
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert not hasattr(loss_fn, "_backpack_extend")
    # the only hooks left on the loss module are the optimiser's own batch observer
    # (the loss(model(x), y); backward(); step() convention), none of BackPACK's
    owners = {type(getattr(h, "__self__", None)).__name__ for h in loss_fn._forward_hooks.values()}
    assert owners <= {"BatchObserver"}, owners
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    out, vjp = torch.func.vjp(
        lambda *ps: torch.func.functional_call(model, dict(zip(names, ps)), (x,)), *params
    )
    assert all(torch.isfinite(t).all() for t in vjp(torch.ones_like(out)))
    twin_params = {id(p) for p in opt.direction.twin.twin.parameters()}
    assert twin_params == {id(p) for p in model.parameters()}


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


def test_functional_op_rejected_with_fix():
    with pytest.raises(ValueError, match=r"relu.*nn\.ReLU"):
        make_dir(FunctionalNet(), nn.CrossEntropyLoss(), backend="backpack")


def test_unsupported_loss_rejected():
    with pytest.raises(ValueError, match="NLLLoss"):
        make_dir(mlp(), nn.NLLLoss())


def test_inverse_period_reuses_cached_inverses_and_state_roundtrip():
    torch.manual_seed(8)
    model = mlp()
    x, y = torch.randn(9, 5, dtype=DT), torch.randint(0, 3, (9,))
    loss_fn = nn.CrossEntropyLoss()
    d = make_dir(model, loss_fn, inverse_period=3, curvature_ema=0.5)
    run_pass(d, model, loss_fn, x, y)
    inv1 = [t.clone() for t in d.inverses[0]]
    saved = d.state_dict()
    run_pass(d, model, loss_fn, x + 0.5, y, lam=1.0)
    assert all(torch.equal(a, b) for a, b in zip(inv1, d.inverses[0]))  # not refreshed
    assert not torch.equal(saved["factors"][0][1], d.factors[0][1])  # EMA moved
    d.load_state_dict(saved)
    assert d.step == 1 and torch.equal(d.factors[0][1], saved["factors"][0][1])


def test_mc_fisher_is_reproducible_and_float32_works():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    loss_fn = nn.CrossEntropyLoss()
    outs = []
    for _ in range(2):
        d = KFACDirection(KFACSpec(fisher="mc", mc_samples=2))
        d.setup(list(model.parameters()), model, loss_fn)
        torch.manual_seed(0)
        outs.append(run_pass(d, model, loss_fn, x, y)[1])
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert outs[0][0].dtype == torch.float32


def test_type2_requires_single_sample_spec():
    with pytest.raises(ValueError, match="mc_samples"):
        KFACSpec(fisher="type-2", mc_samples=4)


def test_no_warnings_leak_from_backpack():
    model = nn.Sequential(nn.Linear(3, 2))
    opt = qlrlab.build_optimizer(qlrlab.presets.kfac(), model, nn.CrossEntropyLoss())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step((torch.randn(4, 3), torch.randint(0, 2, (4,))))


def test_diag_ggn_direction_matches_dense_diagonal_with_layernorm():
    from qlrlab.directions.diag_ggn import DiagGGNDirection, DiagGGNSpec

    torch.manual_seed(10)
    model = LNNet().to(DT)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    d = DiagGGNDirection(DiagGGNSpec(curvature_ema=0.0))
    params = list(model.parameters())
    d.setup(params, model, loss_fn)
    model.zero_grad()
    with d.gradient_pass(model) as twin:
        loss_fn(twin(x), y).backward()
    g = [p.grad.clone() for p in params]
    prob = Problem(model, loss_fn, x, y, params, [n for n, _ in model.named_parameters()])
    out = d.compute(g, StepContext(prob, g, 1, 0.1, None, [{"lr": 1.0}], [0] * len(params)))
    diag = dense_ggn(model, loss_fn, x, y).diagonal()
    ref = torch.cat([t.reshape(-1) for t in g]) / (diag + 0.1)
    assert torch.allclose(torch.cat([t.reshape(-1) for t in out]), ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("arch", ["mlp", "cnn_bn", "frozen_first"])
def test_loss_at_the_new_parameters_comes_from_the_cached_tangents(monkeypatch, arch: str) -> None:
    """K-FAC's update is -alpha d + mu delta_prev; the loss at theta + delta (for rho) is
    computed from the first layer's cached tangents of d and delta_prev (no new product with
    the batch) and equals a fresh forward at the new parameters (float64)."""
    from qlrlab.backends import fastpath

    torch.manual_seed(0)
    if arch == "cnn_bn":
        model = nn.Sequential(
            nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5)
        )
        shape = (32, 2, 8, 8)
    else:
        model = nn.Sequential(nn.Flatten(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))
        shape = (64, 20)
    model = model.to(DT)
    if arch == "frozen_first":  # the first optimised layer is the second Linear: recomputed
        model[1].requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = qlrlab.build_optimizer("kfac", model, nn.CrossEntropyLoss(), params=params)
    used = []
    real = fastpath.ChainTangents.new_output_combination

    def spy(self, terms):
        out = real(self, terms)
        used.append((len(terms), out is not None))
        return out

    monkeypatch.setattr(fastpath.ChainTangents, "new_output_combination", spy)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x = torch.randn(*shape, generator=g, dtype=DT)
        y = torch.randint(0, 5, (shape[0],), generator=g)
        info = opt.step((x, y))
        assert info.status == "ok"
        with torch.no_grad():
            model.train()
            fresh = float(nn.CrossEntropyLoss()(model(x), y))
        assert info.new_loss == pytest.approx(fresh, rel=1e-12, abs=1e-12)
    assert used[0] == (1, True)  # the first step: no momentum, -alpha d only
    assert used[1:] == [(2, True)] * 3  # then -alpha d + mu delta_prev


@pytest.mark.parametrize("arch", ["mlp", "seq", "no_bias"])
def test_the_two_tangents_share_one_product_and_equal_separate_ones(monkeypatch, arch: str) -> None:
    """K-FAC's 2x2 model needs the tangents of d and delta_prev: the first hidden layer's two
    come from one product with its input; the Gram matrix and the steps equal those of two
    separate tangent passes (float64)."""
    import copy

    from qlrlab.backends import fastpath

    torch.manual_seed(0)
    bias = arch != "no_bias"
    if arch == "seq":  # a [B, T, C] input: the product runs over the last dimension
        model = nn.Sequential(nn.Linear(6, 12, bias=bias), nn.ReLU(), nn.Linear(12, 5))
        shape, loss = (16, 4, 6), HalfMSELoss()
    else:
        model = nn.Sequential(nn.Linear(20, 16, bias=bias), nn.ReLU(), nn.Linear(16, 5))
        shape, loss = (64, 20), nn.CrossEntropyLoss()
    model = model.to(DT)
    twin = copy.deepcopy(model)
    calls = []
    real = fastpath.ChainTangents.first_tangents

    def batched(self, vs):
        out = real(self, vs)
        calls.append(out is not None)
        return out

    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        x = torch.randn(*shape, generator=g, dtype=DT)
        y = torch.randn(*shape[:-1], 5, generator=g, dtype=DT) if arch == "seq" else (
            torch.randint(0, 5, (shape[0],), generator=g)
        )
        batches.append((x, y))
    infos = {}
    for name, m, patch in (("one", model, batched), ("two", twin, lambda self, vs: None)):
        monkeypatch.setattr(fastpath.ChainTangents, "first_tangents", patch)
        opt = qlrlab.build_optimizer("kfac", m, loss)
        infos[name] = [opt.step(b) for b in batches]
    assert calls == [False, True, True, True]  # step 1 has d only; then d and delta_prev
    for a, b in zip(infos["one"], infos["two"]):
        assert a.status == b.status == "ok"
        for f in ("alpha", "momentum", "curvature", "new_loss", "rho"):
            assert getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-10, abs=1e-12), f
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
