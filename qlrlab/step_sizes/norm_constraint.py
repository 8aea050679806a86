r"""K-FAC's norm constraint on a fixed-learning-rate update (Martens & Grosse, 2015; kfac-jax).

With a fixed learning rate :math:`\alpha`, the direction is shrunk so that the step's squared
norm *in the preconditioner's metric* stays below a bound :math:`c`:

.. math::

    \kappa = \min\Big(1, \sqrt{c \,/\, \textstyle\sum_i \alpha_i^2\, g_i^\top d_i}\Big),
    \qquad d \leftarrow \kappa\, d,

where :math:`i` runs over parameter tensors with effective learning rates :math:`\alpha_i` (the
rule's rate times the param group's ``lr``). For :math:`d = P g` (K-FAC, :math:`P \approx
(F+\lambda I)^{-1}`), :math:`\alpha^2 g^\top d = \|\alpha d\|^2_{P^{-1}}` is the step's squared
approximate-Fisher norm; for :math:`d = g` (SGD) it is :math:`\|\alpha g\|^2`, i.e. gradient
clipping at norm :math:`\sqrt c/\alpha`. The constraint is applied before momentum, as in
kfac-jax, and only to non-adaptive rules (``fixed`` and ``momentum``): kfac-jax rejects it with an
adaptive learning rate, and qlrlab's adaptive rules do not accept the field. A non-positive
:math:`g^\top d` (an indefinite preconditioner) leaves the direction unscaled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from qlrlab._tensorlist import dot

__all__ = ["norm_constraint_coefficient"]


def norm_constraint_coefficient(
    grads: Sequence[Tensor], direction: Sequence[Tensor], lrs: Sequence[float], bound: float
) -> Tensor:
    r""":math:`\kappa = \min(1, \sqrt{c / \sum_i \alpha_i^2 g_i^\top d_i})` as a 0-d tensor (1 when
    the sum is not positive), without a host synchronisation.

    Args:
        grads: the gradient tensors :math:`g_i`.
        direction: the direction tensors :math:`d_i`, in the same order.
        lrs: the effective learning rate :math:`\alpha_i` of each tensor.
        bound: :math:`c > 0`.
    """
    if not direction:
        return torch.ones(())
    ref = direction[0]
    if all(lr == lrs[0] for lr in lrs):
        total = dot(list(grads), list(direction)) * lrs[0] ** 2
    else:
        total = torch.stack(
            [(g * d).sum() * lr**2 for g, d, lr in zip(grads, direction, lrs)]
        ).sum()
    tiny = torch.finfo(ref.dtype).tiny
    return torch.sqrt(bound / total.clamp_min(tiny)).clamp_max(1.0).to(ref.dtype)
