r"""Penn Treebank word-level language modelling with a GPT-2-style decoder.

Data (Mikolov's ``ptb.{train,valid,test}.txt``): every line's tokens followed by ``<eos>``; a
10,000-word vocabulary in order of first appearance over train, valid and test; the splits are
the three files (929,589 / 73,760 / 82,430 tokens, the sizes hard-coded in the paper's code).

Training batches, as the paper's code draws them: each epoch has
:math:`\lfloor N/(L B)\rfloor` batches, each of :math:`B` start offsets drawn uniformly **with
replacement**, each window holding :math:`L` contiguous tokens with the next-token targets.

**Layout.** Here batches are *batch-major*: inputs ``[B, L]``, so each row is a contiguous piece
of text and the causal decoder attends along it. The original code fed the time-major
``[L, B]`` array to GPT-2, which reads it as ``[batch=L, seq=B]``: every "sequence" is then one
position taken from ``B`` unrelated random windows, and attention runs across them (pitfall 11
of the note); its losses are much higher. ``time_major_bug=True`` reproduces that layout for
comparison (inputs ``[L, B]``, targets in the same order).

Targets are flattened to ``[B·L]`` and the model returns logits ``[B·L, V]``, so the mean-reduced
``nn.CrossEntropyLoss`` is the per-token cross-entropy and its closed-form output Hessian applies.

Evaluation: ``eval_mode="full"`` (default) scores every token of the split (non-overlapping
windows of ``L`` tokens, the last incomplete window dropped); ``eval_mode="window"`` is the
paper's cheap estimate: one random ``eval_batch × L`` (20 × 70 = 1400-token) window batch per
call, from a task-owned generator seeded by ``eval_seed``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from qlrlab.data import build_vocab, ensure_file, read_ptb_words
from qlrlab.models import GPT
from qlrlab.tasks._common import build_model, preserve_mode
from qlrlab.tasks.base import TASKS, Batch, Task, TaskSpec

__all__ = ["PTBSpec", "PTBTask"]


@TASKS.register("ptb")
class PTBSpec(TaskSpec):
    """Penn Treebank with a GPT-2-style decoder (paper: 12 layers × 768, 12 heads, vocab 10k).

    Paper defaults: batch 30 windows × 70 tokens, 100 epochs. The paper initialised every
    repetition identically, hence ``model_seed = 0`` by default.

    Attributes:
        n_layer: decoder blocks.
        n_embd: model width.
        n_head: attention heads.
        n_positions: maximum sequence length of the position embedding.
        seq_len: tokens per window :math:`L`.
        time_major_bug: feed ``[L, B]`` like the original code (see the module docstring).
        eval_mode: ``"full"`` split evaluation or the paper's random ``"window"``.
        eval_batch: windows per evaluation batch (paper: 20).
        eval_seed: seed of the evaluation-window generator.
        attention: ``"math"`` (forward-mode AD safe) or ``"sdpa"``.
    """

    name: Literal["ptb"] = "ptb"
    model_seed: int | None = 0
    n_layer: int = Field(default=12, gt=0)
    n_embd: int = Field(default=768, gt=0)
    n_head: int = Field(default=12, gt=0)
    n_positions: int = Field(default=1024, gt=0)
    seq_len: int = Field(default=70, gt=0)
    time_major_bug: bool = False
    eval_mode: Literal["full", "window"] = "full"
    eval_batch: int = Field(default=20, gt=0)
    eval_seed: int = 0
    attention: Literal["math", "sdpa"] = "math"

    def build(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> PTBTask:
        """Read (or download) the three text files onto ``device`` and build the decoder."""
        words = [
            read_ptb_words(ensure_file(f"penn_treebank/ptb.{s}.txt", self.data_dir, download=self.download))
            for s in ("train", "valid", "test")
        ]  # fmt: skip
        vocab = build_vocab(*words)
        dev = torch.device(device)
        streams = {
            split: torch.tensor([vocab[w] for w in ws], dtype=torch.int64, device=dev)
            for split, ws in zip(("train", "val", "test"), words)
        }
        return PTBTask(self, dev, dtype, streams, vocab)


class PTBTask(Task):
    """The built ``ptb`` task (see the module docstring).

    Attributes:
        vocab: word → id.
        streams: token-id streams of each split (on the device).
        seq_len: window length :math:`L`.
    """

    name = "ptb"
    classification = True
    default_batch_size = 30
    default_epochs = 100

    def __init__(
        self,
        spec: PTBSpec,
        device: torch.device,
        dtype: torch.dtype,
        streams: dict[str, Tensor],
        vocab: dict[str, int],
    ) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.vocab = vocab
        self.seq_len = spec.seq_len
        if spec.subset is not None:
            streams["train"] = streams["train"][: spec.subset * spec.seq_len + 1]
        if spec.eval_subset is not None:
            for s in ("val", "test"):
                streams[s] = streams[s][: spec.eval_subset * spec.seq_len + 1]
        for s, t in streams.items():
            if len(t) < spec.seq_len + 1:
                raise ValueError(f"the {s} split has {len(t)} tokens, fewer than seq_len + 1")
        self.streams = streams
        max_len = max(spec.seq_len, spec.eval_batch) if spec.time_major_bug else spec.seq_len
        n_positions = max(spec.n_positions, max_len)
        self.model = build_model(
            lambda: GPT(
                len(vocab), spec.n_layer, spec.n_embd, spec.n_head, n_positions, init=spec.init,
                attention=spec.attention, flatten_output=True,
            ),
            spec.model_seed, device, dtype,
        )  # fmt: skip
        self.loss_fn = nn.CrossEntropyLoss()
        self._eval_generator = torch.Generator(device="cpu").manual_seed(spec.eval_seed)

    def train_size(self) -> int:
        """Training tokens divided by the window length, :math:`\\lfloor N/L\\rfloor`."""
        return len(self.streams["train"]) // self.seq_len

    def split_sizes(self) -> dict[str, int]:
        """Tokens per split."""
        return {k: len(v) for k, v in self.streams.items()}

    def steps_per_epoch(self, batch_size: int) -> int:
        """:math:`\\max(1, \\lfloor N/(L B)\\rfloor)` batches per epoch, as the paper's code."""
        return max(1, len(self.streams["train"]) // (self.seq_len * batch_size))

    def windows(self, split: str, offsets: Tensor) -> Batch:
        """Inputs and flattened next-token targets of the windows starting at ``offsets``.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            offsets: ``[B]`` start offsets on the device.

        Returns:
            ``(inputs [B, L], targets [B·L])``, or with ``time_major_bug``
            ``(inputs [L, B], targets [L·B])``.
        """
        stream = self.streams[split]
        idx = offsets[:, None] + torch.arange(self.seq_len, device=offsets.device)  # [B, L]
        x, y = stream[idx], stream[idx + 1]
        if self.spec.time_major_bug:  # type: ignore[attr-defined]
            x, y = x.T.contiguous(), y.T.contiguous()
        return x, y.reshape(-1)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch: ⌊N/(L·B)⌋ batches of ``B`` random windows (offsets with replacement)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        steps = self.steps_per_epoch(batch_size)
        high = len(self.streams["train"]) - self.seq_len  # offsets 0..N-L-1
        offsets = torch.randint(
            0, high, (steps, batch_size), generator=generator, device=generator.device
        ).to(self.device)
        for s in range(steps):
            yield self.windows("train", offsets[s])

    def evaluate(
        self, model: nn.Module, split: Literal["train", "val", "test"]
    ) -> dict[str, float]:
        """Per-token loss and next-token accuracy (``eval_mode`` "full" or random "window")."""
        n = len(self.streams[split])
        if self.spec.eval_mode == "window":  # type: ignore[attr-defined]
            offsets = torch.randint(
                0, n - self.seq_len, (self.spec.eval_batch,), generator=self._eval_generator  # type: ignore[attr-defined]
            ).to(self.device)
            chunks = [offsets]
        else:
            n_windows = (n - 1) // self.seq_len
            starts = torch.arange(n_windows, device=self.device) * self.seq_len
            chunks = list(starts.split(self.spec.eval_batch))  # type: ignore[attr-defined]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        count = 0
        with preserve_mode(model, False), torch.no_grad():
            for offsets in chunks:
                x, y = self.windows(split, offsets)
                out = model(x)
                loss_sum += self.loss_fn(out, y).to(torch.float64) * y.numel()
                correct += (out.argmax(dim=1) == y).sum()
                count += y.numel()
        return {"loss": float(loss_sum) / count, "accuracy": float(correct) / count}
