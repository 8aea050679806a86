"""Any torch.optim optimiser as a direction (issue 13, item 8)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from pydantic import ValidationError
from torch import nn

import qlrlab
from qlrlab.directions.torch_optim import TORCH_OPTIMIZERS, register_torch_optimizer


def _model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _batches(n: int = 12) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    return [
        (
            torch.randn(32, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (32,), generator=g),
        )
        for _ in range(n)
    ]


def test_torch_optim_adam_with_quadratic_and_lm_equals_the_adamqlr_preset() -> None:
    spec = qlrlab.presets.adamqlr().model_dump()
    spec["direction"] = {"name": "torch_optim", "optimizer": "Adam", "options": {"eps": 1e-8}}
    ma, mb = _model(), _model()
    oa = qlrlab.build_optimizer("adamqlr", ma, nn.CrossEntropyLoss())
    ob = qlrlab.build_optimizer(spec, mb, nn.CrossEntropyLoss())
    for batch in _batches():
        ia, ib = oa.step(batch), ob.step(batch)
        for k in ("alpha", "damping", "rho", "loss"):
            assert getattr(ib, k) == pytest.approx(getattr(ia, k), rel=1e-8, abs=1e-12), k
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-10)


def test_torch_optim_sgd_momentum_with_fixed_lr_equals_torch_sgd() -> None:
    spec = {
        "direction": {"name": "torch_optim", "optimizer": "SGD", "options": {"momentum": 0.9}},
        "step_size": {"name": "fixed", "lr": 0.05},
    }
    ma, mb = _model(), _model()
    ref = torch.optim.SGD(ma.parameters(), lr=0.05, momentum=0.9)
    ob = qlrlab.build_optimizer(spec, mb, nn.CrossEntropyLoss())
    loss_fn = nn.CrossEntropyLoss()
    for x, y in _batches():
        ref.zero_grad()
        loss_fn(ma(x), y).backward()
        ref.step()
        ob.step((x, y))
    for p, q in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)


def test_state_round_trips_through_the_optimizer_state_dict() -> None:
    spec = {"direction": {"name": "torch_optim", "optimizer": "RMSprop"}, "step_size": "fixed"}
    m = _model()
    opt = qlrlab.build_optimizer(spec, m, nn.CrossEntropyLoss())
    bs = _batches(6)
    for b in bs[:3]:
        opt.step(b)
    sd = opt.state_dict()
    m2 = _model()
    m2.load_state_dict(m.state_dict())
    opt2 = qlrlab.build_optimizer(spec, m2, nn.CrossEntropyLoss())
    opt2.load_state_dict(sd)
    for b in bs[3:]:
        opt.step(b)
        opt2.step(b)
    for p, q in zip(m.parameters(), m2.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("direction", "match"),
    [
        ({"optimizer": "Adamm"}, "unknown optimizer 'Adamm'.*Adam"),
        ({"optimizer": "os.system"}, "unknown optimizer"),
        ({"optimizer": "LBFGS"}, "needs a closure"),
        ({"optimizer": "Adam", "options": {"lr": 0.1}}, "options.lr"),
        ({"optimizer": "Adam", "options": {"betaz": 0.1}}, "options: torch.optim Adam.*betaz"),
        ({"optimizer": "SGD", "options": {"momentum": -1.0}}, "options: torch.optim SGD"),
    ],
)
def test_bad_torch_optim_specs_are_refused_naming_the_field(direction, match) -> None:
    with pytest.raises(ValidationError, match=match):
        qlrlab.OptimizerSpec.model_validate(
            {"direction": {"name": "torch_optim", **direction}, "step_size": "fixed"}
        )


def test_a_user_optimizer_is_registered_by_name() -> None:
    class SignSGD(torch.optim.Optimizer):
        def __init__(self, params, lr: float = 1e-3) -> None:
            super().__init__(params, {"lr": lr})

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    p.add_(p.grad.sign(), alpha=-group["lr"])

    register_torch_optimizer("SignSGD")(SignSGD)
    try:
        with pytest.raises(ValueError, match=r"torch\.optim class already"):
            register_torch_optimizer("Adam")(SignSGD)
        spec = {"direction": {"name": "torch_optim", "optimizer": "SignSGD"}, "step_size": "fixed"}
        m = _model()
        before = [p.detach().clone() for p in m.parameters()]
        opt = qlrlab.build_optimizer(spec, m, nn.CrossEntropyLoss())
        opt.step(_batches(1)[0])
        lr = opt.param_groups[0]["lr"]
        for p, b, g in zip(m.parameters(), before, (p.grad for p in m.parameters())):
            torch.testing.assert_close(p, b - lr * g.sign())
    finally:
        TORCH_OPTIMIZERS.pop("SignSGD", None)


def test_a_plugin_registers_a_user_optimizer_for_the_cli(tmp_path) -> None:
    """The spec names the class; the ``--plugin`` module (never the spec) imports the code."""
    plugin = tmp_path / "my_opts.py"
    plugin.write_text(
        textwrap.dedent(
            """
            import torch
            from qlrlab.directions.torch_optim import register_torch_optimizer

            @register_torch_optimizer("PluginSGD")
            class PluginSGD(torch.optim.SGD):
                pass
            """
        )
    )
    spec = tmp_path / "opt.yaml"
    spec.write_text(
        "direction: {name: torch_optim, optimizer: PluginSGD, options: {momentum: 0.5}}\n"
        "step_size: {name: fixed, lr: 0.1}\n"
    )
    code = (
        "import sys; from qlrlab.plugins import load_plugins; import qlrlab;"
        f"load_plugins([{str(plugin)!r}]) if len(sys.argv) > 1 else None;"
        f"print(qlrlab.OptimizerSpec.from_yaml({str(spec)!r}).direction.optimizer)"
    )
    ok = subprocess.run([sys.executable, "-c", code, "x"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "PluginSGD"
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown optimizer 'PluginSGD'" in bad.stderr
