"""Building an optimiser from a spec: the layer above the spec models and the optimiser.

:func:`build_optimizer` resolves a preset name or a mapping into an
:class:`~qlrlab.specs.OptimizerSpec`, builds each component from its spec and composes them into a
:class:`~qlrlab.optimizer.ComposedOptimizer`. Neither the specs nor the optimiser import this
module (``tests/test_layers.py`` checks the direction of every import).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from qlrlab.distributed import all_reduce_gradients, all_reduce_mean, is_distributed
from qlrlab.optimizer import ComposedOptimizer
from qlrlab.presets import get_preset
from qlrlab.specs import OptimizerSpec

__all__ = ["build_distributed_optimizer", "build_optimizer", "resolve_spec"]


def resolve_spec(spec: OptimizerSpec | Mapping[str, Any] | str) -> OptimizerSpec:
    """An :class:`OptimizerSpec` from a spec, a mapping validated into one, or a preset name."""
    if isinstance(spec, str):
        return get_preset(spec)
    if isinstance(spec, OptimizerSpec):
        return spec
    return OptimizerSpec.model_validate(dict(spec))


def build_optimizer(
    spec: OptimizerSpec | Mapping[str, Any] | str,
    model: nn.Module,
    loss_fn: nn.Module,
    params: Iterable[Any] | None = None,
    *,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    grad_all_reduce: Callable[[list[Tensor]], None] | None = None,
    output: str | int | Callable[[Any], Tensor] | None = None,
) -> ComposedOptimizer:
    """Build a :class:`ComposedOptimizer` from a spec.

    Args:
        spec: an :class:`OptimizerSpec`, a mapping validated into one, or a preset name.
        model: the model to optimise.
        loss_fn: the mean-reduced loss module.
        params: parameters or param groups (default: all trainable parameters of ``model``).
        all_reduce: data-parallel averaging of scalars (see :mod:`qlrlab.distributed`).
        grad_all_reduce: in-place data-parallel averaging of the gradients (not needed with a
            DDP-wrapped model); :func:`build_distributed_optimizer` sets both.
        output: which output of the model feeds the loss when the model returns a dict, a
            Hugging Face ``ModelOutput`` or a tuple: a key (``"logits"``), an index, or a
            callable ``outputs -> tensor``.

    Returns:
        The optimiser; call ``opt.step((inputs, targets))``, ``opt.step(closure)`` or
        ``loss.backward(); opt.step()``.
    """
    spec = resolve_spec(spec)
    return ComposedOptimizer(
        params,
        model=model,
        loss_fn=loss_fn,
        direction=spec.direction.build(),
        curvature=spec.curvature.build() if spec.curvature is not None else None,
        step_size=spec.step_size.build(),
        damping=spec.damping.build(),
        spec=spec,
        track_rho=spec.track_rho,
        all_reduce=all_reduce,
        grad_all_reduce=grad_all_reduce,
        output=output,
        gradient=spec.gradient,
    )


def build_distributed_optimizer(
    spec: Any,
    model: nn.Module,
    loss_fn: nn.Module,
    params: Iterable[Any] | None = None,
    *,
    group: Any = None,
    sync_initial_parameters: bool = True,
) -> Any:
    """:func:`qlrlab.build_optimizer` wired for data parallelism.

    Scalars are averaged with :func:`all_reduce_mean`; gradients with
    :func:`all_reduce_gradients` unless ``model`` is a ``DistributedDataParallel`` module
    (whose backward already averages them). Outside a process group this is exactly
    ``build_optimizer``.

    Args:
        spec: optimiser spec, mapping or preset name.
        model: the model (plain, or wrapped in ``DistributedDataParallel``).
        loss_fn: mean-reduced loss.
        params: parameters or groups (default: all trainable parameters).
        group: process group (default: the world).
        sync_initial_parameters: broadcast rank 0's parameters and buffers first (DDP does
            this itself).
    """
    if not is_distributed():
        return build_optimizer(spec, model, loss_fn, params)
    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    if sync_initial_parameters and not ddp:
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                src = dist.get_global_rank(group, 0) if group is not None else 0
                dist.broadcast(t, src=src, group=group)

    def reduce_scalar(t: Tensor) -> Tensor:
        return all_reduce_mean(t, group)

    def reduce_grads(gs: list[Tensor]) -> None:
        all_reduce_gradients(gs, group)

    return build_optimizer(
        spec,
        model,
        loss_fn,
        params,
        all_reduce=reduce_scalar,
        grad_all_reduce=None if ddp else reduce_grads,
    )
