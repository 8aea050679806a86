r"""The Rosenbrock problem in least-squares form (AdamQLR v3).

:math:`R(x, y) = (a - x)^2 + b (y - x^2)^2` with :math:`a=1, b=100`, started at :math:`(1, -1)`.
The model's output is the residual vector :math:`r = (a - x, \sqrt b (y - x^2))` and the loss is
:class:`qlrlab.losses.HalfMSELoss` against zeros, i.e. :math:`\tfrac14 (r_1^2 + r_2^2) = R/4`.
There are no data: a batch is a dummy input ``[1, 1]`` with zero targets ``[1, 2]``; the budget
is 200 steps at batch size 1 (one step per "epoch").
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from qlrlab.losses import HalfMSELoss
from qlrlab.models import RosenbrockModel
from qlrlab.tasks._common import build_model, preserve_mode
from qlrlab.tasks.base import TASKS, Batch, Task, TaskSpec

__all__ = ["RosenbrockSpec", "RosenbrockTask"]


@TASKS.register("rosenbrock")
class RosenbrockSpec(TaskSpec):
    r"""Rosenbrock (least-squares form); 200 steps from ``start`` at batch size 1.

    Attributes:
        a: Rosenbrock :math:`a` (minimum at :math:`(a, a^2)`).
        b: Rosenbrock :math:`b`.
        start: initial ``(x, y)``, or ``"normal"``: :math:`x, y \sim N(0, 1)` drawn from the run's
            seed (the paper's tuning start; its repeats start from the fixed ``(1, -1)``).
        steps: step budget.
    """

    name: Literal["rosenbrock"] = "rosenbrock"
    a: float = 1.0
    b: float = 100.0
    start: tuple[float, float] | Literal["normal"] = (1.0, -1.0)
    steps: int = 200

    def build(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> RosenbrockTask:
        """Build the two-parameter model on ``device``."""
        return RosenbrockTask(self, torch.device(device), dtype)


class RosenbrockTask(Task):
    """The built ``rosenbrock`` task."""

    name = "rosenbrock"
    default_batch_size = 1
    default_epochs = None

    def __init__(self, spec: RosenbrockSpec, device: torch.device, dtype: torch.dtype) -> None:
        self.spec = spec
        self.device = device
        self.dtype = dtype
        self.default_steps = spec.steps

        def factory() -> RosenbrockModel:
            if spec.start == "normal":  # the global RNG, which the run has seeded
                x, y = torch.randn(2, dtype=torch.float64).tolist()
                return RosenbrockModel(spec.a, spec.b, (x, y))
            return RosenbrockModel(spec.a, spec.b, spec.start)

        self.model = build_model(factory, None, device, dtype)
        self.loss_fn = HalfMSELoss()
        self._batch = (
            torch.zeros(1, 1, device=device, dtype=dtype),
            torch.zeros(1, 2, device=device, dtype=dtype),
        )

    def train_size(self) -> int:
        """One (dummy) example."""
        return 1

    def split_sizes(self) -> dict[str, int]:
        """One dummy example in every split."""
        return {"train": 1, "val": 1, "test": 1}

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One dummy batch per epoch."""
        yield self._batch

    def evaluate(
        self, model: nn.Module, split: Literal["train", "val", "test"]
    ) -> dict[str, float]:
        """The loss :math:`R/4` at the model's current ``(x, y)`` (all splits alike)."""
        with preserve_mode(model, False), torch.no_grad():
            return {"loss": float(self.loss_fn(model(self._batch[0]), self._batch[1]))}
