"""A Hugging Face ``Trainer`` (backward, then ``optimizer.step()``) drives a qlrlab optimiser on
a small randomly initialised BERT classifier (issue 13, item 3), against the real
``transformers`` package (the integration venv; skipped elsewhere with the reason)."""

from __future__ import annotations

import copy

import torch
from torch import nn

import qlrlab
from tests.integrations._env import require

transformers = require("transformers")


def _model():
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(1, 40, (n, 10), generator=g)
        self.labels = self.ids[:, 0] % 3  # learnable from the first token

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_trainer_with_adamqlr_equals_step_batch(tmp_path) -> None:
    model = _model()
    ref_model = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    # the model returns a ModelOutput: its "logits" feed the loss
    opt = qlrlab.build_optimizer("adamqlr", model, loss_fn, output="logits")
    seen = []

    def compute_loss(outputs, labels, num_items_in_batch=None):
        seen.append(labels.clone())
        return loss_fn(outputs.logits, labels)

    inputs_seen = []

    def record(module, args, kwargs):  # the Trainer's forwards (qlrlab's own run without grad)
        if torch.is_grad_enabled():
            inputs_seen.append({k: v.clone() for k, v in kwargs.items()})

    model.register_forward_pre_hook(record, with_kwargs=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=16,
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], save_strategy="no",
        logging_steps=1, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=_Data(),
        optimizers=(opt, None),
        compute_loss_func=compute_loss,
    )
    trainer.train()
    assert trainer.state.global_step == 5
    assert opt.step_count == 5 and len(seen) == 5 and len(inputs_seen) == 5
    assert opt.last_info.status in ("ok", "rejected")

    ref = qlrlab.build_optimizer("adamqlr", ref_model, loss_fn, output="logits")
    for inputs, labels in zip(inputs_seen, seen):
        info = ref.step((inputs, labels))
    assert info.alpha == opt.last_info.alpha or abs(info.alpha - opt.last_info.alpha) <= 1e-4 * abs(
        info.alpha
    )
    for (n, p), q in zip(ref_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6, msg=n)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 5
