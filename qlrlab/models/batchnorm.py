r"""BatchNorm that matches Haiku's and is safe inside ``torch.func`` transforms.

:class:`BatchNorm2d` is a drop-in :class:`torch.nn.BatchNorm2d` (so ``isinstance`` checks and
:func:`qlrlab._passes.side_effect_free` keep working) with three differences:

* **Side-effect free under transforms.** In training mode it always normalises with the batch
  statistics, and it updates the running statistics only outside ``torch.func`` transforms
  (``jvp``, ``vjp``, ``grad``, ``vmap``...) and only while ``track_running_stats`` is true.
  PyTorch's own layer writes its running buffers in place during a transform and fails with
  "attempted to call in-place operation ... that would mutate a captured Tensor"; this one
  simply skips the write, so JVP/Hessian curvature passes see exactly the gradient pass's
  function (batch statistics) and leave the EMAs untouched.
* **Biased running variance**, :math:`\mathbb E[x^2] - \mathbb E[x]^2` (PyTorch stores the unbiased
  one).
* **Zero-debiased EMAs** (Haiku ``ExponentialMovingAverage(zero_debias=True)``): with decay
  :math:`\beta = 1 - \text{momentum}` and :math:`t` updates so far, the stored value is
  :math:`\hat s_t = \tilde s_t / (1 - \beta^t)` where :math:`\tilde s_t = \beta \tilde s_{t-1} +
  (1-\beta) s_t`, :math:`\tilde s_0 = 0`. After the first batch the running statistics equal that
  batch's statistics. ``zero_debias=False`` gives the plain EMA from PyTorch's initial (0, 1).

Haiku ResNet uses decay 0.9 (``momentum=0.1``) and ``eps=1e-5``, the defaults here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlrlab import _compat

__all__ = ["BatchNorm2d", "in_functorch_transform"]


def in_functorch_transform() -> bool:
    """Whether the caller runs inside a ``torch.func`` transform (jvp, vjp, grad, vmap...)."""
    return _compat.in_functorch_transform()


class BatchNorm2d(nn.BatchNorm2d):
    """2-d batch normalisation with Haiku semantics and ``torch.func`` safety (see module doc).

    Args:
        num_features: channels :math:`C` of the ``[N, C, H, W]`` input.
        eps: added to the variance.
        momentum: EMA weight of the new batch (Haiku decay = 1 − momentum).
        zero_debias: Haiku-style zero-debiased running statistics.
        device: parameter device.
        dtype: parameter dtype.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        zero_debias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, device=device, dtype=dtype)
        self.zero_debias = zero_debias

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` (batch statistics in training mode, running ones in eval)."""
        self._check_input_dim(input)
        if not self.training and self.running_mean is not None:
            return F.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                self.eps,
            )  # fmt: skip
        out = F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if self.training and self.track_running_stats and not in_functorch_transform():
            self._update_running_stats(input)
        return out

    @torch.no_grad()
    def _update_running_stats(self, input: Tensor) -> None:
        if self.running_mean is None or self.running_var is None:
            return
        x = input.detach()
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        assert self.num_batches_tracked is not None
        self.num_batches_tracked.add_(1)
        decay = 1.0 - float(self.momentum if self.momentum is not None else 0.1)
        if self.zero_debias:  # tensor arithmetic: no host-device synchronisation
            t = self.num_batches_tracked.to(self.running_mean.dtype)
            norm = 1.0 - decay**t
            old_w = decay * (1.0 - decay ** (t - 1.0)) / norm
            new_w = (1.0 - decay) / norm
        else:
            old_w = torch.tensor(decay, dtype=self.running_mean.dtype)
            new_w = torch.tensor(1.0 - decay, dtype=self.running_mean.dtype)
        self.running_mean.mul_(old_w).add_(mean.to(self.running_mean.dtype) * new_w)
        self.running_var.mul_(old_w).add_(var.to(self.running_var.dtype) * new_w)
