"""Shared machinery of the array-backed tasks: device-resident splits, batching, evaluation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from qlrlab.tasks.base import Batch, Task, TaskSpec

__all__ = ["ArrayTask", "build_model", "feature_stats", "preserve_mode"]

Split = Literal["train", "val", "test"]


def feature_stats(x: Tensor, dims: tuple[int, ...], chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Mean and population standard deviation of ``x`` over ``dims`` (which must include 0).

    Accumulates sums in float64 over chunks of the first dimension, so a large ``uint8`` image
    tensor is never copied to float in one piece. A zero standard deviation is replaced by 1
    (as the paper's code does).

    Returns:
        ``(mean, std)`` in float64, shaped like ``x`` with ``dims`` reduced (``keepdim``).
    """
    if 0 not in dims:
        raise ValueError("dims must include the example dimension 0")
    total = None
    total_sq = None
    count = 0
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk].to(torch.float64)
        s = xc.sum(dim=dims, keepdim=True)
        sq = (xc * xc).sum(dim=dims, keepdim=True)
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += xc.numel() // s.numel()
    assert total is not None and total_sq is not None
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    std = var.sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean, std


def build_model(
    factory: Callable[[], nn.Module], seed: int | None, device: torch.device, dtype: torch.dtype
) -> nn.Module:
    """Construct a model on the CPU (optionally under a private seed), then move it.

    Building on the CPU in float32 makes a seeded initialisation identical on every device.
    """
    if seed is None:
        model = factory()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = factory()
    return model.to(device=device, dtype=dtype)


@contextlib.contextmanager
def preserve_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Temporarily set every submodule to ``training``; restore each module's own flag after."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


class ArrayTask(Task):
    """A task whose splits are ``(inputs, targets)`` tensors already on the device.

    Subclasses may store compact inputs (e.g. ``uint8`` images) and override :meth:`prepare`
    to turn an index-selected batch into model inputs (normalisation, augmentation).

    Args:
        spec: the task spec.
        device: target device.
        dtype: floating dtype of the model and inputs.
        model: the model (already on ``device``/``dtype``).
        loss_fn: mean-reduced loss module.
        splits: ``{"train"|"val"|"test": (inputs, targets)}`` on ``device``.
        classification: whether to report accuracy.
        default_batch_size: the paper's default batch size.
        default_epochs: the paper's epoch budget.
        eval_batch_size: chunk size of :meth:`evaluate`.
    """

    def __init__(
        self,
        spec: TaskSpec,
        device: torch.device,
        dtype: torch.dtype,
        model: nn.Module,
        loss_fn: nn.Module,
        splits: dict[str, tuple[Tensor, Tensor]],
        classification: bool,
        default_batch_size: int,
        default_epochs: int | None,
        eval_batch_size: int = 1000,
    ) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.model = model
        self.loss_fn = loss_fn
        if spec.subset is not None:
            x, y = splits["train"]
            splits["train"] = (x[: spec.subset], y[: spec.subset])
        if spec.eval_subset is not None:
            for s in ("val", "test"):
                x, y = splits[s]
                splits[s] = (x[: spec.eval_subset], y[: spec.eval_subset])
        self.splits = splits
        self.classification = classification
        self.default_batch_size = default_batch_size
        self.default_epochs = default_epochs
        self.eval_batch_size = eval_batch_size

    def train_size(self) -> int:
        """Number of training examples."""
        return int(self.splits["train"][0].shape[0])

    def split_sizes(self) -> dict[str, int]:
        """Examples per split."""
        return {k: int(v[0].shape[0]) for k, v in self.splits.items()}

    def prepare(self, inputs: Tensor, split: Split, epoch_state: Any = None) -> Tensor:
        """Turn stored inputs into model inputs (default: cast to the task dtype if floating).

        Args:
            inputs: an index-selected batch of stored inputs.
            split: which split they come from.
            epoch_state: for training batches, the slice of :meth:`epoch_state` for this batch.
        """
        return inputs.to(self.dtype) if inputs.is_floating_point() else inputs

    def epoch_state(self, n: int, generator: torch.Generator) -> Any:
        """Per-epoch random state drawn once for all ``n`` examples (e.g. augmentation); a
        tensor (or tuple of tensors) indexed by example, or ``None``."""
        return None

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch of seeded, shuffled batches; the last one holds the remainder."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        x, y = self.splits["train"]
        n = int(x.shape[0])
        perm = torch.randperm(n, generator=generator, device=generator.device).to(self.device)
        state = self.epoch_state(n, generator)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            batch_state = _index_state(state, idx)
            yield self.prepare(x.index_select(0, idx), "train", batch_state), y.index_select(0, idx)

    #: prepared (model-ready) evaluation inputs are kept when a split's take at most this many
    #: bytes; larger splits are prepared batch by batch at every evaluation
    prepared_cache_bytes: int = 256 * 2**20

    def _prepared_inputs(self, split: Split) -> Tensor | None:
        """The whole split's model inputs, prepared once (normalised floats on the device), or
        ``None`` when they would take more than :attr:`prepared_cache_bytes`."""
        cache: dict[str, Tensor | None] = self.__dict__.setdefault("_prepared", {})
        if split not in cache:
            x = self.splits[split][0]
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            if x.numel() * itemsize > self.prepared_cache_bytes:
                cache[split] = None
            else:
                with torch.no_grad():
                    cache[split] = self.prepare(x, split)
        return cache[split]

    def evaluate(self, model: nn.Module, split: Split) -> dict[str, float]:
        """Mean loss (and accuracy) over a whole split in eval mode; modes and buffers kept.

        Fast: the split's inputs are prepared once and kept (see :attr:`prepared_cache_bytes`),
        no autograd (``torch.no_grad``), batches of :attr:`eval_batch_size` (the whole
        split for small models), and sums stay on the device until one read at the end.
        """
        x, y = self.splits[split]
        n = int(x.shape[0])
        prepared = self._prepared_inputs(split)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        with preserve_mode(model, False), torch.no_grad():
            for start in range(0, n, self.eval_batch_size):
                stop = start + self.eval_batch_size
                xb = (
                    self.prepare(x[start:stop], split) if prepared is None else prepared[start:stop]
                )
                yb = y[start : start + self.eval_batch_size]
                out = model(xb)
                loss_sum += self.loss_fn(out, yb).to(torch.float64) * yb.shape[0]
                if self.classification:
                    correct += (out.argmax(dim=1) == yb).sum()
        result = {"loss": float(loss_sum) / max(n, 1)}
        if self.classification:
            result["accuracy"] = float(correct) / max(n, 1)
        return result


def _index_state(state: Any, idx: Tensor) -> Any:
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.index_select(0, idx) for s in state)
    return state.index_select(0, idx)


def to_tensor(a: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    """NumPy array to a tensor on ``device`` (optionally cast)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)
