"""The paper's seven problems as named tasks (plus the :class:`Task` contract).

=================  ====================================================  ===========  ======
name               data / model                                          batch        budget
=================  ====================================================  ===========  ======
``rosenbrock``     least-squares Rosenbrock, 2 parameters                1            200 steps
``uci_energy``     UCI Energy 588/104/76, MLP 8-50-1, ½·MSE              588          4000 ep.
``uci_protein``    UCI Protein 34,983/6,174/4,573, MLP 9-100-1, ½·MSE    1000         200 ep.
``fashion_mnist``  Fashion-MNIST 50k/10k/10k, MLP 784-50-10, CE         50           10 ep.
``svhn``           SVHN 61,047/12,210/26,032, ResNet-18, CE             256          10 ep.
``cifar10``        CIFAR-10 45k/5k/10k, ResNet-18, crop+flip, CE         128          72 ep.
``ptb``            PTB words, GPT-2 12×768 (configurable), CE/token     30 × 70      100 ep.
=================  ====================================================  ===========  ======

Build one with ``build_task("cifar10", device="cuda")`` or
``build_task({"name": "ptb", "n_layer": 2}, device="cpu")``.
"""

from __future__ import annotations

from typing import Any

import torch

from qlrlab.tasks.base import TASKS, Batch, Task, TaskSpec
from qlrlab.tasks.images import CIFAR10Spec, FashionMNISTSpec, SVHNSpec
from qlrlab.tasks.ptb import PTBSpec
from qlrlab.tasks.rosenbrock import RosenbrockSpec
from qlrlab.tasks.uci import UCIEnergySpec, UCIProteinSpec

__all__ = [
    "TASKS",
    "Batch",
    "CIFAR10Spec",
    "FashionMNISTSpec",
    "PTBSpec",
    "RosenbrockSpec",
    "SVHNSpec",
    "Task",
    "TaskSpec",
    "UCIEnergySpec",
    "UCIProteinSpec",
    "build_task",
    "list_tasks",
    "task_spec",
]


def task_spec(spec: str | dict[str, Any] | TaskSpec) -> TaskSpec:
    """Validate a task name, mapping (``{"name": ..., **fields}``) or spec into a spec."""
    return TASKS.validate(spec)


def build_task(
    spec: str | dict[str, Any] | TaskSpec,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Task:
    """Build a task from its name, a mapping or a spec.

    Args:
        spec: e.g. ``"uci_energy"``, ``{"name": "cifar10", "stem": "cifar"}`` or a spec.
        device: where the model and data go.
        dtype: floating dtype of the model and inputs.
    """
    return task_spec(spec).build(device=device, dtype=dtype)


def list_tasks() -> list[str]:
    """Registered task names (sorted)."""
    return TASKS.names()
