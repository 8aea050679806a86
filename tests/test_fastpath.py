"""The fast GGN path (cached activations) agrees with the general torch.func path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qlrlab import build_optimizer
from qlrlab.curvature._fastpath import fast_path_unsupported
from qlrlab.curvature.ggn import BoundGGN, FastBoundGGN, GGNOracle, GGNSpec
from qlrlab.interfaces import Problem
from qlrlab.losses import HalfMSELoss

DT = torch.float64


class FlattenInForward(nn.Module):
    """A custom forward that reshapes by a view between leaves (still a chain)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.Tanh()
        self.fc = nn.Linear(3 * 6 * 6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1))


class Residual(nn.Module):
    """Not a chain: must fall back to the general path."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) + x)


def _mlp(out: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, out)
    )


def _cnn(out: int, bn: bool = True) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4) if bn else nn.Identity(),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect"),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(5 * 2 * 2, 8),
        nn.BatchNorm1d(8),
        nn.GELU(),  # no special rule: torch.func.jvp of this layer alone
        nn.Linear(8, out),
    )


def _data(
    kind: str, loss: str, n: int = 16
) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = 3
    if kind == "mlp":
        model = _mlp(out)
        x = torch.randn(n, 3, 4, generator=g, dtype=DT)
    elif kind == "cnn":
        model = _cnn(out)
        x = torch.randn(n, 1, 8, 8, generator=g, dtype=DT)
    else:
        model = FlattenInForward()
        out = 4
        x = torch.randn(n, 1, 6, 6, generator=g, dtype=DT)
    if loss == "ce":
        lf: nn.Module = nn.CrossEntropyLoss()
        y = torch.randint(0, out, (n,), generator=g)
    elif loss == "bce":
        lf = nn.BCEWithLogitsLoss()
        y = torch.rand(n, out, generator=g, dtype=DT)
    else:
        lf = HalfMSELoss() if loss == "halfmse" else nn.MSELoss()
        y = torch.randn(n, out, generator=g, dtype=DT)
    return model.to(DT), lf, x, y


def _spec(backend: str) -> dict:
    return {
        "direction": {"name": "adam"},
        "curvature": {"name": "ggn", "backend": backend},
        "step_size": {"name": "quadratic"},
        "damping": {"name": "levenberg_marquardt"},
        "track_rho": True,
    }


@pytest.mark.parametrize("kind", ["mlp", "cnn", "view"])
@pytest.mark.parametrize("loss", ["ce", "halfmse", "mse", "bce"])
@pytest.mark.parametrize("train", [True, False])
def test_fast_matches_general_over_steps(kind: str, loss: str, train: bool) -> None:
    torch.manual_seed(0)
    model, lf, x, y = _data(kind, loss)
    model.train(train)
    if not train:  # non-trivial running statistics for eval-mode BatchNorm
        with torch.no_grad():
            model.train()(x)
            model.eval()
    runs = {}
    for backend in ("fast", "jvp"):
        m = copy.deepcopy(model)
        opt = build_optimizer(_spec(backend), m, lf)
        infos = [opt.step((x, y)) for _ in range(4)]
        runs[backend] = (m, opt, infos)
    (mf, of, inf_f), (mj, _, inf_j) = runs["fast"], runs["jvp"]
    assert of.curvature.last_path == "fast"
    for a, b in zip(inf_f, inf_j):
        for key in ("alpha", "curvature", "new_loss", "rho", "damping", "loss"):
            va, vb = getattr(a, key), getattr(b, key)
            assert va == pytest.approx(vb, rel=1e-9, abs=1e-12), key
    for pa, pb in zip(mf.parameters(), mj.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-8)
    for ba, bb in zip(mf.buffers(), mj.buffers()):
        torch.testing.assert_close(ba, bb, rtol=1e-6, atol=1e-8)


def _bound_pair(model: nn.Module, lf: nn.Module, x: torch.Tensor, y: torch.Tensor, params=None):
    params = list(model.parameters()) if params is None else params
    oracle = GGNOracle(GGNSpec(backend="fast"))
    oracle.setup(params, model, lf)
    names = {id(p): n for n, p in model.named_parameters()}
    with oracle.gradient_pass(model) as mod:
        out = mod(x)
        loss = lf(out, y)
        loss.backward()
    prob = Problem(
        model=model, loss_fn=lf, inputs=x, targets=y, params=params,
        param_names=[names[id(p)] for p in params], outputs=out.detach(), loss=loss.detach(),
    )  # fmt: skip
    fast = oracle.bind(prob)
    assert isinstance(fast, FastBoundGGN)
    return fast, BoundGGN(prob)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_jvp_matvec_gram_and_shifted_loss(kind: str) -> None:
    torch.manual_seed(0)
    model, lf, x, y = _data(kind, "ce")
    fast, gen = _bound_pair(model, lf, x, y)
    vs = [[torch.randn_like(p) for p in model.parameters()] for _ in range(2)]
    zf, uf = fast.jvp(vs[0])
    zg, ug = gen.jvp(vs[0])
    torch.testing.assert_close(zf, zg)
    torch.testing.assert_close(uf, ug)
    torch.testing.assert_close(fast.quadratic_forms(vs), gen.quadratic_forms(vs))
    for a, b in zip(fast.matvec(vs[1]), gen.matvec(vs[1])):
        torch.testing.assert_close(a, b)
    # loss_after needs the direction of the latest jvp
    fast.quadratic_form(vs[0])
    alpha = torch.tensor(0.3, dtype=DT)
    got = fast.loss_after(alpha, vs[0])
    with torch.no_grad():
        for p, v in zip(model.parameters(), vs[0]):
            p.sub_(alpha * v)
        want = lf(model(x), y)
    assert got is not None
    torch.testing.assert_close(got, want)
    assert fast.loss_after(alpha, vs[1]) is None


def test_subset_of_parameters_and_bias_only_first_layer() -> None:
    torch.manual_seed(0)
    model, lf, x, y = _data("mlp", "halfmse")
    lin1, lin2 = model[1], model[3]
    params = [lin1.bias, lin2.weight]  # first layer: bias only (shift path with u = db)
    fast, gen = _bound_pair(model, lf, x, y, params)
    v = [torch.randn_like(p) for p in params]
    torch.testing.assert_close(fast.jvp(v)[1], gen.jvp(v)[1])
    fast.jvp(v)
    got = fast.loss_after(0.7, v)
    with torch.no_grad():
        for p, t in zip(params, v):
            p.sub_(0.7 * t)
        want = lf(model(x), y)
    torch.testing.assert_close(got, want)


def test_own_backend_falls_back_for_non_chains() -> None:
    torch.manual_seed(0)
    model = Residual().to(DT)
    x, y = torch.randn(8, 6, dtype=DT), torch.randint(0, 4, (8,))
    opt = build_optimizer(_spec("own"), model, nn.CrossEntropyLoss())
    opt.step((x, y))
    assert opt.curvature.last_path == "jvp"
    forced = build_optimizer(_spec("fast"), Residual().to(DT), nn.CrossEntropyLoss())
    with pytest.raises(RuntimeError, match="fast"):
        forced.step((x, y))


def test_inplace_activation_falls_back() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(8, 5, dtype=DT), torch.randn(8, 2, dtype=DT)
    opt = build_optimizer(_spec("own"), model, HalfMSELoss())
    ref = build_optimizer(_spec("jvp"), copy.deepcopy(model), HalfMSELoss())
    a, b = opt.step((x, y)), ref.step((x, y))
    assert opt.curvature.last_path == "jvp"
    assert a.alpha == pytest.approx(b.alpha, rel=1e-12)


def test_unsupported_layers_reported() -> None:
    m = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    why = fast_path_unsupported(m, list(m.parameters()))
    assert why is not None and "LayerNorm" in why
    with pytest.raises(ValueError, match="LayerNorm"):
        build_optimizer(_spec("fast"), m, HalfMSELoss())
    own = build_optimizer(_spec("own"), m, HalfMSELoss())
    assert own.curvature.fast_unsupported is not None


def test_dropout_active_falls_back_and_eval_dropout_is_fast() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(8, 5, dtype=DT), torch.randn(8, 2, dtype=DT)
    opt = build_optimizer(_spec("own"), model, HalfMSELoss())
    opt.step((x, y))
    assert opt.curvature.last_path == "jvp"
    model.eval()
    opt.step((x, y))
    assert opt.curvature.last_path == "fast"


def test_single_leaf_model_and_buffers_untouched() -> None:
    model = nn.Linear(4, 2).to(DT)
    x, y = torch.randn(8, 4, dtype=DT), torch.randn(8, 2, dtype=DT)
    fast = build_optimizer(_spec("fast"), model, HalfMSELoss())
    ref = build_optimizer(_spec("jvp"), copy.deepcopy(model), HalfMSELoss())
    for _ in range(3):
        a, b = fast.step((x, y)), ref.step((x, y))
        assert a.rho == pytest.approx(b.rho, rel=1e-9)
    bn = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)).to(DT)
    opt = build_optimizer(_spec("fast"), bn, HalfMSELoss())
    opt.step((x, y))
    after_grad_pass = [b.clone() for b in bn.buffers()]
    # one more gradient pass changes the running statistics exactly once (the extra passes
    # must not): compare with a plain forward in train mode
    twin = copy.deepcopy(bn)
    with torch.no_grad():
        twin(x)
    opt.step((x, y))
    assert int(bn[1].num_batches_tracked) == 2
    torch.testing.assert_close(bn[1].running_mean, twin[1].running_mean)
    assert not torch.equal(after_grad_pass[0], bn[1].running_mean)


@pytest.mark.parametrize("kind", ["sequential", "mlp"])
def test_hookless_sequential_runner_matches_hooks(kind: str) -> None:
    """Plain Sequential / MLP run the gradient pass through the recording runner (no hooks);
    a model-level hook forces the hook-based recorder; both give identical steps."""
    from qlrlab.curvature import _fastpath
    from qlrlab.models.mlp import MLP

    torch.manual_seed(0)
    if kind == "mlp":
        model = MLP([12, 7, 5, 3]).to(DT)
        x = torch.randn(16, 1, 3, 4, dtype=DT)  # MLP flattens inputs beyond 2-d itself
    else:
        model = nn.Sequential(nn.Linear(12, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(),
                              nn.Linear(5, 3)).to(DT)  # fmt: skip
        x = torch.randn(16, 12, dtype=DT)
    y = torch.randint(0, 3, (16,))
    hooked = copy.deepcopy(model)
    hooked.register_forward_pre_hook(lambda m, a: None)
    assert _fastpath._direct_chain(model) is not None
    assert _fastpath._direct_chain(hooked) is None
    oa = build_optimizer("adamqlr", model, nn.CrossEntropyLoss())
    ob = build_optimizer("adamqlr", hooked, nn.CrossEntropyLoss())
    for _ in range(3):
        a, b = oa.step((x, y)), ob.step((x, y))
        assert oa.curvature.last_path == ob.curvature.last_path == "fast"
        assert a.as_dict() == b.as_dict()
    for p, q in zip(model.parameters(), hooked.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "case",
    [
        "labels",
        "ignore",
        "probs",
        "spatial",
        "sum",
        "many_classes",
        "class_major_u",
        "class_major_z",
        "extreme",
    ],
)
def test_fused_ce_quadratic_form_matches_hvp(case: str) -> None:
    """Row-major (spatial, many classes) and class-major (few classes) forms agree with
    u^T (H_z u)."""
    from qlrlab.losses import output_hvp, output_quadratic_form

    torch.manual_seed(0)
    shape = {"spatial": (6, 4, 3, 2), "many_classes": (50, 40)}.get(case, (6, 4))
    z, u = torch.randn(shape, dtype=DT), torch.randn(shape, dtype=DT)
    if case == "extreme":  # overconfident logits: exp of the shifted logits underflows
        z = 300 * z
    if case == "class_major_u":  # what the fast path hands over for a small head
        u = u.t().contiguous().t()
    if case == "class_major_z":  # logits that are a transposed view must not be overwritten
        z = z.t().contiguous().t()
    lf = nn.CrossEntropyLoss(reduction="sum" if case == "sum" else "mean")
    if case == "probs":
        y = torch.softmax(torch.randn(shape, dtype=DT), 1)
    else:
        y = torch.randint(0, shape[1], (shape[0], *shape[2:]))
        if case == "ignore":
            y[1] = lf.ignore_index
    want = (u * output_hvp(lf, z, y, u)).sum()
    z_before = z.clone()
    got = output_quadratic_form(lf, z, y, u)
    assert torch.equal(z, z_before)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "case",
    ["mean", "sum", "ignore", "ignore_valid_class", "class_major_z", "extreme", "all_ignored"],
)
def test_class_major_cross_entropy_value_matches_the_module(case: str, dtype: torch.dtype) -> None:
    """loss_value computes a plain CrossEntropyLoss class-major with the module's value."""
    from qlrlab.losses import loss_value

    torch.manual_seed(0)
    z = torch.randn(300, 10, dtype=dtype) * (300.0 if case == "extreme" else 3.0)
    y = torch.randint(0, 10, (300,))
    ignore = 3 if case == "ignore_valid_class" else -100
    if case in ("ignore", "ignore_valid_class"):
        y[::7] = ignore
    if case == "all_ignored":
        y[:] = ignore
    if case == "class_major_z":
        z = z.t().contiguous().t()
    lf = nn.CrossEntropyLoss(reduction="sum" if case == "sum" else "mean", ignore_index=ignore)
    z_before = z.clone()
    got, want = loss_value(lf, z, y), lf(z, y)
    assert torch.equal(z, z_before)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)


def test_loss_value_calls_the_module_outside_the_plain_case() -> None:
    """Class weights, label smoothing, probability targets, many classes, hooks and
    subclasses with their own forward all go through the module itself."""
    from qlrlab.losses import loss_value

    torch.manual_seed(0)
    z, y = torch.randn(64, 5), torch.randint(0, 5, (64,))

    class Doubled(nn.CrossEntropyLoss):
        def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(input, target)

    hooked = nn.CrossEntropyLoss()
    hooked.register_forward_hook(lambda m, a, out: out + 1)
    cases = [
        (nn.CrossEntropyLoss(weight=torch.rand(5)), z, y),
        (nn.CrossEntropyLoss(label_smoothing=0.1), z, y),
        (nn.CrossEntropyLoss(), z, torch.softmax(torch.randn(64, 5), 1)),
        (nn.CrossEntropyLoss(), torch.randn(64, 40), torch.randint(0, 40, (64,))),
        (Doubled(), z, y),
        (hooked, z, y),
    ]
    for lf, zz, yy in cases:
        torch.testing.assert_close(loss_value(lf, zz, yy), lf(zz, yy), rtol=1e-6, atol=1e-6)
    with pytest.raises((IndexError, RuntimeError)):
        loss_value(nn.CrossEntropyLoss(), z, torch.full((64,), 7))


def _same_results_under_settings(
    monkeypatch, model, lf, x, y, settings, params=None, before=None, after_tangent=None
) -> None:
    """Under each setting (``_fastpath`` attributes to patch), bind the fast path and take the
    tangent, quadratic form and shifted loss of one random vector: the tangent must match the
    general path's, and all three must agree across settings and with the loss of the model
    moved to theta - 0.2 v. ``before(setting, fast, gen)`` runs after binding,
    ``after_tangent(setting, fast, u)`` after the tangent."""
    from qlrlab.curvature import _fastpath

    params = list(model.parameters()) if params is None else params
    results = []
    for setting in settings:
        for name, value in setting.items():
            monkeypatch.setattr(_fastpath, name, value)
        for p in model.parameters():
            p.grad = None
        fast, gen = _bound_pair(model, lf, x, y, params)
        if before is not None:
            before(setting, fast, gen)
        torch.manual_seed(1)
        v = [torch.randn_like(p) for p in params]
        _, u = fast.jvp(v)
        if after_tangent is not None:
            after_tangent(setting, fast, u)
        torch.testing.assert_close(u, gen.jvp(v)[1], rtol=1e-12, atol=1e-12)
        q = fast.quadratic_form(v)
        results.append((u, q, fast.loss_after(torch.tensor(0.2, dtype=DT), v)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        for p, t in zip(params, v):
            p.sub_(0.2 * t)
        torch.testing.assert_close(results[0][2], lf(model(x), y), rtol=1e-12, atol=1e-12)


def test_small_linear_head_runs_class_major_with_the_same_values(monkeypatch) -> None:
    """A Linear layer with few outputs returns transposed views (class-major products); with
    the threshold at 0 the row-major products give the same tangents and shifted loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 30), nn.ReLU(), nn.Linear(30, 5)).to(DT)
    x, y = torch.randn(64, 12, dtype=DT), torch.randint(0, 5, (64,))

    def layout(setting, fast, u) -> None:
        assert u.is_contiguous() == (setting["CLASS_MAJOR_MAX_OUT"] == 0)

    settings = [{"CLASS_MAJOR_MAX_OUT": 16}, {"CLASS_MAJOR_MAX_OUT": 0}]
    _same_results_under_settings(
        monkeypatch, model, nn.CrossEntropyLoss(), x, y, settings, after_tangent=layout
    )


@pytest.mark.parametrize("case", ["relu_from_x", "bool_mask", "frozen_head_weight", "no_bias"])
def test_blocked_relu_and_head_match_the_one_pass_tangent(monkeypatch, case: str) -> None:
    """A ReLU followed by a class-major head runs in blocks of rows (with a remainder block);
    tangents, quadratic form and shifted loss equal the unblocked path's, the general one's and
    the moved model's."""
    from qlrlab.curvature import _fastpath

    torch.manual_seed(0)
    bias = case != "no_bias"
    if case == "bool_mask":  # the second hidden layer's output is not kept: a boolean mask
        model = nn.Sequential(
            nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 6, bias=bias)
        )
    else:
        # 40 outputs from 30 inputs: the first layer's output is kept, the mask read from it
        model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 6, bias=bias))
    model = model.to(DT)
    params = list(model.parameters())
    if case == "frozen_head_weight":
        params = [p for p in params if p is not model[-1].weight]
    x = torch.randn(300, model[0].in_features, dtype=DT)
    y = torch.randint(0, 6, (300,))
    calls = []
    real = _fastpath._masked_head_class_major
    monkeypatch.setattr(
        _fastpath, "_masked_head_class_major", lambda *a: calls.append(1) or real(*a)
    )

    def mask_kind(setting, fast, gen) -> None:
        relu = fast.fast.chain[-2]
        assert (relu.mask is not None) == (case == "bool_mask")
        assert relu.relu_from_x == (case != "bool_mask")
        calls.clear()

    def blocked(setting, fast, u) -> None:
        assert len(calls) == (1 if setting["MASKED_HEAD_BLOCK"] < 10**12 else 0)

    # 32-row blocks (300 = 9 x 32 + 12), then unblocked
    settings = [{"MASKED_HEAD_BLOCK": 32 * 40}, {"MASKED_HEAD_BLOCK": 10**12}]
    _same_results_under_settings(
        monkeypatch, model, nn.CrossEntropyLoss(), x, y, settings, params, mask_kind, blocked
    )


def test_a_copied_model_is_a_new_model_to_every_optimiser(tmp_path):
    """``copy.deepcopy`` / ``torch.save`` of a model that an optimiser observes copy its hooks:
    the copy must not cost a new optimiser on the copied model the fast path, nor record into the
    original optimiser. Found by the contract suite: diag_ggn's resumed twin took the torch.func
    path and its alpha differed in the last bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    loss_fn = nn.CrossEntropyLoss()
    opt = build_optimizer("adamqlr", model, loss_fn)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    opt.step((x, y))
    copied = copy.deepcopy(model)
    assert copied._forward_pre_hooks  # a copy of the observing hook came along
    from qlrlab.backends.fastpath import _direct_chain

    assert _direct_chain(copied) is not None  # still run without hooks by the fast path
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    loss_fn(loaded(x), y).backward()
    loss_fn(copied(x), y).backward()
    assert opt._observer.model_calls == 0  # the copies' forwards are not the original's batch
    fresh = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))  # no hooks at all
    fresh.load_state_dict(copied.state_dict())
    twin = build_optimizer("adamqlr", copied, loss_fn)
    ref = build_optimizer("adamqlr", fresh, loss_fn)
    for _ in range(2):
        a, b = ref.step((x, y)), twin.step((x, y))
        assert twin.curvature.last_path == ref.curvature.last_path == "fast"
        assert a.alpha == b.alpha


def test_step_closure_records_the_callers_forward_for_the_fast_path():
    """In ``opt.step(closure)`` the caller's code runs the model: the recorder must watch it
    through hooks (a regression made it run the hook-free chain runner, which the closure never
    calls, so every closure step fell back to torch.func: 3.2x Adam instead of 1.7x)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    loss_fn = nn.CrossEntropyLoss()
    opt = build_optimizer("adamqlr", model, loss_fn)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    for _ in range(2):
        assert opt.step(closure).status == "ok"
        assert opt.curvature.last_path == "fast", opt.curvature.last_fallback
