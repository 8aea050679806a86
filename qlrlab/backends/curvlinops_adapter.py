"""Reference back-end: curvlinops linear operators, rebuilt for every bound batch.

curvlinops reads the live ``nn.Parameter`` objects and keeps the data by reference; operators are
built with ``check_deterministic=False`` and an explicit ``num_data`` (building costs ~0.05 ms), so
a fresh operator per step is never stale. ``HalfMSELoss`` is passed to curvlinops as
``nn.MSELoss`` and the result is halved.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from qlrlab.interfaces import BoundCurvature, Problem
from qlrlab.losses import HalfMSELoss

__all__ = ["CurvlinopsBound", "check_curvlinops_support", "curvlinops_loss"]

_SUPPORTED = (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss)


def curvlinops_loss(loss_fn: nn.Module) -> tuple[nn.Module, float]:
    """The loss module to hand to curvlinops and the factor to scale its curvature by."""
    if isinstance(loss_fn, HalfMSELoss):
        return nn.MSELoss(reduction=loss_fn.reduction), 0.5
    if isinstance(loss_fn, _SUPPORTED):
        return loss_fn, 1.0
    raise ValueError(
        f"curvature.backend: curvlinops supports MSELoss, CrossEntropyLoss, BCEWithLogitsLoss and "
        f"qlrlab HalfMSELoss, not {type(loss_fn).__name__}; use backend: own"
    )


def check_curvlinops_support(model: nn.Module, loss_fn: nn.Module) -> None:
    """Raise ``ValueError`` for set-ups the curvlinops back-end cannot handle."""
    curvlinops_loss(loss_fn)


class CurvlinopsBound(BoundCurvature):
    """A curvlinops operator (``GGNLinearOperator`` or ``HessianLinearOperator``) on one batch."""

    def __init__(self, problem: Problem, operator_cls: Any) -> None:
        for m in problem.model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.training:
                raise ValueError(
                    f"curvature.backend: curvlinops cannot evaluate train-mode BatchNorm "
                    f"({type(m).__name__}) because its per-sample torch.func passes break batch "
                    f"statistics; use backend: own, or put the model in eval mode"
                )
        loss, self.scale = curvlinops_loss(problem.loss_fn)
        x = problem.inputs
        if isinstance(x, (tuple, list)):
            raise ValueError("curvature.backend: curvlinops needs a single input tensor; use own")
        self.op = operator_cls(
            problem.model,
            loss,
            problem.params,
            [(x, problem.targets)],
            check_deterministic=False,
            num_data=problem.batch_size,
        )

    def matvec(self, v: list[Tensor]) -> list[Tensor]:
        """:math:`Cv` through curvlinops."""
        out = self.op @ [t.detach() for t in v]
        return [self.scale * o for o in out]
