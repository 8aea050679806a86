"""The task contract: data, splits, model, loss and default budget behind one spec.

A *task* is one experiment of the paper (or your own). It is described by a :class:`TaskSpec`
(pydantic, registered by name in :data:`TASKS`) whose :meth:`TaskSpec.build` returns a
:class:`Task` bound to a device and dtype. The experiment engine only talks to this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from qlrlab.registry import ComponentSpec, Registry

__all__ = ["TASKS", "Batch", "Task", "TaskSpec"]

#: A batch is ``(inputs, targets)``.
Batch = tuple[Any, Tensor]


class TaskSpec(ComponentSpec):
    """Base spec of every task.

    Attributes:
        data_dir: where the data files live (default: ``$QLRLAB_DATA``, else
            :func:`qlrlab.data.set_default_data_dir`, else ``~/.cache/qlrlab/data``).
        init: ``"paper"`` (truncated normal σ = 1/√fan_in, zero biases, as the paper's Haiku
            models) or ``"torch"`` (PyTorch's default initialisation).
        subset: use only the first ``subset`` training examples (tests, smoke runs).
        download: fetch missing files from the official URLs.
        eval_subset: evaluate on at most the first ``eval_subset`` validation/test examples
            (smoke runs; ``None`` = the whole split).
        model_seed: if set, the model is initialised from this seed (independently of the
            global RNG, and identically on every device); ``None`` uses the global RNG.
    """

    data_dir: str | None = None
    init: Literal["paper", "torch"] = "paper"
    subset: int | None = Field(default=None, gt=0)
    download: bool = True
    eval_subset: int | None = Field(default=None, gt=0)
    model_seed: int | None = None

    def build(self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Task:
        """Load the data onto ``device`` and build the model; returns a :class:`Task`."""
        raise NotImplementedError


class Task(ABC):
    """A built task: a model, a loss, and device-resident data splits.

    Attributes:
        name: registered task name.
        model: the freshly initialised model (on the task's device and dtype).
        loss_fn: the mean-reduced loss module.
        classification: whether accuracy is a meaningful metric.
        default_batch_size: the paper's dataset default batch size.
        default_epochs: the paper's fixed-epoch budget (``None`` for step-budgeted tasks).
        default_steps: the step budget (Rosenbrock), else ``None``.
        spec: the spec the task was built from.
        device: the device of the model and the data.
        dtype: the floating-point dtype of the model and the inputs.
    """

    name: ClassVar[str] = ""
    model: nn.Module
    loss_fn: nn.Module
    classification: bool = False
    default_batch_size: int = 1
    default_epochs: int | None = None
    default_steps: int | None = None
    spec: TaskSpec
    device: torch.device
    dtype: torch.dtype

    @abstractmethod
    def train_size(self) -> int:
        """Number of training examples (sequences/windows for PTB)."""

    @abstractmethod
    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch of shuffled training batches (seeded by ``generator``); the last batch may be
        smaller; a batch size above the dataset size gives one full batch."""

    def steps_per_epoch(self, batch_size: int) -> int:
        """Number of batches :meth:`train_batches` yields for ``batch_size``."""
        n = self.train_size()
        return max(1, -(-n // batch_size))

    def num_parameters(self) -> int:
        """Number of scalar parameters of :attr:`model`."""
        return sum(p.numel() for p in self.model.parameters())

    def split_sizes(self) -> dict[str, int]:
        """Number of examples (tokens for PTB) in each split, as used by the task."""
        raise NotImplementedError

    @abstractmethod
    def evaluate(
        self, model: nn.Module, split: Literal["train", "val", "test"]
    ) -> dict[str, float]:
        """Mean loss (and ``accuracy`` for classification) of ``model`` on a whole split, in eval
        mode, without changing the model's mode or buffers."""


TASKS: Registry[TaskSpec] = Registry("task")
"""Task specs (:class:`TaskSpec` subclasses) by name; ``qlrlab tasks`` lists them."""
