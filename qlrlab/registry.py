"""Explicit, user-extensible dispatch tables for the four component families.

Every component is described by a *spec*: a small pydantic model with a ``name`` field and the
component's hyperparameters, which knows how to ``build()`` the component. Specs are registered by
name in one :class:`Registry` per family, so a YAML/JSON document such as
``{"name": "adam", "beta1": 0.9}`` is dispatched to the right spec class. Users add their own
heuristics by registering a spec class from their own package::

    from qlrlab.registry import STEP_SIZES, ComponentSpec

    @STEP_SIZES.register("halved_fixed")
    class HalvedFixedSpec(ComponentSpec):
        name: Literal["halved_fixed"] = "halved_fixed"
        lr: float = 0.1

        def build(self) -> StepSizeRule:
            return HalvedFixed(self)

An unknown name is rejected with a message listing the registered names.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

__all__ = [
    "CURVATURES",
    "DAMPINGS",
    "DIRECTIONS",
    "STEP_SIZES",
    "ComponentSpec",
    "Registry",
]


class ComponentSpec(BaseModel):
    """Base class of every component spec.

    Subclasses declare ``name: Literal["..."]`` plus their hyperparameters, and implement
    :meth:`build`. Unknown keys are rejected (``extra="forbid"``) at every level.

    Class attributes let the composed optimiser check compatibility at construction time
    (kfac-jax style):

    Attributes:
        requires_curvature: the component cannot work without a curvature oracle.
        supports_nan_padding: the component works under a run's ``nan_padding`` (the engine's
            emulation of the original code's NaN padding of short batches); ``None`` (not
            declared) takes the family's default (:attr:`Registry.supports_nan_padding`). A spec
            whose answer depends on its fields overrides :meth:`nan_padding_unsupported`.
        renamed_values: values renamed after runs were stored, ``{field: {new: old}}``: the
            former spelling is accepted on input (and read as the new name), and the JSON form
            (stored specs, and hence run identities, :func:`qlrlab.engine.specs.run_hash`) keeps
            the former spelling, so that stored runs keep their hashes.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    requires_curvature: ClassVar[bool] = False
    supports_nan_padding: ClassVar[bool | None] = None
    renamed_values: ClassVar[dict[str, dict[Any, Any]]] = {}

    name: str

    @model_validator(mode="before")
    @classmethod
    def _accept_former_values(cls, data: Any) -> Any:
        """Read a renamed value's former spelling as its new name."""
        if cls.renamed_values and isinstance(data, dict):
            for field, renames in cls.renamed_values.items():
                value = data.get(field)
                for new, old in renames.items():
                    if isinstance(value, str) and value == old:
                        data = {**data, field: new}
        return data

    @model_serializer(mode="wrap", when_used="json")
    def _keep_former_values(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Write a renamed value in its former spelling in the JSON form (stored specs)."""
        data = handler(self)
        if self.renamed_values and isinstance(data, dict):
            for field, renames in self.renamed_values.items():
                value = data.get(field)
                if isinstance(value, str) and value in renames:
                    data[field] = renames[value]
        return data

    def nan_padding_unsupported(self, family: str) -> str | None:
        """Why this component cannot run under ``nan_padding`` (``None``: it can).

        Args:
            family: the component's family (``"direction"``, ``"curvature"``...), for the message.
        """
        if self.supports_nan_padding is False:
            return f"{family} {self.name!r} has no NaN-padding emulation"
        return None

    def build(self) -> Any:
        """Construct the component described by this spec."""
        raise NotImplementedError(f"{type(self).__name__} does not implement build()")


S = TypeVar("S", bound=ComponentSpec)


class Registry(Generic[S]):
    """A named table of component specs for one family (directions, curvature, ...).

    Args:
        family: the family's name as it appears in an ``OptimizerSpec`` (``"direction"``...).
        off: what switching the family off means (the value an ablation's ``minus:`` puts in
            its place, e.g. ``None`` for the curvature); leave unset for a family that cannot be
            switched off.
        supports_nan_padding: whether a component of this family that does not declare
            :attr:`ComponentSpec.supports_nan_padding` runs under ``nan_padding``.

    Attributes:
        can_switch_off: whether ``off`` was given.
    """

    def __init__(self, family: str, *, off: Any = ..., supports_nan_padding: bool = True) -> None:
        self.family = family
        self.supports_nan_padding = supports_nan_padding
        self._table: dict[str, type[S]] = {}
        self.can_switch_off = off is not ...
        self._off = off

    @property
    def off(self) -> Any:
        """The "switched off" value of this family (a copy; ``ValueError`` if it has none)."""
        if not self.can_switch_off:
            raise ValueError(f"the {self.family} family cannot be switched off")
        return copy.deepcopy(self._off)

    def register(self, name: str, *, overwrite: bool = False) -> Callable[[type[S]], type[S]]:
        """Class decorator registering a spec class under ``name``.

        Args:
            name: the value of the spec's ``name`` field.
            overwrite: allow replacing an existing entry (otherwise a ``ValueError``).
        """

        def deco(cls: type[S]) -> type[S]:
            if not (isinstance(cls, type) and issubclass(cls, ComponentSpec)):
                raise TypeError(f"{cls!r} must subclass qlrlab.registry.ComponentSpec")
            if name in self._table and not overwrite and self._table[name] is not cls:
                raise ValueError(
                    f"a {self.family} named {name!r} is already registered "
                    f"({self._table[name].__qualname__}); pass overwrite=True to replace it"
                )
            self._table[name] = cls
            return cls

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` from the table (mostly for tests)."""
        self._table.pop(name, None)

    def get(self, name: str) -> type[S]:
        """Return the spec class registered as ``name``.

        Raises:
            KeyError: with the list of registered names.
        """
        try:
            return self._table[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.family} {name!r}; registered: {', '.join(sorted(self._table))}"
            ) from None

    def names(self) -> list[str]:
        """Sorted registered names."""
        return sorted(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def nan_padding_unsupported(self, spec: ComponentSpec) -> str | None:
        """Why the component ``spec`` of this family cannot run under ``nan_padding`` (``None``:
        it can); an undeclared component takes the family's default."""
        if type(spec).supports_nan_padding is None and not self.supports_nan_padding:
            return f"{self.family} {spec.name!r} has no NaN-padding emulation"
        return spec.nan_padding_unsupported(self.family)

    def validate(self, value: Any) -> S:
        """Turn a mapping (or a name, or a spec instance) into the registered spec instance.

        Used as a pydantic ``BeforeValidator``; raises ``ValueError`` for unknown names so that
        pydantic reports the offending field.
        """
        if isinstance(value, ComponentSpec):
            if value.name not in self._table:
                raise ValueError(
                    f"unknown {self.family} {value.name!r}; registered: {', '.join(self.names())}"
                )
            return value  # type: ignore[return-value]
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ValueError(f"a {self.family} must be a mapping with a 'name' key, got {value!r}")
        if "name" not in value:
            raise ValueError(
                f"a {self.family} needs a 'name' key; registered: {', '.join(self.names())}"
            )
        name = value["name"]
        if name not in self._table:
            raise ValueError(
                f"unknown {self.family} {name!r}; registered: {', '.join(self.names())}"
            )
        return self._table[name].model_validate(value)


DIRECTIONS: Registry[ComponentSpec] = Registry("direction")
"""Direction providers (:class:`qlrlab.interfaces.DirectionProvider`), by spec name."""
CURVATURES: Registry[ComponentSpec] = Registry("curvature", off=None, supports_nan_padding=False)
"""Curvature oracles (:class:`qlrlab.interfaces.CurvatureOracle`), by spec name."""
STEP_SIZES: Registry[ComponentSpec] = Registry("step_size")
"""Step-size rules (:class:`qlrlab.interfaces.StepSizeRule`), by spec name."""
DAMPINGS: Registry[ComponentSpec] = Registry("damping", off={"name": "constant", "value": 0.0})
"""Damping schedules (:class:`qlrlab.interfaces.DampingSchedule`), by spec name."""
