"""Curvature oracles against dense float64 references built with torch.func (issue 2)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlrlab.curvature import GGNSpec, HessianSpec
from qlrlab.interfaces import Problem
from qlrlab.losses import HalfMSELoss
from tests._reference import dense_ggn, dense_hessian, to_flat

D = torch.float64


def _mlp(out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, out)).to(D)


def _cnn(out: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3 * 2 * 2, out)
    ).to(D)


def _case(kind: str, loss: str) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    out = 3
    model = _mlp(out) if kind == "mlp" else _cnn(out)
    x = torch.randn(7, 4, dtype=D) if kind == "mlp" else torch.randn(7, 2, 6, 6, dtype=D)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), x, torch.randint(0, out, (7,))
    if loss == "half_mse":
        return model, HalfMSELoss(), x, torch.randn(7, out, dtype=D)
    if loss == "mse":
        return model, nn.MSELoss(), x, torch.randn(7, out, dtype=D)
    if loss == "bce":
        return model, nn.BCEWithLogitsLoss(), x, torch.rand(7, out, dtype=D)
    if loss == "huber":  # no closed form: generic fallback
        return model, nn.HuberLoss(delta=0.5), x, torch.randn(7, out, dtype=D)
    raise AssertionError(loss)


def _problem(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Problem:
    params = list(model.parameters())
    return Problem(model, loss_fn, x, y, params, [n for n, _ in model.named_parameters()])


def _vecs(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    d = [torch.randn_like(p) for p in model.parameters()]
    v = [torch.randn_like(p) for p in model.parameters()]
    return d, v


CASES = [(k, loss) for k in ("mlp", "cnn") for loss in ("ce", "half_mse", "mse", "bce", "huber")]


@pytest.mark.parametrize("kind,loss", CASES)
def test_ggn_own_matches_dense(kind: str, loss: str) -> None:
    model, loss_fn, x, y = _case(kind, loss)
    G = dense_ggn(model, loss_fn, x, y)
    d, v = _vecs(model)
    bound = GGNSpec().build().bind(_problem(model, loss_fn, x, y))
    fd, fv = to_flat(d), to_flat(v)
    torch.testing.assert_close(bound.quadratic_form(d), fd @ G @ fd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(to_flat(bound.matvec(v)), G @ fv, rtol=1e-10, atol=1e-12)
    gram = bound.quadratic_forms([d, v])
    torch.testing.assert_close(gram[0, 1], fd @ G @ fv, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,loss", CASES)
def test_hessian_own_matches_dense(kind: str, loss: str) -> None:
    model, loss_fn, x, y = _case(kind, loss)
    H = dense_hessian(model, loss_fn, x, y)
    d, v = _vecs(model)
    bound = HessianSpec().build().bind(_problem(model, loss_fn, x, y))
    fd, fv = to_flat(d), to_flat(v)
    torch.testing.assert_close(bound.quadratic_form(d), fd @ H @ fd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(to_flat(bound.matvec(v)), H @ fv, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind,loss", [c for c in CASES if c[1] != "huber"])
@pytest.mark.parametrize("spec_cls", [GGNSpec, HessianSpec])
def test_own_backend_matches_curvlinops(kind: str, loss: str, spec_cls: type) -> None:
    model, loss_fn, x, y = _case(kind, loss)
    d, v = _vecs(model)
    problem = _problem(model, loss_fn, x, y)
    own = spec_cls(backend="own").build().bind(problem)
    ref = spec_cls(backend="curvlinops").build().bind(problem)
    torch.testing.assert_close(own.quadratic_form(d), ref.quadratic_form(d), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        to_flat(own.matvec(v)), to_flat(ref.matvec(v)), rtol=1e-10, atol=1e-12
    )


def test_mse_scaling_convention() -> None:
    """nn.MSELoss carries 2/(N·C) and HalfMSELoss 1/(N·C): their GGNs differ by exactly 2."""
    model, _, x, y = _case("mlp", "mse")
    d, _ = _vecs(model)
    p_mse = _problem(model, nn.MSELoss(), x, y)
    p_half = _problem(model, HalfMSELoss(), x, y)
    q_mse = GGNSpec().build().bind(p_mse).quadratic_form(d)
    q_half = GGNSpec().build().bind(p_half).quadratic_form(d)
    torch.testing.assert_close(q_mse, 2 * q_half, rtol=1e-12, atol=0)
    # and HalfMSELoss's GGN is JᵀJ/(N·C) exactly
    from torch.func import functional_call, jvp

    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    _, u = jvp(lambda p: functional_call(model, p, (x,)), (params,), (dict(zip(names, d)),))
    torch.testing.assert_close(q_half, (u * u).sum() / u.numel(), rtol=1e-12, atol=0)


def test_ggn_train_mode_batchnorm_uses_batch_statistics_and_keeps_buffers() -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).to(D)
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(9, 4, dtype=D), torch.randint(0, 3, (9,))
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    d, v = _vecs(model)
    for spec in (GGNSpec(), HessianSpec()):
        bound = spec.build().bind(_problem(model, loss_fn, x, y))
        q = bound.quadratic_form(d)
        bound.matvec(v)
        # reference: train-mode BN with batch statistics and no running-stat tracking
        model[1].track_running_stats = False
        if isinstance(spec, GGNSpec):
            ref = dense_ggn(model, loss_fn, x, y)
        else:
            ref = dense_hessian(model, loss_fn, x, y, vmap=False)
        model[1].track_running_stats = True
        torch.testing.assert_close(q, to_flat(d) @ ref @ to_flat(d), rtol=1e-10, atol=1e-12)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    assert model.training


def test_curvlinops_backend_rejects_train_mode_batchnorm_clearly() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).to(D)
    x, y = torch.randn(9, 4, dtype=D), torch.randint(0, 3, (9,))
    with pytest.raises(ValueError, match="backend: own"):
        GGNSpec(backend="curvlinops").build().bind(_problem(model, nn.CrossEntropyLoss(), x, y))


def test_curvlinops_backend_rejects_unsupported_loss_at_setup() -> None:
    model = _mlp(3)
    with pytest.raises(ValueError, match="HuberLoss"):
        GGNSpec(backend="curvlinops").build().setup(list(model.parameters()), model, nn.HuberLoss())


@pytest.mark.parametrize("loss", ["half_mse", "mse", "ce"])
@pytest.mark.parametrize("backend", ["jvp", "fast"])
def test_nan_padded_loss_reproduces_the_padded_batch_curvature(loss: str, backend: str) -> None:
    """The original's NaN-padded batch: a squared-error GGN averages over all padded rows, with
    the padded rows adding zero (reference: the same form on zero-padded tangents); the loss,
    cross-entropy's curvature and a full batch are unchanged; the Hessian sees the plain loss."""
    from qlrlab.losses import NaNPaddedLoss, output_quadratic_form

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).to(D)
    x = torch.randn(7, 4, dtype=D)
    plain = {"half_mse": HalfMSELoss(), "mse": nn.MSELoss(), "ce": nn.CrossEntropyLoss()}[loss]
    y = torch.randint(0, 3, (7,)) if loss == "ce" else torch.randn(7, 3, dtype=D)
    d, _ = _vecs(model)

    def form(loss_fn: nn.Module) -> torch.Tensor:
        for p in model.parameters():
            p.grad = None
        oracle = GGNSpec(backend=backend).build()
        params = list(model.parameters())
        oracle.setup(params, model, loss_fn)
        with oracle.gradient_pass(model) as module:
            out = module(x)
            loss_fn(out, y).backward()
        bound = oracle.bind(_problem(model, loss_fn, x, y))
        assert oracle.last_path == backend
        return bound.quadratic_form(d)

    padded = NaNPaddedLoss(plain, 20)
    torch.testing.assert_close(padded(model(x), y), plain(model(x), y), rtol=0, atol=0)
    q_plain, q_padded = form(plain), form(padded)
    if loss == "ce":
        torch.testing.assert_close(q_padded, q_plain, rtol=1e-12, atol=0)
    else:  # the original: the same form on a batch of 20 rows whose 13 padded rows add zero
        from torch.func import functional_call, jvp

        names = [n for n, _ in model.named_parameters()]
        params = {n: p.detach() for n, p in model.named_parameters()}
        z, u = jvp(lambda p: functional_call(model, p, (x,)), (params,), (dict(zip(names, d)),))
        pad = torch.zeros(13, 3, dtype=D)
        ref = output_quadratic_form(
            plain, torch.cat([z, pad]), torch.cat([y, pad]), torch.cat([u, pad])
        )
        torch.testing.assert_close(q_padded, ref, rtol=1e-12, atol=0)
        torch.testing.assert_close(q_padded, q_plain * 7 / 20, rtol=1e-12, atol=0)
    torch.testing.assert_close(form(NaNPaddedLoss(plain, 7)), q_plain, rtol=1e-12, atol=0)
    hess = HessianSpec().build().bind(_problem(model, padded, x, y)).quadratic_form(d)
    ref_h = HessianSpec().build().bind(_problem(model, plain, x, y)).quadratic_form(d)
    torch.testing.assert_close(hess, ref_h, rtol=1e-12, atol=0)
