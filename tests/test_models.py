"""Models of the paper's tasks: shapes, parameter counts, initialisation, BatchNorm, GPT."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qlrlab.losses import HalfMSELoss
from qlrlab.models import (
    GPT,
    MLP,
    TRUNCATED_STD_FACTOR,
    BatchNorm2d,
    ResNet18,
    RosenbrockModel,
    num_parameters,
    trunc_normal_fan_in_,
)


def test_truncated_normal_fan_in_statistics():
    torch.manual_seed(0)
    w = torch.empty(400, 250)
    trunc_normal_fan_in_(w)
    sigma = 1 / math.sqrt(250)
    assert w.abs().max() <= 2 * sigma + 1e-7
    assert abs(w.mean().item()) < 0.02 * sigma
    assert w.std().item() == pytest.approx(TRUNCATED_STD_FACTOR * sigma, rel=0.02)


def test_mlp_shapes_and_paper_init():
    torch.manual_seed(0)
    m = MLP([784, 50, 10])
    assert m(torch.randn(7, 784)).shape == (7, 10)
    assert m(torch.randn(7, 28, 28)).shape == (7, 10)  # flattened
    assert num_parameters(m) == 784 * 50 + 50 + 50 * 10 + 10
    lin = [x for x in m if isinstance(x, nn.Linear)]
    assert [type(x).__name__ for x in m] == ["Linear", "ReLU", "Linear"]  # no final activation
    for layer in lin:
        sigma = 1 / math.sqrt(layer.in_features)
        assert torch.all(layer.bias == 0)
        assert layer.weight.abs().max() <= 2 * sigma + 1e-7
    assert lin[0].weight.std().item() == pytest.approx(TRUNCATED_STD_FACTOR / 28, rel=0.03)
    torch.manual_seed(0)
    t = MLP([784, 50, 10], init="torch")
    assert not torch.all(t[0].bias == 0)  # PyTorch's default init has non-zero biases
    with pytest.raises(ValueError):
        MLP([3])


@pytest.mark.parametrize(("stem", "count"), [("imagenet", 11_181_642), ("cifar", 11_173_962)])
def test_resnet18_parameter_count_and_shapes(stem, count):
    m = ResNet18(10, stem=stem)
    assert num_parameters(m) == count
    assert abs(count - 11.2e6) < 0.05e6
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 10)
    # zero-initialised logits layer: all logits are exactly zero at initialisation
    assert torch.all(out == 0)
    assert torch.all(m.logits.weight == 0) and torch.all(m.logits.bias == 0)


def test_resnet18_imagenet_stem_spatial_sizes():
    m = ResNet18()
    x = torch.randn(2, 3, 32, 32)
    h = m.stem(x)
    assert h.shape == (2, 64, 8, 8)  # 32 -> 16 (conv/2) -> 8 (max-pool/2)
    sizes = []
    for stage in m.layers:
        h = stage(h)
        sizes.append(h.shape[-1])
    assert sizes == [8, 4, 2, 1]
    assert ResNet18(stem="cifar").stem(x).shape == (2, 64, 32, 32)
    with pytest.raises(ValueError):
        ResNet18(stem="other")  # type: ignore[arg-type]


def test_resnet18_conv_init_statistics():
    torch.manual_seed(0)
    m = ResNet18()
    conv = m.layers[3][1].conv2  # 512 x 512 x 3 x 3
    sigma = 1 / math.sqrt(512 * 9)
    assert conv.weight.abs().max() <= 2 * sigma + 1e-7
    assert conv.weight.std().item() == pytest.approx(TRUNCATED_STD_FACTOR * sigma, rel=0.02)
    for mod in m.modules():
        if isinstance(mod, BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
    torch.manual_seed(0)
    t = ResNet18(init="torch")
    assert not torch.all(t.logits.weight == 0)


def test_batchnorm_haiku_semantics():
    torch.manual_seed(0)
    bn = BatchNorm2d(3)
    ref = nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 5, 5) * 2 + 1
    out = bn(x)
    torch.testing.assert_close(out, ref(x))  # same normalisation with batch statistics
    # zero-debiased EMA: after one batch the running stats equal the batch stats (biased var)
    torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)))
    torch.testing.assert_close(bn.running_var, x.var((0, 2, 3), unbiased=False))
    x2 = torch.randn(8, 3, 5, 5)
    bn(x2)
    w1, w2 = 0.9 * 0.1 / (1 - 0.81), 0.1 / (1 - 0.81)
    torch.testing.assert_close(bn.running_mean, w1 * x.mean((0, 2, 3)) + w2 * x2.mean((0, 2, 3)))
    # eval mode uses the running statistics
    bn.eval()
    expected = (x2 - bn.running_mean[:, None, None]) / torch.sqrt(
        bn.running_var[:, None, None] + bn.eps
    )
    torch.testing.assert_close(bn(x2), expected)
    plain = BatchNorm2d(3, zero_debias=False)
    plain(x)
    torch.testing.assert_close(plain.running_mean, 0.1 * x.mean((0, 2, 3)))


def test_batchnorm_train_mode_under_torch_func_has_no_side_effects():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    x = torch.randn(6, 3, 6, 6)
    m(x)  # one tracked batch
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = {k: v.detach() for k, v in m.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}

    def f(p):
        return torch.func.functional_call(m, p, (x,))

    out, jvp_out = torch.func.jvp(f, (params,), (tangents,))
    assert jvp_out.shape == (6, 2)
    torch.testing.assert_close(out, m(x))  # same function as the train-mode forward
    m.load_state_dict(before)
    # Hessian-vector product (forward-over-reverse) also works in train mode
    loss = nn.CrossEntropyLoss()
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    grad_fn = torch.func.grad(lambda p: loss(f(p), y))
    _, hvp = torch.func.jvp(grad_fn, (params,), (tangents,))
    assert set(hvp) == set(params)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k])
    # the core's side_effect_free() switches tracking off: no update either
    m[1].track_running_stats = False
    m(x)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_gpt_shapes_causality_and_tied_head():
    torch.manual_seed(0)
    m = GPT(vocab_size=37, n_layer=2, n_embd=16, n_head=4, n_positions=32)
    idx = torch.randint(0, 37, (3, 9))
    out = m(idx)
    assert out.shape == (3, 9, 37)
    idx2 = idx.clone()
    idx2[:, 5:] = (idx2[:, 5:] + 1) % 37
    out2 = m(idx2)
    torch.testing.assert_close(out[:, :5], out2[:, :5])  # causal: the future does not leak
    assert not torch.allclose(out[:, 5:], out2[:, 5:])
    # tied head: no separate output matrix, logits = h @ wte.T
    assert sum(p.shape == (37, 16) for p in m.parameters()) == 1
    flat = GPT(37, 2, 16, 4, n_positions=32, flatten_output=True)
    flat.load_state_dict(m.state_dict())
    torch.testing.assert_close(flat(idx), out.reshape(27, 37))
    sdpa = GPT(vocab_size=37, n_layer=2, n_embd=16, n_head=4, n_positions=32, attention="sdpa")
    sdpa.load_state_dict(m.state_dict())
    torch.testing.assert_close(sdpa(idx), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_gpt_init_statistics_and_default_size():
    torch.manual_seed(0)
    m = GPT(vocab_size=1000, n_layer=2, n_embd=64, n_head=4)
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert m.blocks[0].c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(m.blocks[0].c_fc.bias == 0)
    assert torch.all(m.ln_f.weight == 1)
    with torch.device("meta"):
        big = GPT()  # GPT-2 small with a 10k vocabulary
    # 124,439,808 (GPT-2 small) - (50257 - 10000) * 768 token embeddings
    assert num_parameters(big) == 124_439_808 - (50257 - 10000) * 768


def test_gpt_supports_forward_mode_ad():
    torch.manual_seed(0)
    m = GPT(vocab_size=11, n_layer=1, n_embd=8, n_head=2, flatten_output=True)
    idx = torch.randint(0, 11, (2, 5))
    params = {k: v.detach() for k, v in m.named_parameters()}
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    _, u = torch.func.jvp(
        lambda p: torch.func.functional_call(m, p, (idx,)), (params,), (tangents,)
    )
    assert u.shape == (10, 11) and torch.isfinite(u).all()


def test_rosenbrock_model_loss_is_quarter_rosenbrock():
    m = RosenbrockModel()
    assert m.position == (1.0, -1.0)
    loss_fn = HalfMSELoss()
    dummy, zeros = torch.zeros(1, 1), torch.zeros(1, 2)
    loss = loss_fn(m(dummy), zeros)
    assert loss.item() == pytest.approx(m.rosenbrock() / 4) == pytest.approx(100.0)
    loss.backward()
    # dR/dx = -2(a - x) - 4 b x (y - x^2) = 800 at (1, -1); dR/dy = 2 b (y - x^2) = -400
    assert m.x.grad.item() == pytest.approx(800 / 4)
    assert m.y.grad.item() == pytest.approx(-400 / 4)
    assert num_parameters(m) == 2
    at_min = RosenbrockModel(start=(1.0, 1.0))
    assert loss_fn(at_min(dummy), zeros).item() == 0.0
