"""Test doubles the contract composes around the component under test.

Each wraps a real component and delegates everything to it (state included), except that it can
be told to spoil one step: :class:`PoisonedDirection` returns a NaN direction and
:class:`PoisonedStepSize` a NaN :math:`\\alpha` *after* the wrapped component ran (so its state
has changed and the refused step must undo it). :class:`Verdict` is a constant-:math:`\\lambda`
damping schedule that rejects the step when told to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from qlrlab.interfaces import (
    Component,
    DampingSchedule,
    DirectionProvider,
    Proposal,
    StepContext,
    StepSizeRule,
)

__all__ = ["PoisonedDirection", "PoisonedStepSize", "Verdict"]


class _Delegating(Component):
    """Forwards setup, the gradient pass and state to ``inner``."""

    inner: Any

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Forwarded."""
        self.inner.setup(params, model, loss_fn)

    def gradient_pass(self, model: nn.Module) -> Any:
        """Forwarded."""
        return self.inner.gradient_pass(model)

    def state_dict(self) -> dict[str, Any]:
        """Forwarded."""
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Forwarded."""
        self.inner.load_state_dict(state)

    def snapshot(self) -> Any:
        """Forwarded."""
        return self.inner.snapshot()

    def restore(self, snapshot: Any) -> None:
        """Forwarded."""
        self.inner.restore(snapshot)


class PoisonedDirection(_Delegating, DirectionProvider):
    """``inner``'s direction, or NaNs (after ``inner`` ran) while :attr:`poison` is set."""

    def __init__(self, inner: DirectionProvider) -> None:
        super().__init__(inner.spec)
        self.inner = inner
        self.poison = False

    def compute(self, grads: list[Tensor], ctx: StepContext) -> list[Tensor]:
        """The wrapped direction (NaN while poisoned)."""
        d = self.inner.compute(grads, ctx)
        return [t * float("nan") for t in d] if self.poison else d


class PoisonedStepSize(_Delegating, StepSizeRule):
    """``inner``'s proposal, or a NaN :math:`\\alpha` (after ``inner`` ran) while poisoned."""

    def __init__(self, inner: StepSizeRule) -> None:
        super().__init__(inner.spec)
        self.inner = inner
        self.initial_group_lr = inner.initial_group_lr
        self.poison = False

    def propose(self, ctx: StepContext) -> Proposal:
        """The wrapped proposal (NaN :math:`\\alpha` while poisoned)."""
        proposal = self.inner.propose(ctx)
        if self.poison:
            return Proposal(alpha=proposal.alpha * float("nan"))
        return proposal


class Verdict(DampingSchedule):
    """Constant :math:`\\lambda`; asks for :math:`\\rho` every step and rejects while
    :attr:`reject` is set."""

    may_reject = True

    def __init__(self, value: float = 1e-3) -> None:
        super().__init__(None)
        self._value = value
        self.reject = False

    @property
    def value(self) -> float:
        """The constant :math:`\\lambda`."""
        return self._value

    def needs_new_loss(self, step: int) -> bool:
        """Every step."""
        return True

    def update(self, *, rho: float | None, loss: float, new_loss: float | None, step: int) -> bool:
        """Accept unless told to reject."""
        return not self.reject
