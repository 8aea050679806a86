r"""The four component families of qlrlab, as abstract interfaces.

A composed optimiser step (see :class:`qlrlab.ComposedOptimizer`) runs, on one mini-batch
:math:`B` with mean loss :math:`f`:

1. the **gradient pass** :math:`f(\theta), g = \nabla f(\theta)` (components may wrap it, e.g.
   K-FAC's BackPACK extensions or the fast-path activation cache);
2. the **direction provider** turns :math:`g` (and its own state) into a direction :math:`d`; the
   step is :math:`\theta \leftarrow \theta - \alpha d`;
3. the **curvature oracle**, bound to (model, loss, batch) at :math:`\theta`, offers
   :math:`d^\top C d` and :math:`C v`;
4. the **step-size rule** picks :math:`\alpha` (and optionally a full update, e.g. with momentum)
   and exposes what the damped quadratic model

   .. math:: M(\theta + \delta) - M(\theta) = g^\top\delta + \tfrac12 \delta^\top (C + \lambda I)\delta

   predicts;
5. the **damping schedule** holds :math:`\lambda`; when it asks, the optimiser evaluates
   :math:`f(\theta_{new})` on the *same* batch and hands it the reduction ratio
   :math:`\rho = (f(\theta_{new}) - f(\theta)) / \Delta M`.

Conventions (tested in ``tests/test_curvature.py``): :math:`C` is the curvature of the **mean**
mini-batch loss *exactly as the loss module computes it* (``nn.MSELoss`` therefore carries a
factor :math:`2/(N C_{out})`; :class:`qlrlab.losses.HalfMSELoss` is the paper's
:math:`\tfrac12`-MSE with :math:`1/(N C_{out})`). All inner products are global over every
parameter tensor of the optimiser.

Where a new heuristic goes: a new direction in ``qlrlab/directions/``, a new curvature in
``qlrlab/curvature/``, a new step-size rule in ``qlrlab/step_sizes/``, a new damping schedule in
``qlrlab/damping/`` — or in your own package, registered with :mod:`qlrlab.registry`.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from qlrlab._state import clone_state

__all__ = [
    "BoundCurvature",
    "Component",
    "CurvatureOracle",
    "DampingSchedule",
    "DirectionProvider",
    "NoDamping",
    "Problem",
    "Proposal",
    "StepContext",
    "StepSizeRule",
]


@dataclass
class Problem:
    """The mini-batch problem a step works on, at the current parameters.

    Attributes:
        model: the user's model (never a BackPACK-extended twin).
        loss_fn: the loss module; ``loss_fn(model(inputs), targets)`` is the mean batch loss.
        inputs: model inputs (a tensor, a tuple of tensors unpacked into ``model(*inputs)``, or
            a dict of keyword arguments, ``model(**inputs)``).
        targets: targets passed to ``loss_fn``.
        params: the optimised parameters (a subset of ``model.parameters()``), in order.
        param_names: their names in ``model.named_parameters()``.
        outputs: detached model outputs of the gradient pass.
        loss: detached pre-update batch loss :math:`f(\\theta)`.
    """

    model: nn.Module
    loss_fn: nn.Module
    inputs: Any
    targets: Any
    params: list[Tensor]
    param_names: list[str]
    outputs: Tensor | None = None
    loss: Tensor | None = None

    def call_model(self, model: nn.Module | None = None) -> Tensor:
        """Run ``model`` (default: the problem's model) on the inputs: ``model(**inputs)`` for a
        dict, ``model(*inputs)`` for a tuple or list, ``model(inputs)`` otherwise."""
        m = self.model if model is None else model
        if isinstance(self.inputs, Mapping):
            return m(**self.inputs)
        if isinstance(self.inputs, (tuple, list)):
            return m(*self.inputs)
        return m(self.inputs)

    @property
    def batch_size(self) -> int:
        """Leading dimension of the (first) input tensor."""
        if isinstance(self.inputs, Mapping):
            x = next(v for v in self.inputs.values() if isinstance(v, Tensor))
        else:
            x = self.inputs[0] if isinstance(self.inputs, (tuple, list)) else self.inputs
        return int(x.shape[0])


@dataclass
class StepContext:
    """Everything a component may read during one step, passed explicitly (optax style).

    Attributes:
        problem: the bound mini-batch problem.
        grads: :math:`g`, one tensor per parameter (zeros where a parameter got no gradient).
        step: 1-based step counter (counts attempted steps, including rejected ones).
        damping: :math:`\\lambda_{t-1}`, the damping *before* this step's update.
        curvature: the curvature oracle bound to ``problem`` (``None`` when none is configured).
        param_groups: the optimiser's ``param_groups`` (for per-group hyperparameters).
        group_index: for each parameter, the index of its param group.
        direction: :math:`d` once the direction provider has run.
        all_reduce: averages a tensor over data-parallel workers (identity when not distributed).
        cache: scratch space shared by the components for this step only.
    """

    problem: Problem
    grads: list[Tensor]
    step: int
    damping: float
    curvature: BoundCurvature | None
    param_groups: list[dict[str, Any]]
    group_index: list[int]
    direction: list[Tensor] | None = None
    all_reduce: Callable[[Tensor], Tensor] = lambda t: t
    cache: dict[str, Any] = field(default_factory=dict)


@dataclass(init=False)
class Proposal:
    """What a step-size rule proposes for one step.

    Either a scalar ``alpha`` applied as :math:`\\delta = -\\alpha d` (``update is None``), or an
    explicit ``update`` :math:`\\delta` (e.g. K-FAC's :math:`-\\alpha d + \\mu \\delta_{t-1}`).
    The optional scalars let the optimiser compute :math:`\\Delta M` without another curvature
    product; anything left ``None`` is computed on demand. The scalars carry the names of the
    :class:`StepInfo` fields they become (``grad_dot_direction``, ``curvature``); the earlier
    names ``grad_dot`` and ``quad_form`` are accepted as keywords and readable as attributes.

    Attributes:
        alpha: the step size :math:`\\alpha` (0-d tensor).
        update: explicit update :math:`\\delta`, or ``None`` for :math:`-\\alpha d`.
        grad_dot_direction: :math:`g^\\top d` (or :math:`g^\\top\\delta` with an explicit update).
        curvature: :math:`d^\\top C d` (or :math:`\\delta^\\top C\\delta`), undamped.
        sq_norm: :math:`\\|d\\|^2` (or :math:`\\|\\delta\\|^2`).
        momentum: the momentum coefficient used, when the rule chose one.
        combination: the explicit update as :math:`\\sum_i c_i v_i`, pairs ``(c_i, v_i)`` of
            vectors the bound curvature saw (``quadratic_forms``), so that it may evaluate the
            loss at :math:`\\theta + \\delta` from them (:meth:`BoundCurvature.loss_at`).
        extras: anything else worth logging.
    """

    alpha: Tensor
    update: list[Tensor] | None
    grad_dot_direction: Tensor | None
    curvature: Tensor | None
    sq_norm: Tensor | None
    momentum: Tensor | None
    combination: list[tuple[Tensor, list[Tensor]]] | None
    extras: dict[str, Any]

    def __init__(
        self,
        alpha: Tensor,
        update: list[Tensor] | None = None,
        grad_dot_direction: Tensor | None = None,
        curvature: Tensor | None = None,
        sq_norm: Tensor | None = None,
        momentum: Tensor | None = None,
        extras: dict[str, Any] | None = None,
        *,
        combination: list[tuple[Tensor, list[Tensor]]] | None = None,
        grad_dot: Tensor | None = None,
        quad_form: Tensor | None = None,
    ) -> None:
        self.alpha = alpha
        self.update = update
        self.grad_dot_direction = grad_dot_direction if grad_dot is None else grad_dot
        self.curvature = curvature if quad_form is None else quad_form
        self.sq_norm = sq_norm
        self.momentum = momentum
        self.combination = combination
        self.extras = {} if extras is None else extras

    @property
    def grad_dot(self) -> Tensor | None:
        """The earlier name of :attr:`grad_dot_direction`."""
        return self.grad_dot_direction

    @property
    def quad_form(self) -> Tensor | None:
        """The earlier name of :attr:`curvature` (:math:`d^\\top C d`)."""
        return self.curvature


class Component:
    """Behaviour shared by every component: spec, state and hooks.

    Args:
        spec: the validated spec this component was built from (``None`` for ad-hoc use).
    """

    #: the component's :meth:`gradient_pass` is only an optimisation (the GGN fast path records
    #: activations; without them it takes the general path): steps whose gradient comes from
    #: the caller (``step(closure)``, ``loss.backward(); step()``) or from micro-batches may
    #: skip it. ``False`` (e.g. K-FAC's BackPACK pass): the optimiser runs its own gradient
    #: pass whenever the component has one.
    gradient_pass_optional: bool = False

    @property
    def records_forward(self) -> bool:
        """Whether the optional :meth:`gradient_pass` would record anything now (then, after
        ``loss.backward(); opt.step()``, the optimiser runs a forward of its own inside it on
        the observed batch). Read only when :attr:`gradient_pass_optional`."""
        return True

    def __init__(self, spec: Any = None) -> None:
        self.spec = spec

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Called once by the optimiser with what it optimises (allocate state, check support).

        Raise ``ValueError`` naming the offending layer/loss and the fix for unsupported set-ups.
        """

    @contextlib.contextmanager
    def gradient_pass(self, model: nn.Module) -> Iterator[nn.Module]:
        """Wrap the gradient pass; yield the module that should run the forward pass.

        The default yields ``model`` unchanged. K-FAC yields a BackPACK-extended twin sharing
        the same ``Parameter`` objects; the fast GGN path installs activation-caching hooks.
        """
        yield model

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state (tensors and Python scalars only, so ``weights_only`` loads work)."""
        return {}

    def param_state(self) -> list[dict[str, Any]] | None:
        """Per-parameter state, one dict per optimised parameter in order (e.g. Adam's
        ``exp_avg``), shown in the optimiser's ``opt.state[p]`` for tools that inspect it;
        ``None`` (default): nothing per parameter. The tensors are the component's own (a view,
        not a copy)."""
        return None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state produced by :meth:`state_dict`."""

    def snapshot(self) -> Any:
        """This component's state as a value, taken before the step touches it.

        The optimiser takes one from every component at the start of each step (after the
        gradient) and hands it back to :meth:`restore` when the step is rejected or refused, so
        the step is a transaction: committed as a whole or not at all. The default is a deep copy
        of :meth:`state_dict`, which is exact whenever :meth:`state_dict` is complete; override
        both together for something cheaper.
        """
        return clone_state(self.state_dict())

    def restore(self, snapshot: Any) -> None:
        """Return exactly to the state :meth:`snapshot` captured (default:
        :meth:`load_state_dict`)."""
        self.load_state_dict(snapshot)


class DirectionProvider(Component, ABC):
    """Produces an update direction :math:`d` from the gradient; the step is
    :math:`\\theta \\leftarrow \\theta - \\alpha d`.

    Stateful (e.g. Adam's moments). The state must round-trip through
    :meth:`state_dict`/:meth:`load_state_dict` exactly, because ``accept_reject`` damping and
    non-finite steps restore it.
    """

    @abstractmethod
    def compute(self, grads: list[Tensor], ctx: StepContext) -> list[Tensor]:
        """Return :math:`d`, one tensor per parameter (must not alias ``grads``)."""


class BoundCurvature(ABC):
    """A curvature matrix :math:`C` bound to one (model, loss, batch) at the current parameters.

    Only :meth:`matvec` is required; :meth:`quadratic_form` defaults to
    :math:`v^\\top (C v)` but oracles should override it with something cheaper.
    """

    @abstractmethod
    def matvec(self, v: list[Tensor]) -> list[Tensor]:
        """Return :math:`C v` (``v`` and the result are lists shaped like the parameters)."""

    def quadratic_form(self, v: list[Tensor]) -> Tensor:
        """Return :math:`v^\\top C v` as a 0-d tensor."""
        cv = self.matvec(v)
        return sum((a * b).sum() for a, b in zip(v, cv))  # type: ignore[return-value]

    def quadratic_forms(self, vs: list[list[Tensor]]) -> Tensor:
        """Return the Gram matrix :math:`[v_i^\\top C v_j]_{ij}` (default: via matvecs)."""
        k = len(vs)
        cvs = [self.matvec(v) for v in vs]
        out = torch.empty(k, k, dtype=vs[0][0].dtype, device=vs[0][0].device)
        for i in range(k):
            for j in range(k):
                out[i, j] = sum((a * b).sum() for a, b in zip(vs[i], cvs[j]))
        return 0.5 * (out + out.T)

    def loss_after(self, alpha: Tensor, direction: list[Tensor]) -> Tensor | None:
        """Optionally return :math:`f(\\theta - \\alpha d)` on the bound batch more cheaply than a
        fresh forward pass (the fast path reuses cached activations). ``None`` = not available.

        Called *before* the parameters are updated.
        """
        return None

    def loss_at(self, terms: list[tuple[Tensor, list[Tensor]]]) -> Tensor | None:
        """Optionally return :math:`f(\\theta + \\sum_i c_i v_i)` on the bound batch from
        ``terms`` ``[(c_i, v_i)]`` (the vectors of the last :meth:`quadratic_forms`), more
        cheaply than a fresh forward pass. ``None`` = not available.

        Called *before* the parameters are updated.
        """
        return None


class CurvatureOracle(Component, ABC):
    """Factory of :class:`BoundCurvature` objects, one per step.

    Attributes:
        reference: what the oracle computes exactly, for the contract's dense float64 check
            (:mod:`qlrlab.testing`): ``"ggn"``, ``"hessian"``, ``"empirical_fisher"``, or
            ``None`` (an approximation or a random estimate: only symmetry and consistency
            are checked).
        data_parallel_exact: averaging the workers' quadratic forms gives the full batch's
            (``False`` for Monte-Carlo estimates, whose samples differ per worker).
    """

    reference: str | None = None
    data_parallel_exact: bool = True

    @abstractmethod
    def bind(self, problem: Problem) -> BoundCurvature:
        """Bind to the current mini-batch problem (parameters as they are now)."""


class StepSizeRule(Component, ABC):
    """Chooses the step size :math:`\\alpha` (and possibly a full update) for a direction.

    Attributes:
        initial_group_lr: the ``lr`` the optimiser writes into every param group at
            construction; it multiplies :math:`\\alpha` (``fixed`` puts its learning rate there,
            so ``torch.optim.lr_scheduler`` schedules act on it). Default 1.
    """

    initial_group_lr: float = 1.0

    @abstractmethod
    def propose(self, ctx: StepContext) -> Proposal:
        """Return the :class:`Proposal` for this step (``ctx.direction`` is set)."""


class DampingSchedule(Component, ABC):
    """Holds the damping :math:`\\lambda` and updates it from the reduction ratio :math:`\\rho`.

    Attributes:
        rho_model: which quadratic model :math:`\\rho` divides by, ``"damped"``
            (:math:`C + \\lambda I`, AdamQLR) or ``"undamped"`` (:math:`C`, kfac-jax).
        may_reject: if ``True`` the optimiser also copies the parameters each step (the
            components' state is always snapshotted) so that :meth:`update` may reject the
            step (``accept_reject``).
    """

    rho_model: Literal["damped", "undamped"] = "damped"
    may_reject: bool = False

    @property
    @abstractmethod
    def value(self) -> float:
        """The current damping :math:`\\lambda`."""

    def needs_new_loss(self, step: int) -> bool:
        """Whether this step needs :math:`f(\\theta_{new})` (and hence :math:`\\rho`)."""
        return False

    def update(self, *, rho: float | None, loss: float, new_loss: float | None, step: int) -> bool:
        """Update :math:`\\lambda` after a step; return ``False`` to reject (undo) the step."""
        return True

    def on_nonfinite(self) -> None:
        """Called when the loss or :math:`\\alpha` was non-finite (default: do nothing)."""


class NoDamping(DampingSchedule):
    """:math:`\\lambda = 0` throughout: the schedule of an optimiser built without one."""

    @property
    def value(self) -> float:
        """Always 0."""
        return 0.0

    def state_dict(self) -> dict[str, Any]:
        """The constant value (as ``constant`` damping saves it)."""
        return {"value": 0.0}
