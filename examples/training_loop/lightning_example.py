"""qlrlab under PyTorch Lightning's automatic optimisation (needs ``lightning``; executed by
tests/integrations/test_examples.py in the integration venv)."""

from __future__ import annotations

# --8<-- [start:lightning]
import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qlrlab


class LitClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
        self.loss_fn = nn.CrossEntropyLoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self.net(x), y)  # the module and loss qlrlab was given

    def configure_optimizers(self):
        return qlrlab.build_optimizer("adamqlr", self.net, self.loss_fn)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        info = self.optimizers().optimizer.last_info  # the qlrlab.StepInfo of this step
        self.log_dict({f"qlr/{k}": v for k, v in info.scalars().items()})


def main(max_steps: int = 20) -> L.Trainer:
    data = TensorDataset(torch.randn(512, 20), torch.randint(0, 4, (512,)))
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    trainer.fit(LitClassifier(), DataLoader(data, batch_size=64, shuffle=True))
    return trainer
# --8<-- [end:lightning]


if __name__ == "__main__":
    main()
