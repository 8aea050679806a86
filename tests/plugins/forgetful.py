"""A deliberately broken component for the contract tests: a heavy-ball direction whose
``state_dict`` forgets its momentum buffers (so checkpoints and undone steps lose them)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from qlrlab.interfaces import DirectionProvider, StepContext
from qlrlab.registry import DIRECTIONS, ComponentSpec


@DIRECTIONS.register("forgetful_momentum", overwrite=True)
class ForgetfulSpec(ComponentSpec):
    name: Literal["forgetful_momentum"] = "forgetful_momentum"

    def build(self) -> ForgetfulMomentum:
        return ForgetfulMomentum(self)


class ForgetfulMomentum(DirectionProvider):
    def __init__(self, spec: ForgetfulSpec | None = None) -> None:
        super().__init__(spec or ForgetfulSpec())
        self.buffers: list[Tensor] | None = None

    @torch.no_grad()
    def compute(self, grads: list[Tensor], ctx: StepContext) -> list[Tensor]:
        if self.buffers is None:
            self.buffers = [g.clone() for g in grads]
        else:
            for b, g in zip(self.buffers, grads):
                b.mul_(0.9).add_(g)
        return [b.clone() for b in self.buffers]

    def state_dict(self) -> dict[str, Any]:
        return {}  # the bug: the momentum buffers are state but are not saved
