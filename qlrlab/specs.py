"""The optimiser spec: one validated document naming a component of each family.

Example (YAML)::

    direction: {name: adam, beta1: 0.9, beta2: 0.999, eps: 1.0e-8}
    curvature: {name: ggn}
    step_size: {name: quadratic}
    damping: {name: levenberg_marquardt, initial: 1.0e-3, decrease: 0.5, increase: 2.0}

Every level rejects unknown keys; unknown component names are rejected with the list of
registered names; incompatible combinations are rejected at validation time with the reason.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Union

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializeAsAny,
    create_model,
    model_validator,
)

from qlrlab.registry import CURVATURES, DAMPINGS, DIRECTIONS, STEP_SIZES, ComponentSpec, Registry

__all__ = ["OptimizerSpec", "optimizer_json_schema"]

DirectionField = Annotated[SerializeAsAny[ComponentSpec], BeforeValidator(DIRECTIONS.validate)]
CurvatureField = Annotated[SerializeAsAny[ComponentSpec], BeforeValidator(CURVATURES.validate)]
StepSizeField = Annotated[SerializeAsAny[ComponentSpec], BeforeValidator(STEP_SIZES.validate)]
DampingField = Annotated[SerializeAsAny[ComponentSpec], BeforeValidator(DAMPINGS.validate)]


def _default_damping() -> ComponentSpec:
    return DAMPINGS.validate({"name": "constant", "value": 0.0})


class OptimizerSpec(BaseModel):
    """A composed optimiser: direction, curvature oracle, step-size rule and damping schedule.

    Attributes:
        direction: direction provider spec (``adam``, ``sgd``, ``kfac``...).
        curvature: curvature oracle spec (``ggn``, ``hessian``...) or ``None``.
        step_size: step-size rule spec (``fixed``, ``quadratic``...).
        damping: damping schedule spec (default: ``constant`` 0).
        track_rho: evaluate :math:`f(\\theta_{new})` and :math:`\\rho` every step even when no
            component needs them (one extra forward pass; for logging studies).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    direction: DirectionField
    curvature: CurvatureField | None = None
    step_size: StepSizeField = Field(default_factory=lambda: STEP_SIZES.validate("fixed"))
    damping: DampingField = Field(default_factory=_default_damping)
    track_rho: bool = False

    @model_validator(mode="after")
    def _check_compatibility(self) -> OptimizerSpec:
        if self.curvature is None:
            for family in ("direction", "step_size", "damping"):
                comp = getattr(self, family)
                if type(comp).requires_curvature:
                    raise ValueError(
                        f"{family} {comp.name!r} needs a curvature oracle, but curvature is null; "
                        f"set curvature: {{name: ggn}} (registered: {', '.join(CURVATURES.names())})"
                    )
            if self.track_rho:
                raise ValueError("track_rho needs a curvature oracle for the predicted change")
        return self

    # -- I/O ---------------------------------------------------------------------------------
    def to_yaml(self, path: str | Path | None = None) -> str:
        """Dump as YAML (and write it to ``path`` if given)."""
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, source: str | Path) -> OptimizerSpec:
        """Load from a YAML file path or a YAML string (safe loading only)."""
        text = Path(source).read_text() if _is_path(source) else str(source)
        return cls.model_validate(yaml.safe_load(text))


def _is_path(source: str | Path) -> bool:
    if isinstance(source, Path):
        return True
    return "\n" not in source and source.endswith((".yaml", ".yml", ".json"))


def _union(registry: Registry[ComponentSpec]) -> Any:
    classes = [registry.get(n) for n in registry.names()]
    if len(classes) == 1:
        return classes[0]
    return Annotated[Union[tuple(classes)], Field(discriminator="name")]  # noqa: UP007


def optimizer_json_schema() -> dict[str, Any]:
    """JSON schema of :class:`OptimizerSpec` with every *currently registered* component."""
    model = create_model(
        "OptimizerSpec",
        __config__=ConfigDict(extra="forbid"),
        direction=(_union(DIRECTIONS), ...),
        curvature=(_union(CURVATURES) | None, None),
        step_size=(_union(STEP_SIZES), {"name": "fixed"}),
        damping=(_union(DAMPINGS), {"name": "constant", "value": 0.0}),
        track_rho=(bool, False),
    )
    return model.model_json_schema()
