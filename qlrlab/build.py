"""Building an optimiser from a spec: the layer above the spec models and the optimiser.

:func:`build_optimizer` resolves a preset name or a mapping into an
:class:`~qlrlab.specs.OptimizerSpec`, builds each component from its spec and composes them into a
:class:`~qlrlab.optimizer.ComposedOptimizer`. Neither the specs nor the optimiser import this
module (``tests/test_layers.py`` checks the direction of every import).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from qlrlab.optimizer import ComposedOptimizer
from qlrlab.presets import get_preset
from qlrlab.specs import OptimizerSpec

__all__ = ["build_optimizer", "resolve_spec"]


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
) -> ComposedOptimizer:
    """Build a :class:`ComposedOptimizer` from a spec.

    Args:
        spec: an :class:`OptimizerSpec`, a mapping validated into one, or a preset name.
        model: the model to optimise.
        loss_fn: the mean-reduced loss module.
        params: parameters or param groups (default: all trainable parameters of ``model``).
        all_reduce: data-parallel averaging of scalars (see :mod:`qlrlab.distributed`).
        grad_all_reduce: in-place data-parallel averaging of the gradients (not needed with a
            DDP-wrapped model); :func:`qlrlab.distributed.build_distributed_optimizer` sets both.

    Returns:
        The optimiser; call ``opt.step((inputs, targets))``.
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
    )
