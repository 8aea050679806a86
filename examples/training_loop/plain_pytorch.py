"""qlrlab in a plain PyTorch training loop: the three calling conventions, AMP, clipping,
micro-batches, models with dict outputs, and another optimiser's direction with QLR damping.

Run: ``python examples/training_loop/plain_pytorch.py`` (executed by tests/test_training_loop_docs.py).
"""

from __future__ import annotations

import torch
from torch import nn

import qlrlab

torch.manual_seed(0)
x_all = torch.randn(1024, 20)
y_all = (x_all @ torch.randn(20, 4)).argmax(1)  # a learnable teacher
loader = list(zip(x_all.split(256), y_all.split(256)))


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))


def conventions() -> list[float]:
    # --8<-- [start:conventions]
    model = make_model()
    loss_fn = nn.CrossEntropyLoss()
    opt = qlrlab.build_optimizer("adamqlr", model, loss_fn)

    for inputs, targets in loader:
        # 1. the usual PyTorch loop: the batch is the one that just went through
        #    the model and loss_fn; the gradient is the one you computed
        opt.zero_grad()
        loss = loss_fn(model(inputs), targets)
        loss.backward()
        info = opt.step()

    for inputs, targets in loader:
        # 2. torch.optim's closure convention (what Lightning uses)
        def closure():
            opt.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            return loss

        info = opt.step(closure)

    for inputs, targets in loader:
        # 3. hand qlrlab the batch: it runs its own (fastest) gradient pass
        info = opt.step((inputs, targets))

    print(f"loss {info.loss:.3f}  alpha {info.alpha:.3g}  damping {info.damping:.3g}")
    # --8<-- [end:conventions]
    return [info.loss]


def amp() -> float:
    # --8<-- [start:amp]
    model = make_model()
    loss_fn = nn.CrossEntropyLoss()
    opt = qlrlab.build_optimizer("adamqlr", model, loss_fn)
    for inputs, targets in loader:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # "cuda" on a GPU
            loss = loss_fn(model(inputs), targets)
        loss.backward()
        info = opt.step()  # dᵀGd, α and ρ are computed in float32
    # --8<-- [end:amp]
    return info.loss


def clipping_and_accumulation() -> float:
    # --8<-- [start:gradient]
    spec = qlrlab.presets.adamqlr()
    spec.gradient = {"clip_norm": 0.25, "micro_batches": 4}  # or in YAML: gradient: {...}
    model = make_model()
    opt = qlrlab.build_optimizer(spec, model, nn.CrossEntropyLoss())
    for inputs, targets in loader:
        info = opt.step((inputs, targets))  # 4 micro-batches of 64 rows, one step
    print(f"|g| {info.grad_norm_unclipped:.3f} clipped to {info.grad_norm:.3f}")
    # --8<-- [end:gradient]
    return info.loss


def dict_outputs() -> float:
    # --8<-- [start:outputs]
    class Net(nn.Module):  # returns a dict, as Hugging Face models return a ModelOutput
        def __init__(self) -> None:
            super().__init__()
            self.body = make_model()

        def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": self.body(features)}

    model = Net()
    loss_fn = nn.CrossEntropyLoss()
    opt = qlrlab.build_optimizer("adamqlr", model, loss_fn, output="logits")
    for inputs, targets in loader:
        info = opt.step(({"features": inputs}, targets))  # a dict: model(**inputs)
    # --8<-- [end:outputs]
    return info.loss


def wrap_another_optimizer() -> float:
    # --8<-- [start:torch_optim]
    spec = qlrlab.OptimizerSpec.model_validate(
        {
            # any torch.optim class, run with lr = 1 on a private copy: d = -Δθ
            "direction": {"name": "torch_optim", "optimizer": "RMSprop", "options": {"alpha": 0.9}},
            "curvature": {"name": "ggn"},
            "step_size": {"name": "quadratic"},  # AdamQLR's learning rate ...
            "damping": {"name": "levenberg_marquardt", "initial": 1e-3},  # ... and damping
        }
    )
    model = make_model()
    opt = qlrlab.build_optimizer(spec, model, nn.CrossEntropyLoss())
    for inputs, targets in loader:
        info = opt.step((inputs, targets))
    # --8<-- [end:torch_optim]
    return info.loss


if __name__ == "__main__":
    conventions()
    amp()
    clipping_and_accumulation()
    dict_outputs()
    wrap_another_optimizer()
