r"""Any ``torch.optim`` optimiser as a direction provider.

``{"name": "torch_optim", "optimizer": "Adam", "options": {"betas": [0.9, 0.999]}}`` runs the
named optimiser class with ``lr = 1`` on a *private copy* of the parameters, and the direction
is the update it would apply:

.. math:: d = -\Delta\theta = \theta - \mathrm{opt.step}_{\mathrm{lr}=1}(\theta, g).

Each step the copy is reset to the current parameters and given the (cloned) gradient; the
optimiser's own state (moments, momentum buffers, step counters) lives on the copy and never
touches the real parameters. The composed step then applies :math:`\theta \leftarrow \theta -
\alpha d`, so

* ``torch_optim(Adam)`` + ``quadratic`` + ``levenberg_marquardt`` is the ``adamqlr`` preset, and
* ``torch_optim(SGD, momentum=0.9)`` + ``fixed(lr)`` is ``torch.optim.SGD(lr, momentum=0.9)``

(both tested over ten float64 steps in ``tests/test_torch_optim_direction.py``). For an
optimiser whose update is not proportional to ``lr`` (e.g. with a decoupled weight decay that
is scaled by ``lr``: AdamW's :math:`\theta(1 - \mathrm{lr}\,w)`) the direction is the update at
``lr = 1``, and the step size scales all of it. The subtraction costs round-off of order
:math:`\epsilon\,|\theta|` per entry (negligible in float64; in float32 noticeable only where
:math:`|d| \ll |\theta|`).

**Names.** Spec files never import code: ``optimizer`` names a class of ``torch.optim`` (one
that steps without a closure; ``LBFGS`` is refused) or one registered with
:func:`register_torch_optimizer`, typically from a ``--plugin`` module::

    from qlrlab.directions.torch_optim import register_torch_optimizer

    @register_torch_optimizer("Lion")
    class Lion(torch.optim.Optimizer): ...

The options are checked when the spec is validated, by constructing the optimiser on a dummy
parameter, so a misspelt option is reported with the field's name.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from qlrlab.interfaces import DirectionProvider, StepContext
from qlrlab.registry import DIRECTIONS, ComponentSpec

__all__ = [
    "TORCH_OPTIMIZERS",
    "TorchOptimDirection",
    "TorchOptimSpec",
    "register_torch_optimizer",
    "resolve_torch_optimizer",
]

#: user optimiser classes by name (filled by :func:`register_torch_optimizer`, e.g. in a plugin)
TORCH_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {}

#: ``torch.optim`` classes that cannot step without a closure
_NEEDS_CLOSURE = frozenset({"LBFGS"})


def _torch_optim_names() -> list[str]:
    return sorted(
        n
        for n, c in vars(torch.optim).items()
        if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and n != "Optimizer"
    )


def register_torch_optimizer(
    name: str, *, overwrite: bool = False
) -> Callable[[type[torch.optim.Optimizer]], type[torch.optim.Optimizer]]:
    """Class decorator making an optimiser class usable as ``torch_optim``'s ``optimizer``.

    Args:
        name: the name specs use.
        overwrite: allow replacing an existing registration.

    Raises:
        ValueError: the name is a ``torch.optim`` class or already registered.
        TypeError: the class is not a ``torch.optim.Optimizer``.
    """

    def deco(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise TypeError(f"{cls!r} must subclass torch.optim.Optimizer")
        if name in _torch_optim_names():
            raise ValueError(
                f"{name!r} is a torch.optim class already; register yours under another name"
            )
        if name in TORCH_OPTIMIZERS and not overwrite and TORCH_OPTIMIZERS[name] is not cls:
            raise ValueError(
                f"an optimiser named {name!r} is already registered "
                f"({TORCH_OPTIMIZERS[name].__qualname__}); pass overwrite=True to replace it"
            )
        TORCH_OPTIMIZERS[name] = cls
        return cls

    return deco


def resolve_torch_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """The class ``name`` denotes: a ``torch.optim`` optimiser or a registered one.

    Raises:
        ValueError: unknown name (listing the choices) or an optimiser that needs a closure.
    """
    if name in _NEEDS_CLOSURE:
        raise ValueError(
            f"optimizer: torch.optim.{name} needs a closure to step and cannot give a direction; "
            f"use curvature-based directions (newton_cg) or another optimizer"
        )
    cls = getattr(torch.optim, name, None) if not name.startswith("_") else None
    if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) and name != "Optimizer":
        return cls
    if name in TORCH_OPTIMIZERS:
        return TORCH_OPTIMIZERS[name]
    registered = f"; registered: {', '.join(sorted(TORCH_OPTIMIZERS))}" if TORCH_OPTIMIZERS else ""
    raise ValueError(
        f"optimizer: unknown optimizer {name!r}; torch.optim has "
        f"{', '.join(n for n in _torch_optim_names() if n not in _NEEDS_CLOSURE)}{registered} "
        f"(your own class: register it with qlrlab.directions.torch_optim."
        f"register_torch_optimizer in a --plugin module)"
    )


def _options(options: dict[str, Any]) -> dict[str, Any]:
    """YAML lists → tuples (``betas: [0.9, 0.999]``), as torch.optim expects."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}


@DIRECTIONS.register("torch_optim")
class TorchOptimSpec(ComponentSpec):
    """Spec of the ``torch_optim`` direction.

    Attributes:
        optimizer: a ``torch.optim`` class name (``Adam``, ``SGD``, ``RMSprop``...) or one
            registered with :func:`register_torch_optimizer`.
        options: keyword arguments of that class, except ``lr`` (it is run with ``lr = 1``;
            the step size comes from the ``step_size`` rule).
    """

    #: the fields the contract suite (:mod:`qlrlab.testing`) adds to build this component
    contract_example: ClassVar[dict[str, Any]] = {"optimizer": "Adam"}

    name: Literal["torch_optim"] = "torch_optim"
    optimizer: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> TorchOptimSpec:
        cls = resolve_torch_optimizer(self.optimizer)
        if "lr" in self.options:
            raise ValueError(
                "options.lr: the optimizer runs with lr = 1 and the step size comes from "
                "step_size (e.g. step_size: {name: fixed, lr: 0.01}); remove options.lr"
            )
        try:
            cls([torch.zeros(1, requires_grad=True)], lr=1.0, **_options(self.options))  # type: ignore[call-arg]
        except (TypeError, ValueError) as exc:
            raise ValueError(f"options: torch.optim {self.optimizer}: {exc}") from None
        return self

    def build(self) -> TorchOptimDirection:
        """Build the direction provider."""
        return TorchOptimDirection(self)


class TorchOptimDirection(DirectionProvider):
    """Runs a ``torch.optim`` optimiser on a private copy of the parameters (see the module
    docstring); state: the wrapped optimiser's ``state_dict``."""

    spec: TorchOptimSpec

    def __init__(self, spec: TorchOptimSpec) -> None:
        super().__init__(spec)
        self.shadow: list[Tensor] = []
        self.inner: torch.optim.Optimizer | None = None

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Make the private parameter copies and the wrapped optimiser."""
        cls = resolve_torch_optimizer(self.spec.optimizer)
        self.shadow = [p.detach().clone().requires_grad_(True) for p in params]
        self.inner = cls(self.shadow, lr=1.0, **_options(self.spec.options))  # type: ignore[call-arg]

    @torch.no_grad()
    def compute(self, grads: list[Tensor], ctx: StepContext) -> list[Tensor]:
        """Reset the copies to :math:`\\theta`, step the optimiser with ``grads``, return
        :math:`\\theta - \\theta'`."""
        assert self.inner is not None, "setup() was not called"
        params = [p.detach() for p in ctx.problem.params]
        torch._foreach_copy_(self.shadow, params)
        for s, g in zip(self.shadow, grads):
            s.grad = g.clone()  # the optimiser may modify its gradients in place
        self.inner.step()
        for s in self.shadow:
            s.grad = None
        return list(torch._foreach_sub(params, self.shadow))

    def param_state(self) -> list[dict[str, Any]]:
        """The wrapped optimiser's per-parameter state, one dict per parameter."""
        assert self.inner is not None
        return [self.inner.state.get(s, {}) for s in self.shadow]

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimiser's ``state_dict`` (a copy)."""
        assert self.inner is not None
        return copy.deepcopy(self.inner.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the wrapped optimiser's state (copied: nothing aliases ``state``)."""
        assert self.inner is not None
        state = copy.deepcopy(state)
        # torch.optim keeps its ``step`` counters in its scalar dtype (float32 unless the default
        # dtype is float64); a checkpoint cast to the parameters' dtype must not change them
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        for per_param in state.get("state", {}).values():
            step = per_param.get("step")
            if isinstance(step, Tensor) and step.is_floating_point():
                per_param["step"] = step.to(scalar)
        self.inner.load_state_dict(state)
