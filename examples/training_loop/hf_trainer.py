"""qlrlab inside a Hugging Face ``Trainer`` (needs ``transformers`` and ``accelerate``; executed
by tests/integrations/test_examples.py in the integration venv)."""

from __future__ import annotations

# --8<-- [start:hf]
import tempfile

import torch
import transformers
from torch import nn

import qlrlab


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 256) -> None:
        self.ids = torch.randint(1, 100, (n, 12))
        self.labels = self.ids[:, 0] % 3

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def main(max_steps: int = 20) -> transformers.Trainer:
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config)  # randomly initialised
    loss_fn = nn.CrossEntropyLoss()
    # the model returns a ModelOutput: its logits feed the loss
    opt = qlrlab.build_optimizer("adamqlr", model, loss_fn, output="logits")
    args = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), max_steps=max_steps, per_device_train_batch_size=32,
        lr_scheduler_type="constant",  # α comes from AdamQLR (a schedule would scale it)
        max_grad_norm=0.0,  # clip in the spec instead: gradient: {clip_norm: ...}
        report_to=[], save_strategy="no", use_cpu=True,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None),
        # the Trainer pops the labels and hands them here: compute the loss with loss_fn
        compute_loss_func=lambda outputs, labels, **kw: loss_fn(outputs.logits, labels),
    )  # fmt: skip
    trainer.train()  # backward, then opt.step(): qlrlab observes the batch
    return trainer
# --8<-- [end:hf]


if __name__ == "__main__":
    main()
