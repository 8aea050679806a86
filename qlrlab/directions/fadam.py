r"""FAdam: Adam as natural-gradient descent with the diagonal empirical Fisher (Hwang, 2024).

Per parameter tensor, at step :math:`t` with gradient :math:`g_t` and parameters
:math:`\theta_{t-1}` (symbols as in the paper's Algorithm 1):

.. math::
    \begin{aligned}
    \hat\beta_2 &= \beta_2\,\frac{1-\beta_2^{t-1}}{1-\beta_2^{t}}
        &&\text{(bias correction folded into the EMA weight)}\\
    F_t &= \hat\beta_2 F_{t-1} + (1-\hat\beta_2)\, g_t^2
        &&\text{(diagonal empirical Fisher, } F_0 = 0)\\
    \hat\epsilon &= \min(\epsilon,\ \epsilon_2\operatorname{RMS}(g_t))
        &&\text{(adaptive } \epsilon)\\
    \bar g_t &= g_t / (F_t^{\,p} + \hat\epsilon^{\,2p})
        &&\text{(natural gradient)}\\
    \bar g_t &\leftarrow \bar g_t / \max(1, \operatorname{RMS}(\bar g_t)/c)
        &&\text{(clipping)}\\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1)\,\bar g_t
        &&\text{(momentum of the natural gradient)}\\
    \bar g_{w} &= \theta_{t-1} / (F_t^{\,p} + \hat\epsilon^{\,2p}),\quad
    \bar g_{w} \leftarrow \bar g_{w} / \max(1, \operatorname{RMS}(\bar g_{w})/c)
        &&\text{(weight decay as a natural gradient)}\\
    d_t &= m_t + \lambda\,\bar g_{w}
        &&(\theta_t = \theta_{t-1} - \eta\, d_t)
    \end{aligned}

:math:`\operatorname{RMS}(x) = \sqrt{\operatorname{mean}(x^2)}` over one parameter tensor. With
:math:`F_0 = 0` the debiased EMA equals Adam's bias-corrected second moment,
:math:`F_t = v_t/(1-\beta_2^t)`; the first moment is *not* bias-corrected (the paper moves the
momentum after the preconditioning, onto the natural gradient). With :math:`p = 1/2` the
stabiliser :math:`\hat\epsilon^{2p}` is :math:`\hat\epsilon`. The paper's learning rate
:math:`\eta` is the step-size rule's :math:`\alpha` (``fixed`` for FAdam itself, ``quadratic`` for
the QLR heuristics); its weight decay :math:`\lambda` is the spec's ``weight_decay`` (named so
because :math:`\lambda` is qlrlab's damping), off by default.

The adaptive :math:`\epsilon` and the :math:`\hat\epsilon^{2p}` stabiliser follow the authors'
reference implementation as released in ``pytorch-optimizer`` (:math:`\epsilon_2 = 0.01`);
``eps2=None`` uses the plain :math:`\epsilon^{2p}`.

Reference:
    D. Hwang, *FAdam: Adam is a natural gradient optimizer using diagonal empirical Fisher
    information*, arXiv:2405.12807, 2024.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from qlrlab.interfaces import DirectionProvider, StepContext
from qlrlab.registry import DIRECTIONS, ComponentSpec

__all__ = ["FAdamDirection", "FAdamSpec"]


@DIRECTIONS.register("fadam")
class FAdamSpec(ComponentSpec):
    """Spec of the FAdam direction (paper symbols in brackets).

    Attributes:
        beta1: momentum decay [:math:`\\beta_1`], in [0, 1).
        beta2: Fisher EMA decay [:math:`\\beta_2`], in [0, 1).
        eps: stabiliser [:math:`\\epsilon`] (upper bound of the adaptive one), :math:`\\ge 0`.
        eps2: adaptive-:math:`\\epsilon` factor [:math:`\\epsilon_2`]:
            :math:`\\hat\\epsilon = \\min(\\epsilon, \\epsilon_2 \\operatorname{RMS}(g))` (:math:`\\epsilon` for
            a zero gradient); ``None``: :math:`\\hat\\epsilon = \\epsilon`.
        c: clipping threshold [:math:`c`] of the RMS of the natural gradient and of the
            weight-decay term, :math:`> 0`.
        p: Fisher power [:math:`p`] (1/2: Adam's square root), in (0, 1].
        weight_decay: weight decay [:math:`\\lambda`], :math:`\\ge 0`.
    """

    name: Literal["fadam"] = "fadam"
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.999, ge=0.0, lt=1.0)
    eps: float = Field(1e-8, ge=0.0)
    eps2: float | None = Field(0.01, ge=0.0)
    c: float = Field(1.0, gt=0.0)
    p: float = Field(0.5, gt=0.0, le=1.0)
    weight_decay: float = Field(0.0, ge=0.0)

    def build(self) -> FAdamDirection:
        """Build the direction provider."""
        return FAdamDirection(self)


def _rms(x: Tensor) -> Tensor:
    return x.square().mean().sqrt()


class FAdamDirection(DirectionProvider):
    """FAdam direction provider; state: ``step``, ``momentum`` (:math:`m`) and ``fim``
    (:math:`F`), one tensor per parameter."""

    spec: FAdamSpec

    def __init__(self, spec: FAdamSpec | None = None) -> None:
        super().__init__(spec or FAdamSpec())
        self.step = 0
        self.momentum: list[Tensor] = []
        self.fim: list[Tensor] = []

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Allocate :math:`m_0 = F_0 = 0` shaped like ``params``."""
        self.momentum = [torch.zeros_like(p) for p in params]
        self.fim = [torch.zeros_like(p) for p in params]
        self.step = 0

    @torch.no_grad()
    def compute(self, grads: list[Tensor], ctx: StepContext) -> list[Tensor]:
        """Update :math:`F` and :math:`m` with ``grads``; return :math:`d = m + \\lambda\\bar
        g_w`."""
        s = self.spec
        self.step += 1
        t = self.step
        beta2_hat = s.beta2 * (1.0 - s.beta2 ** (t - 1)) / (1.0 - s.beta2**t)
        out: list[Tensor] = []
        for g, m, f, theta in zip(grads, self.momentum, self.fim, ctx.problem.params):
            f.mul_(beta2_hat).addcmul_(g, g, value=1.0 - beta2_hat)
            eps_hat: Tensor | float = s.eps
            if s.eps2 is not None:  # a zero gradient keeps the plain epsilon
                rms_g = _rms(g)
                eps_hat = torch.where(rms_g > 0, torch.clamp(s.eps2 * rms_g, max=s.eps), s.eps)
            denom = f.pow(s.p).add_(eps_hat ** (2.0 * s.p))
            g_nat = g / denom
            g_nat.div_(torch.clamp(_rms(g_nat) / s.c, min=1.0))
            m.lerp_(g_nat, 1.0 - s.beta1)
            d = m.clone()
            if s.weight_decay:
                g_w = theta.detach() / denom
                g_w.div_(torch.clamp(_rms(g_w) / s.c, min=1.0))
                d.add_(g_w, alpha=s.weight_decay)
            out.append(d)
        return out

    def state_dict(self) -> dict[str, Any]:
        """``step``, ``momentum`` and ``fim``."""
        return {"step": self.step, "momentum": self.momentum, "fim": self.fim}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy the saved state into the existing buffers."""
        self.step = int(state["step"])
        for dst, src in zip(self.momentum, state["momentum"]):
            dst.copy_(src)
        for dst, src in zip(self.fim, state["fim"]):
            dst.copy_(src)
