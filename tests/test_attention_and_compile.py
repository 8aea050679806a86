"""AdamQLR on models using F.scaled_dot_product_attention, and on torch.compile'd models
(issue 13, item 6)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qlrlab
from qlrlab.models import GPT


class _Encoder(nn.Module):
    """A TransformerEncoderLayer classifier (nn.MultiheadAttention inside: SDPA)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(x).mean(1))


def _dense_ggn_quadratic_form(model, loss_fn, x, y, d) -> float:
    """dᵀGd from torch.func with the math attention kernel (the reference)."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())

    def f(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        z, u = torch.func.jvp(f, params, tuple(d))
        zz = z.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(zz, y), zz, create_graph=True)
        (hu,) = torch.autograd.grad(g, zz, u)
    return float((u * hu).sum())


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("curvature", ["ggn", "hessian", "fisher_mc"])
def test_adamqlr_runs_on_a_transformer_encoder_layer(train: bool, curvature: str) -> None:
    torch.manual_seed(0)
    model = _Encoder().double().train(train)
    x, y = torch.randn(6, 5, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    opt = qlrlab.build_optimizer(
        qlrlab.presets.adamqlr(curvature=curvature), model, nn.CrossEntropyLoss()
    )
    for _ in range(3):
        info = opt.step((x, y))
        assert info.status == "ok", info
        assert info.curvature is not None and info.curvature > 0


def test_ggn_on_sdpa_model_matches_the_dense_reference() -> None:
    torch.manual_seed(0)
    model = _Encoder().double()
    x, y = torch.randn(6, 5, 8, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss()
    opt = qlrlab.build_optimizer("adamqlr", model, loss_fn)
    ref = copy.deepcopy(model)
    info = opt.step((x, y))
    # the direction is Adam's first step: d = g / (|g| + eps) (bias-corrected), i.e. sign(g)
    d = [torch.sign(p.grad) * (p.grad.abs() / (p.grad.abs() + 1e-8)) for p in model.parameters()]
    assert info.curvature == pytest.approx(
        _dense_ggn_quadratic_form(ref, loss_fn, x, y, d), rel=1e-6
    )


def test_gpt_sdpa_agrees_with_math_attention() -> None:
    kw = {"vocab_size": 17, "n_layer": 2, "n_embd": 16, "n_head": 2, "n_positions": 8}
    torch.manual_seed(0)
    math_model = GPT(**kw, attention="math", flatten_output=True).double()
    sdpa_model = GPT(**kw, attention="sdpa", flatten_output=True).double()
    sdpa_model.load_state_dict(math_model.state_dict())
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randint(0, 17, (4, 8), generator=g), torch.randint(0, 17, (32,), generator=g))
        for _ in range(4)
    ]
    oa = qlrlab.build_optimizer("adamqlr", math_model, nn.CrossEntropyLoss())
    ob = qlrlab.build_optimizer("adamqlr", sdpa_model, nn.CrossEntropyLoss())
    for b in batches:
        ia, ib = oa.step(b), ob.step(b)
        for k in ("alpha", "damping", "rho", "curvature"):
            assert getattr(ib, k) == pytest.approx(getattr(ia, k), rel=1e-7), k
    for p, q in zip(math_model.parameters(), sdpa_model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-7, atol=1e-9)


def test_the_users_forward_keeps_its_attention_kernel() -> None:
    """qlrlab selects the math kernel only inside its own extra passes."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(torch.backends.cuda.flash_sdp_enabled())
            return x

    model = nn.Sequential(nn.Linear(4, 3), Probe())
    opt = qlrlab.build_optimizer(
        qlrlab.presets.adamqlr(curvature="hessian"), model, nn.CrossEntropyLoss()
    )
    opt.step((torch.randn(8, 4), torch.randint(0, 3, (8,))))
    assert seen[0] is True  # the gradient pass: the user's settings
    assert False in seen[1:]  # the extra passes: math only
    assert torch.backends.cuda.flash_sdp_enabled()


@pytest.mark.slow
def test_a_compiled_model_works_and_says_which_path_it_took() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    compiled_inner = copy.deepcopy(plain)
    compiled = torch.compile(compiled_inner)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    oa = qlrlab.build_optimizer("adamqlr", plain, nn.CrossEntropyLoss())
    ob = qlrlab.build_optimizer("adamqlr", compiled, nn.CrossEntropyLoss())
    for _ in range(3):
        ia, ib = oa.step((x, y)), ob.step((x, y))
        assert ib.curvature == pytest.approx(ia.curvature, rel=1e-9)
        assert ib.alpha == pytest.approx(ia.alpha, rel=1e-9)
        assert oa.curvature.last_path == "fast"
        assert ob.curvature.last_path == "jvp"  # said, not silent
        assert "torch.compile" in ob.curvature.last_fallback
    for p, q in zip(plain.parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12)
