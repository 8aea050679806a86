"""qlrlab in the user's own training loop (issue 13, items 1, 2 and 7): the three calling
conventions give one result; model outputs that are not the loss input; keyword inputs; the
gradient-transform stage (clipping, micro-batch accumulation)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import qlrlab
from qlrlab._observe import ObservationError


def _model() -> nn.Module:
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _batches(n: int = 5, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(size, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (size,), generator=g),
        )
        for _ in range(n)
    ]


def _spec(name: str) -> qlrlab.OptimizerSpec:
    if name == "adamqlr_jvp":
        spec = qlrlab.presets.adamqlr()
        spec.curvature = {"name": "ggn", "backend": "jvp"}
        return spec
    spec = qlrlab.presets.get_preset(name)
    spec.track_rho = spec.curvature is not None
    return spec


def _run(spec, convention: str, batches):
    model = _model()
    loss_fn = nn.CrossEntropyLoss()
    opt = qlrlab.build_optimizer(spec, model, loss_fn)
    infos = []
    for x, y in batches:
        if convention == "batch":
            info = opt.step((x, y))
        elif convention in ("closure", "closure_kw"):

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            info = opt.step(closure) if convention == "closure" else opt.step(closure=closure)
        else:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            info = opt.step()
        assert info is opt.last_info
        infos.append(info)
    return model, opt, infos


@pytest.mark.parametrize("spec", ["adamqlr", "adamqlr_jvp", "adamqlr_hessian", "sgd_full", "kfac"])
@pytest.mark.parametrize("convention", ["closure", "closure_kw", "backward"])
def test_three_calling_conventions_give_one_result(spec: str, convention: str) -> None:
    batches = _batches()
    torch.manual_seed(0)
    ref_model, ref_opt, ref = _run(_spec(spec), "batch", batches)
    torch.manual_seed(0)
    model, opt, infos = _run(_spec(spec), convention, batches)
    for a, b in zip(ref, infos):
        for k in ("loss", "alpha", "damping", "rho", "curvature", "grad_norm", "new_loss"):
            va, vb = getattr(a, k), getattr(b, k)
            if va is None:
                assert vb is None, k
            else:
                assert vb == pytest.approx(va, rel=1e-8, abs=1e-12), k
        assert a.status == b.status
    for p, q in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-12)
    if spec == "adamqlr":  # the fast path serves every convention (after loss.backward():
        # from a gradient-free recording forward of the optimiser's own)
        assert ref_opt.curvature.last_path == "fast"
        assert opt.curvature.last_path == "fast", opt.curvature.last_fallback


def _batch_against_backward(model, steps: int) -> tuple[nn.Module, nn.Module, list[str]]:
    """AdamQLR on two copies of ``model()``: ``step(batch)`` and ``loss.backward(); step()``
    on the same batches, asserting equal step scalars (float64, 1e-8); returns both models and
    the second one's GGN path per step (``"jvp: <why>"`` when it fell back)."""
    loss_fn = nn.CrossEntropyLoss()
    ref_model, got_model = model(), model()
    ref = qlrlab.build_optimizer("adamqlr", ref_model, loss_fn)
    opt = qlrlab.build_optimizer("adamqlr", got_model, loss_fn)
    paths = []
    for x, y in _batches(steps):
        a = ref.step((x, y))
        opt.zero_grad()
        loss_fn(got_model(x), y).backward()
        b = opt.step()
        assert opt.curvature.last_path == ref.curvature.last_path
        why = opt.curvature.last_fallback
        paths.append(opt.curvature.last_path + (f": {why}" if why else ""))
        for k in ("loss", "alpha", "rho", "curvature", "new_loss"):
            assert getattr(b, k) == pytest.approx(getattr(a, k), rel=1e-8, abs=1e-12), k
    return ref_model, got_model, paths


def test_backward_then_step_records_without_touching_buffers_or_autograd() -> None:
    """``loss.backward(); opt.step()`` on a BatchNorm model in training mode: the optimiser's
    recording forward takes the fast path, leaves the running statistics as the caller's forward
    left them (updated once per step, as with ``step(batch)``) and equals ``step(batch)``."""

    def model() -> nn.Module:
        torch.manual_seed(5)
        return nn.Sequential(
            nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)
        ).double()

    ref_model, got_model, paths = _batch_against_backward(model, 4)
    assert paths == ["fast"] * 4
    for p, q in zip(ref_model.parameters(), got_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-12)
    bn_ref, bn_got = ref_model[1], got_model[1]
    assert int(bn_got.num_batches_tracked) == int(bn_ref.num_batches_tracked) == 4
    torch.testing.assert_close(bn_got.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn_got.running_var, bn_ref.running_var)


def test_backward_then_step_keeps_the_recorders_checks() -> None:
    """The recording forward after ``loss.backward()`` runs as ``step(batch)``'s does (gradients
    enabled), so the recorder still sees that the first layer it records takes an input that
    depends on the parameters (a layer's weight used functionally) and falls back, as
    ``step(batch)`` does, instead of dropping that layer from the curvature."""

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.tanh(nn.functional.linear(x, self.a.weight, self.a.bias)))

    def model() -> nn.Module:
        torch.manual_seed(2)
        return Functional().double()

    _, _, paths = _batch_against_backward(model, 3)
    assert paths == ["jvp: the first layer's input depends on the parameters"] * 3


def test_records_forward_only_where_a_recording_is_used() -> None:
    """The recording forward after ``loss.backward()`` runs only for the fast path's oracle."""
    fast = qlrlab.build_optimizer("adamqlr", _model(), nn.CrossEntropyLoss())
    general = qlrlab.build_optimizer(_spec("adamqlr_jvp"), _model(), nn.CrossEntropyLoss())
    assert fast.curvature.records_forward and not general.curvature.records_forward


def test_step_without_an_observed_batch_says_what_to_do() -> None:
    model = _model()
    opt = qlrlab.build_optimizer("adamqlr", model, nn.CrossEntropyLoss())
    with pytest.raises(ObservationError, match=r"no batch was observed.*opt.step\(\(inputs"):
        opt.step()
    assert opt.step_count == 0


def test_several_forwards_since_the_last_step_are_ambiguous() -> None:
    model = _model()
    loss_fn = nn.CrossEntropyLoss()
    opt = qlrlab.build_optimizer("adamqlr", model, loss_fn)
    (x, y), (x2, y2) = _batches(2)
    loss_fn(model(x), y).backward()
    loss_fn(model(x2), y2).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ObservationError, match=r"called 2 times.*ambiguous.*micro_batches"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    # the observation starts afresh: one forward, then step() works
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    assert opt.step().status == "ok"


def test_forwards_inside_a_step_are_not_observed() -> None:
    """The optimiser's own passes (gradient, curvature, ρ) never count as the user's."""
    model = _model()
    loss_fn = nn.CrossEntropyLoss()
    spec = qlrlab.presets.adamqlr()
    spec.curvature = {"name": "ggn", "backend": "jvp"}
    opt = qlrlab.build_optimizer(spec, model, loss_fn)
    (x, y), (x2, y2) = _batches(2)
    opt.step((x, y))
    loss_fn(model(x2), y2).backward()
    assert opt.step().status == "ok"


@pytest.mark.parametrize("bad", [5, torch.zeros(3), (torch.zeros(3),), "batch", (1, 2, 3)])
def test_step_with_a_non_batch_argument_says_what_it_expected(bad) -> None:
    opt = qlrlab.build_optimizer("adamqlr", _model(), nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match=r"expected.*\(inputs, targets\).*closure"):
        opt.step(bad)


def test_step_batch_warns_when_it_discards_the_users_gradients() -> None:
    model = _model()
    loss_fn = nn.CrossEntropyLoss()
    opt = qlrlab.build_optimizer("adamqlr", model, loss_fn)
    (x, y), (x2, y2) = _batches(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step((x, y))
        opt.step((x2, y2))  # its own gradients from the previous step: no warning
    loss_fn(model(x), y).backward()
    with pytest.warns(UserWarning, match=r"discard.*opt.step\(\)"):
        opt.step((x2, y2))


class _DictNet(nn.Module):
    """Returns a dict (as Hugging Face models return a ModelOutput) and takes keywords."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _model()

    def forward(self, features: torch.Tensor, scale: float = 1.0) -> dict[str, torch.Tensor]:
        logits = self.body(features) * scale
        return {"logits": logits, "hidden": logits.detach()}


class _TupleNet(_DictNet):
    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        out = super().forward(features)
        return out["logits"], out["hidden"]


@pytest.mark.parametrize(
    ("net", "output", "call"),
    [
        (_DictNet, "logits", "kwargs"),
        (_TupleNet, 0, "args"),
        (_DictNet, lambda out: out["logits"], "args"),
    ],
)
def test_models_whose_output_is_not_the_loss_input(net, output, call) -> None:
    loss_fn = nn.CrossEntropyLoss()
    batches = _batches(3)
    ref_model, _, ref = _run("adamqlr", "batch", batches)
    for convention in ("batch", "backward"):
        model = net()
        opt = qlrlab.build_optimizer("adamqlr", model, loss_fn, output=output)
        for (x, y), r in zip(batches, ref):
            inputs = {"features": x} if call == "kwargs" else x
            if convention == "batch":
                info = opt.step((inputs, y))
            else:
                opt.zero_grad()
                out = model(**inputs) if call == "kwargs" else model(inputs)
                logits = out["logits"] if isinstance(out, dict) else out[0]
                loss_fn(logits, y).backward()
                info = opt.step()
            assert info.alpha == pytest.approx(r.alpha, rel=1e-8)
            assert info.rho == pytest.approx(r.rho, rel=1e-8)
        for p, q in zip(ref_model.parameters(), model.body.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-12)


def test_a_dict_output_without_output_selection_is_refused_clearly() -> None:
    opt = qlrlab.build_optimizer("adamqlr", _DictNet(), nn.CrossEntropyLoss())
    x, y = _batches(1)[0]
    with pytest.raises(TypeError, match=r"returned a dict.*output="):
        opt.step((x, y))


# -- the gradient-transform stage (item 7) ------------------------------------------------------
def _sgd(**gradient) -> qlrlab.OptimizerSpec:
    return qlrlab.OptimizerSpec.model_validate(
        {"direction": "sgd", "step_size": {"name": "fixed", "lr": 0.1}, "gradient": gradient}
    )


@pytest.mark.parametrize("how", ["norm", "value"])
def test_clipping_from_the_spec_equals_torch_clipping(how: str) -> None:
    batches = _batches(4)
    model_a, model_b = _model(), _model()
    loss_fn = nn.CrossEntropyLoss()
    spec = _sgd(clip_norm=0.05) if how == "norm" else _sgd(clip_value=0.01)
    opt = qlrlab.build_optimizer(spec, model_b, loss_fn)
    ref = torch.optim.SGD(model_a.parameters(), lr=0.1)
    for x, y in batches:
        ref.zero_grad()
        loss_fn(model_a(x), y).backward()
        raw = torch.nn.utils.get_total_norm([p.grad for p in model_a.parameters()])
        if how == "norm":
            torch.nn.utils.clip_grad_norm_(model_a.parameters(), 0.05)
        else:
            torch.nn.utils.clip_grad_value_(model_a.parameters(), 0.01)
        clipped = torch.nn.utils.get_total_norm([p.grad for p in model_a.parameters()])
        ref.step()
        info = opt.step((x, y))
        assert info.grad_norm_unclipped == pytest.approx(float(raw), rel=1e-10)
        assert info.grad_norm == pytest.approx(float(clipped), rel=1e-10)
        assert "grad_norm_unclipped" in info.scalars()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)


def test_micro_batches_give_the_gradient_of_the_whole_batch() -> None:
    batches = _batches(3, size=30)
    model_a, model_b = _model(), _model()
    opt_a = qlrlab.build_optimizer(_sgd(), model_a, nn.CrossEntropyLoss())
    opt_b = qlrlab.build_optimizer(_sgd(micro_batches=4), model_b, nn.CrossEntropyLoss())
    for b in batches:  # 30 rows in micro-batches of 8, 8, 7, 7
        ia, ib = opt_a.step(b), opt_b.step(b)
        assert ib.loss == pytest.approx(ia.loss, rel=1e-12)
        assert ib.grad_norm == pytest.approx(ia.grad_norm, rel=1e-12)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


def test_micro_batches_with_adamqlr_use_the_whole_batch_for_curvature_and_rho() -> None:
    batches = _batches(3, size=32)
    spec_b = qlrlab.presets.adamqlr()
    spec_b.gradient = {"micro_batches": 2}
    ma, mb = _model(), _model()
    oa = qlrlab.build_optimizer("adamqlr", ma, nn.CrossEntropyLoss())
    ob = qlrlab.build_optimizer(spec_b, mb, nn.CrossEntropyLoss())
    for b in batches:
        ia, ib = oa.step(b), ob.step(b)
        for k in ("loss", "alpha", "rho", "curvature", "new_loss"):
            assert getattr(ib, k) == pytest.approx(getattr(ia, k), rel=1e-8), k
    assert ob.curvature.last_path == "jvp" and "micro-batch" in ob.curvature.last_fallback


def test_gradient_spec_is_validated() -> None:
    with pytest.raises(Exception, match="clip_norm"):
        _sgd(clip_norm=-1.0)
    with pytest.raises(Exception, match="micro_batches"):
        _sgd(micro_batches=0)
    with pytest.raises(Exception, match="extra"):
        _sgd(clip=1.0)


def test_deepcopy_keeps_observing() -> None:
    model = _model()
    loss_fn = nn.CrossEntropyLoss()
    opt = qlrlab.build_optimizer("adamqlr", model, loss_fn)
    (x, y), (x2, y2) = _batches(2)
    opt.step((x, y))
    model2, loss2, opt2 = copy.deepcopy((model, loss_fn, opt))
    opt2.zero_grad()
    loss2(model2(x2), y2).backward()
    opt.zero_grad()
    loss_fn(model(x2), y2).backward()
    assert opt2.step().as_dict() == opt.step().as_dict()


def test_a_loss_module_shared_with_another_model_does_not_confuse_the_observation() -> None:
    loss_fn = nn.CrossEntropyLoss()
    model, other = _model(), _model()
    opt = qlrlab.build_optimizer("adamqlr", model, loss_fn)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1)
    for x, y in _batches(3):
        other_opt.zero_grad()
        loss_fn(other(x), y).backward()  # the shared loss module, another model
        other_opt.step()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        assert opt.step().status == "ok"
