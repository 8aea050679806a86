"""Mixed precision on CUDA (issue 13, item 5): bf16 autocast and fp16 with GradScaler.

Skipped without a CUDA device (run on a GPU machine: ``pytest -m cuda``)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qlrlab

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 10)).cuda()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(512, 32, device="cuda", generator=g)
    return x, torch.randint(0, 10, (512,), device="cuda", generator=g)


@pytest.mark.parametrize("curvature", ["ggn", "hessian", "fisher_mc", "empirical_fisher"])
def test_bf16_autocast_curvature_is_float32_and_close(curvature: str) -> None:
    model = _mlp()
    model_amp = copy.deepcopy(model)
    x, y = _data()
    spec = qlrlab.OptimizerSpec.model_validate(
        {"direction": "sgd", "curvature": curvature, "step_size": "quadratic",
         "damping": {"name": "levenberg_marquardt"}}
    )  # fmt: skip
    ref = qlrlab.build_optimizer(spec, model, nn.CrossEntropyLoss()).step((x, y))
    opt = qlrlab.build_optimizer(spec, model_amp, nn.CrossEntropyLoss())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        info = opt.step((x, y))
    assert info.curvature == pytest.approx(ref.curvature, rel=0.05)
    if curvature == "ggn":
        assert opt.curvature.last_path == "fast"


def test_fp16_gradscaler_with_backward_then_step() -> None:
    model = _mlp()
    loss_fn = nn.CrossEntropyLoss()
    opt = qlrlab.build_optimizer("adamqlr", model, loss_fn)
    scaler = torch.amp.GradScaler("cuda")
    x, y = _data()
    losses = []
    for _ in range(20):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)  # unscales .grad, then opt.step()
        scaler.update()
        losses.append(opt.last_info.loss)
        assert opt.last_info.status in ("ok", "rejected")
    assert losses[-1] < 0.8 * losses[0]
    # the unscaled gradient reached the step: its norm is that of the fp32 loss's gradient
    assert opt.last_info.grad_norm < 100.0


def test_bf16_parameters_train_on_cuda() -> None:
    model = _mlp().bfloat16()
    x, y = _data()
    opt = qlrlab.build_optimizer("adamqlr", model, nn.CrossEntropyLoss())
    infos = [opt.step((x.bfloat16(), y)) for _ in range(15)]
    assert infos[-1].loss < 0.9 * infos[0].loss
