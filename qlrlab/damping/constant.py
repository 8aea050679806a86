"""Constant damping :math:`\\lambda` (0 = undamped, the paper's "AdamQLR (Undamped)")."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from qlrlab.interfaces import DampingSchedule
from qlrlab.registry import DAMPINGS, ComponentSpec

__all__ = ["ConstantDamping", "ConstantSpec"]


@DAMPINGS.register("constant")
class ConstantSpec(ComponentSpec):
    """Spec of constant damping.

    Attributes:
        value: :math:`\\lambda \\ge 0`.
    """

    name: Literal["constant"] = "constant"
    value: float = Field(0.0, ge=0.0)

    def build(self) -> ConstantDamping:
        """Build the schedule."""
        return ConstantDamping(self)


class ConstantDamping(DampingSchedule):
    """:math:`\\lambda` never changes."""

    spec: ConstantSpec

    def __init__(self, spec: ConstantSpec | None = None) -> None:
        super().__init__(spec or ConstantSpec())

    @property
    def value(self) -> float:
        """The constant :math:`\\lambda`."""
        return self.spec.value

    def state_dict(self) -> dict[str, Any]:
        """Nothing to save beyond the spec."""
        return {"value": self.spec.value}
