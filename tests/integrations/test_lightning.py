"""PyTorch Lightning's automatic optimisation drives a qlrlab optimiser (issue 13, item 3).

Against the real ``lightning`` package (the integration venv; skipped elsewhere with the reason).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qlrlab
from tests.integrations._env import require

L = require("lightning")


def _net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(160, 6, generator=g, dtype=torch.float64)
    return TensorDataset(x, torch.randint(0, 3, (160,), generator=g))


class LitClassifier(L.LightningModule):
    def __init__(self, net: nn.Module, spec: str = "adamqlr") -> None:
        super().__init__()
        self.net = net
        self.loss_fn = nn.CrossEntropyLoss()
        self.spec = spec
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.append((x.clone(), y.clone()))
        return self.loss_fn(self.net(x), y)

    def configure_optimizers(self):
        return qlrlab.build_optimizer(self.spec, self.net, self.loss_fn)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        info = self.optimizers().optimizer.last_info
        self.log_dict({f"qlr/{k}": v for k, v in info.scalars().items()})


def _trainer(tmp_path, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=7,
        accelerator="cpu",
        devices=1,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


def test_automatic_optimisation_equals_step_batch(tmp_path) -> None:
    net = _net()
    ref_net = copy.deepcopy(net)
    lit = LitClassifier(net)
    trainer = _trainer(tmp_path)
    trainer.fit(lit, DataLoader(_data(), batch_size=16, shuffle=True))

    assert trainer.global_step == 7  # max_steps is honoured
    assert len(lit.seen) == 7
    opt = lit.optimizers().optimizer
    assert opt.step_count == 7
    logged = trainer.logged_metrics
    for key in ("qlr/alpha", "qlr/damping", "qlr/rho", "qlr/loss", "qlr/curvature"):
        assert key in logged, sorted(logged)

    ref = qlrlab.build_optimizer("adamqlr", ref_net, nn.CrossEntropyLoss())
    for x, y in lit.seen:
        info = ref.step((x, y))
    assert float(logged["qlr/alpha"]) == pytest.approx(info.alpha, rel=1e-6)  # logged as float32
    for p, q in zip(ref_net.parameters(), net.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-12)


def test_lightning_gradient_clipping_reaches_the_optimizer(tmp_path) -> None:
    """Lightning clips inside the closure; the step uses the clipped gradient."""
    lit = LitClassifier(_net(), spec="sgd")
    trainer = _trainer(tmp_path, gradient_clip_val=1e-3, gradient_clip_algorithm="norm")
    trainer.fit(lit, DataLoader(_data(), batch_size=16))
    info = lit.optimizers().optimizer.last_info
    assert info.grad_norm is not None and info.grad_norm <= 1e-3 * (1 + 1e-6)
