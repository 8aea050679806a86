r"""The composed optimiser: one ``torch.optim.Optimizer`` built from four components.

One call ``info = opt.step((inputs, targets))`` is a transaction of named phases (Clarke &
Hernández-Lobato, 2024, Alg. 1 generalised), one method each:

1. **gradient** (``_gradient``): zero the gradients, :math:`f(\theta), g` (wrapped by the
   components' ``gradient_pass`` contexts), averaged over data-parallel workers; a non-finite
   loss or gradient refuses the step here, before any component has run;
2. **curvature** (``_bind_curvature``): the oracle bound to (model, loss, batch) at
   :math:`\theta`; every component's state is snapshotted first
   (:meth:`~qlrlab.interfaces.Component.snapshot`);
3. **direction** :math:`d` (the direction provider);
4. **step size** :math:`\alpha` (the step-size rule), or an explicit update :math:`\delta`;
5. **update** (``_update``): :math:`\delta = -\alpha\,\mathrm{lr}_g d` per param group; a
   non-finite :math:`\alpha` or :math:`\delta` refuses the step (parameters untouched, every
   component restored); otherwise :math:`\theta \leftarrow \theta + \delta` (``_apply``);
6. **ρ** (``_rho``): if the damping schedule asks (or ``track_rho``), :math:`f(\theta_{new})` on
   the same batch in the same mode without touching buffers, the predicted change

   .. math:: \Delta M = g^\top\delta + \tfrac12\delta^\top C\delta\ [+\ \tfrac12\lambda_{t-1}\|\delta\|^2]

   and :math:`\rho = (f(\theta_{new}) - f(\theta))/\Delta M`;
7. **damping**: the schedule's update, which may reject the step: parameters and the state of the
   direction, curvature and step-size components are then restored exactly.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qlrlab._compat import version
from qlrlab._observe import (
    BatchObserver,
    ObservationError,
    SelectOutput,
    call_model,
    caller_forward,
    optimizer_passes,
)
from qlrlab._passes import autocast_off, drop_stale_autocast_casts, side_effect_free
from qlrlab._state import clone_state, state_to_device
from qlrlab._tensorlist import dot, norm, sq_norm
from qlrlab.interfaces import (
    Component,
    CurvatureOracle,
    DampingSchedule,
    DirectionProvider,
    NoDamping,
    Problem,
    Proposal,
    StepContext,
    StepSizeRule,
)

__all__ = ["ComposedOptimizer", "StepInfo"]


@dataclass
class StepInfo:
    """What happened in one step (Python floats; ``None`` where not computed).

    Attributes:
        loss: pre-update mini-batch loss :math:`f(\\theta)`.
        alpha: step size used (times group 0's ``lr``).
        damping: :math:`\\lambda` after this step's update.
        rho: reduction ratio, or ``None`` when not computed.
        grad_dot_direction: :math:`g^\\top d`.
        curvature: :math:`d^\\top C d` (undamped).
        predicted_change: :math:`\\Delta M` of the model used for :math:`\\rho` (damped or not).
        new_loss: :math:`f(\\theta_{new})` on the same batch.
        grad_norm: :math:`\\|g\\|` of the gradient the step used (after clipping).
        grad_norm_unclipped: :math:`\\|g\\|` before clipping (``None`` without clipping).
        direction_norm: :math:`\\|d\\|`.
        update_norm: :math:`\\|\\delta\\|`.
        momentum: momentum coefficient chosen by the step-size rule, if any.
        status: ``"ok"``, ``"rejected"``, ``"nonfinite_loss"``, ``"nonfinite_grad"`` or
            ``"nonfinite_alpha"``.
        step: the optimiser's step counter after this step.
    """

    loss: float
    alpha: float | None = None
    damping: float | None = None
    rho: float | None = None
    grad_dot_direction: float | None = None
    curvature: float | None = None
    predicted_change: float | None = None
    new_loss: float | None = None
    grad_norm: float | None = None
    grad_norm_unclipped: float | None = None
    direction_norm: float | None = None
    update_norm: float | None = None
    momentum: float | None = None
    status: str = "ok"
    step: int = 0

    @property
    def accepted(self) -> bool:
        """Whether the parameters were changed by this step."""
        return self.status == "ok"

    def as_dict(self) -> dict[str, Any]:
        """A flat dict (for logging)."""
        return asdict(self)

    def scalars(self) -> dict[str, float]:
        """The numeric fields that were computed and are finite, as floats (for loggers such as
        Lightning's ``self.log_dict``, which refuse ``None`` and strings)."""
        out: dict[str, float] = {}
        for k, v in asdict(self).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[k] = float(v)
        return out


def _f(x: Tensor | float | None) -> float | None:
    if x is None:
        return None
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _floats(xs: list[Tensor | float | None]) -> list[float | None]:
    """``[_f(x) for x in xs]``, with one device-to-host transfer for all the 0-d tensors when
    they live on an accelerator (same values: stacking only widens dtypes exactly); on the CPU
    ``.item()`` is cheaper than stacking."""
    ts = [x for x in xs if isinstance(x, Tensor)]
    if (
        len(ts) < 2
        or ts[0].device.type == "cpu"
        or any(t.ndim != 0 or t.device != ts[0].device for t in ts)
    ):
        return [_f(x) for x in xs]
    with torch.no_grad():
        vals = iter(torch.stack(ts).tolist())
    return [float(next(vals)) if isinstance(x, Tensor) else _f(x) for x in xs]


def _component_name(comp: Any) -> str:
    """A component's spec name (``torch_optim`` with its optimiser), for messages."""
    spec = getattr(comp, "spec", None)
    name = getattr(spec, "name", None) or type(comp).__name__
    inner = getattr(spec, "optimizer", None)
    return f"{name}({inner})" if isinstance(inner, str) else str(name)


def _has_gradient_pass(comp: Any) -> bool:
    """Whether ``comp`` overrides :meth:`Component.gradient_pass` (the default is a no-op)."""
    fn = getattr(comp, "gradient_pass", None)
    return getattr(fn, "__func__", None) is not Component.gradient_pass


@dataclass
class _Gradient:
    """Phase 1's result: :math:`f(\\theta)` and :math:`g` on the batch (averaged over workers)."""

    loss: Tensor
    outputs: Tensor | None
    grads: list[Tensor]
    loss_f: float
    grad_norm: float | None
    grad_norm_unclipped: float | None = None

    @property
    def status(self) -> str:
        """``"ok"``, or why the step must be refused before any component runs."""
        if not math.isfinite(self.loss_f):
            return "nonfinite_loss"
        return "ok" if _finite(self.grad_norm) else "nonfinite_grad"

    def report(self) -> dict[str, Any]:
        """The :class:`StepInfo` fields known after this phase."""
        if self.status == "nonfinite_loss":
            return {"loss": self.loss_f}
        return {
            "loss": self.loss_f,
            "grad_norm": self.grad_norm,
            "grad_norm_unclipped": self.grad_norm_unclipped,
        }


@dataclass
class _Update:
    """Phase 5's result: the update :math:`\\delta` and its scalars (one host transfer)."""

    delta: list[Tensor]
    alpha: Tensor  # the rule's alpha times group 0's lr
    explicit: bool  # the rule proposed delta itself (not -alpha d)
    uniform: bool  # every param group has the same lr
    scalars: dict[str, float | None]
    # delta as sum_i c_i v_i over vectors the bound curvature saw (uniform lr only), or None
    combination: list[tuple[Tensor, list[Tensor]]] | None = None

    @property
    def finite(self) -> bool:
        """Whether the step may be taken (:math:`\\alpha` and :math:`\\|\\delta\\|` finite)."""
        return _finite(self.scalars["alpha"]) and _finite(self.scalars["update_norm"])

    def report(self) -> dict[str, Any]:
        """The :class:`StepInfo` fields this phase knows."""
        keys = ("alpha", "direction_norm", "grad_dot_direction", "curvature")
        return {k: self.scalars[k] for k in keys}


@dataclass
class _Batch:
    """What a step runs on: the batch, and whether the caller already computed the gradient."""

    inputs: Any
    targets: Any
    convention: str  # "step(batch)", "opt.step(closure)" or "opt.step()" (for messages)
    caller_loss: Tensor | None = None  # f(θ) as the caller's loss module returned it
    # the caller's forward ran before the step (loss.backward(); opt.step()), so no gradient
    # pass context could watch it
    forward_before_step: bool = False

    @property
    def own(self) -> bool:
        """Whether the optimiser computes the gradient itself."""
        return self.caller_loss is None


def _split_rows(x: Any, k: int) -> list[Any]:
    """``x`` (a tensor, or a tuple/list/dict of them) split into ``k`` parts along dim 0."""
    if isinstance(x, Tensor):
        return list(torch.tensor_split(x, k))
    if isinstance(x, Mapping):
        parts = {key: _split_rows(v, k) for key, v in x.items()}
        return [{key: v[i] for key, v in parts.items()} for i in range(k)]
    if isinstance(x, (tuple, list)):
        cols = [_split_rows(v, k) for v in x]
        return [type(x)(c[i] for c in cols) for i in range(k)]
    return [x] * k


def _rows(x: Any) -> int:
    if isinstance(x, Tensor):
        return int(x.shape[0])
    if isinstance(x, Mapping):
        return next(_rows(v) for v in x.values() if isinstance(v, Tensor))
    return _rows(x[0])


def _describe_arg(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)} items"
    return f"{type(x).__name__} {x!r:.60}"


def _identity(t: Tensor) -> Tensor:
    """The default ``all_reduce`` (a module-level function, so optimisers pickle)."""
    return t


class _Transaction:
    """One step's undo record: a :meth:`~qlrlab.interfaces.Component.snapshot` of every
    stateful component, and a copy of the parameters when the damping schedule may reject."""

    def __init__(self, components: list[Component], params: list[Tensor] | None) -> None:
        self._saved = [(c, c.snapshot()) for c in components]
        self._params = params
        self._copies = None if params is None else [p.detach().clone() for p in params]

    def rollback(self, *, params: bool) -> None:
        """Put every component (and, with ``params``, every parameter) back exactly."""
        if params:
            assert self._copies is not None, "a schedule that rejects steps must set may_reject"
            with torch.no_grad():
                for p, saved in zip(self._params, self._copies):  # type: ignore[arg-type]
                    p.copy_(saved)
        for comp, snap in self._saved:
            comp.restore(snap)

    def commit(self) -> None:
        """Keep this step's state (drop the snapshots)."""
        self._saved, self._copies = [], None


class ComposedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` composed of a direction provider, a curvature oracle, a
    step-size rule and a damping schedule.

    Args:
        params: parameters or param groups (default: all trainable parameters of ``model``).
            Each group's ``lr`` multiplies the rule's :math:`\\alpha`; it starts at the rule's
            ``initial_group_lr`` (``fixed`` puts its learning rate there, the others 1).
        model: the model (the extra passes call it functionally; never modified).
        loss_fn: mean-reduced loss module, ``loss_fn(model(inputs), targets)``.
        direction: the direction provider.
        step_size: the step-size rule.
        curvature: the curvature oracle (``None``: none; rules that need one refuse to build).
        damping: the damping schedule (``None``: :class:`~qlrlab.interfaces.NoDamping`,
            :math:`\\lambda = 0`).
        spec: the spec they came from (kept for reference and ``repr``).
        track_rho: compute :math:`f(\\theta_{new})` and :math:`\\rho` every step.
        all_reduce: averages a tensor over data-parallel workers (default: identity).
        grad_all_reduce: averages the gradients in place over data-parallel workers right after
            the gradient pass (``None``: not needed, e.g. single process or a DDP-wrapped model;
            see :mod:`qlrlab.distributed`).
        output: which output of the model feeds the loss, when the model returns a dict, a
            Hugging Face ``ModelOutput`` or a tuple: a key (``"logits"``), an index, or a
            callable ``outputs -> tensor`` (``None``: the model returns it).
        gradient: the gradient-transform stage (:class:`qlrlab.specs.GradientSpec`: clipping,
            micro-batches; ``None``: none).
    """

    def __init__(
        self,
        params: Iterable[Any] | None,
        *,
        model: nn.Module,
        loss_fn: nn.Module,
        direction: DirectionProvider,
        step_size: StepSizeRule,
        curvature: CurvatureOracle | None = None,
        damping: DampingSchedule | None = None,
        spec: Any = None,
        track_rho: bool = False,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        grad_all_reduce: Callable[[list[Tensor]], None] | None = None,
        output: str | int | Callable[[Any], Tensor] | None = None,
        gradient: Any = None,
    ) -> None:
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, {"lr": step_size.initial_group_lr})
        self.model = model
        self.loss_fn = loss_fn
        self.direction = direction
        self.curvature = curvature
        self.step_size = step_size
        self.damping = damping if damping is not None else NoDamping()
        self.spec = spec
        self.track_rho = track_rho
        self.all_reduce: Callable[[Tensor], Tensor] = all_reduce or _identity
        self.grad_all_reduce = grad_all_reduce
        self._step = 0

        #: the module the optimiser's own passes call (the model, or it and the output selection)
        self._net: nn.Module = model if output is None else SelectOutput(model, output)
        self.output = output
        self.gradient = gradient
        names = {id(p): n for n, p in self._net.named_parameters()}
        self._params: list[Tensor] = []
        self._group_index: list[int] = []
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        "params: every optimised parameter must belong to `model` "
                        "(pass params=None to optimise all of model.parameters())"
                    )
                self._params.append(p)
                self._group_index.append(index)
        self._names = [names[id(p)] for p in self._params]
        for comp in self.components:
            comp.setup(self._params, self._net, loss_fn)
        if self._micro_batches > 1:
            for comp in self.components:
                if _has_gradient_pass(comp) and not comp.gradient_pass_optional:
                    raise ValueError(
                        f"gradient.micro_batches: {type(comp).__name__} needs one gradient pass "
                        "over the whole batch; set micro_batches: 1 (or use a larger batch)"
                    )
        #: the :class:`StepInfo` of the last step (for loggers; e.g. Lightning's ``log_dict``)
        self.last_info: StepInfo | None = None
        self._grads_left: list[tuple[int, int] | None] | None = None
        self._observer = BatchObserver(model, loss_fn)
        self._observer.attach()
        self._constructed = True

    @property
    def _micro_batches(self) -> int:
        return int(getattr(self.gradient, "micro_batches", 1) or 1)

    # -- torch.optim citizenship -----------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group while constructing; afterwards refused (``ValueError``): the
        components allocated their state for the parameters given at construction."""
        if self.__dict__.get("_constructed", False):
            raise ValueError(
                "add_param_group: a ComposedOptimizer's components allocate their state (moments, "
                "curvature caches, damping) for the parameters given at construction; build a "
                "new optimizer with every param group instead, e.g. "
                "build_optimizer(spec, model, loss_fn, params=[group1, group2])"
            )
        super().add_param_group(param_group)

    @property
    def state(self) -> Any:
        """``torch.optim``'s per-parameter state: each component's
        :meth:`~qlrlab.interfaces.Component.param_state` (e.g. Adam's ``exp_avg``), merged per
        parameter; the tensors are the components' own."""
        st = self.__dict__["_param_state"]
        if self.__dict__.get("_constructed", False):
            for comp in self.components:
                per_param = comp.param_state()
                if per_param is not None:
                    for p, entry in zip(self._params, per_param):
                        st[p].update(entry)
        return st

    @state.setter
    def state(self, value: Any) -> None:
        self.__dict__["_param_state"] = value

    def __getstate__(self) -> dict[str, Any]:
        """Everything (model, loss, components): ``copy.deepcopy((model, opt))`` and ``pickle``
        give a working pair that continues identically."""
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)

    @property
    def composition(self) -> dict[str, str]:
        """The components' spec names by family (``direction``, ``curvature``...)."""
        return {
            "direction": _component_name(self.direction),
            "curvature": _component_name(self.curvature) if self.curvature is not None else "none",
            "step_size": _component_name(self.step_size),
            "damping": _component_name(self.damping),
        }

    @property
    def components(self) -> list[Any]:
        """The non-null components, in step order."""
        comps: list[Any] = [self.direction]
        if self.curvature is not None:
            comps.append(self.curvature)
        comps += [self.step_size, self.damping]
        return comps

    # -- the step ------------------------------------------------------------------------------
    def step(self, batch: Any = None, closure: Any = None) -> StepInfo:  # type: ignore[override]
        """One step; returns a :class:`StepInfo` (also kept as :attr:`last_info`).

        Three calling conventions, one result:

        * ``opt.step((inputs, targets))``: computes the loss and gradient itself (through the
          gradient-transform stage: clipping, micro-batches);
        * ``opt.step(closure)`` / ``opt.step(closure=closure)``: torch.optim's convention (the
          closure zeroes the gradients, computes ``loss_fn(model(inputs), targets)``, calls
          ``backward()`` and returns the loss);
        * ``loss.backward(); opt.step()``: the gradient already in ``.grad``.

        With the last two the batch is the one that went through the model and the loss module
        (observed by forward pre-hooks; see :mod:`qlrlab._observe`) and the gradient is the
        caller's (clipped or unscaled as the caller left it); components whose own gradient
        pass is required (K-FAC) recompute it on that batch, and after ``loss.backward()`` the
        GGN fast path records a forward of the optimiser's own on it.

        The step is a transaction: a rejected or refused step leaves parameters and every
        component's state as they were (the damping schedule, which decides, keeps its update).

        Raises:
            TypeError: ``batch`` is neither ``(inputs, targets)`` nor a closure.
            qlrlab._observe.ObservationError: no batch, or several, observed since the last step.
        """
        self._observer.detach()  # the optimiser's own passes are never observed
        try:
            b = self._unpack(batch, closure)
            with optimizer_passes():
                info = self._run(b)
        finally:
            self._observer.clear()
            self._observer.attach()
        self.last_info = info
        return info

    def _run(self, b: _Batch) -> StepInfo:
        """The transaction of named phases on the step's batch."""
        self._step += 1
        t, lam = self._step, float(self.damping.value)
        grad = self._gradient(b)  # 1. f(θ), g (through the gradient-transform stage)
        if grad.status != "ok":  # nothing has run yet
            return self._refuse(None, grad.status, **grad.report())
        may_reject = self.damping.may_reject
        txn = _Transaction(self._stateful(), self._params if may_reject else None)
        with autocast_off():  # the quadratic model in the parameters' dtype under AMP
            ctx = self._bind_curvature(grad, b.inputs, b.targets, lam)  # 2. C bound at θ
            ctx.direction = d = self.direction.compute(ctx.grads, ctx)  # 3. d
            proposal = self.step_size.propose(ctx)  # 4. α (or δ)
            update = self._update(d, proposal)  # 5. δ = -α d · lr
        if not update.finite:  # refuse: parameters untouched
            return self._refuse(txn, "nonfinite_alpha", **grad.report(), **update.report())
        need_rho = self.track_rho or self.damping.needs_new_loss(t)
        with autocast_off():
            pred = self._predicted_change(ctx, proposal, update, lam, need_rho)  # ΔM
        new_loss = self._apply(ctx, update, need_rho)  # θ ← θ + δ; f(θ_new)
        rho = self._rho(grad.loss_f, new_loss, pred)  # 6. ρ
        accepted = self.damping.update(rho=rho, loss=grad.loss_f, new_loss=new_loss, step=t)
        if accepted:  # 7. the damping's verdict
            txn.commit()
        else:
            txn.rollback(params=True)
            drop_stale_autocast_casts()
        return StepInfo(
            **grad.report(), **update.report(), damping=self.damping.value, rho=rho,
            predicted_change=pred, new_loss=new_loss, update_norm=update.scalars["update_norm"],
            momentum=update.scalars["momentum"], status="ok" if accepted else "rejected", step=t,
        )  # fmt: skip

    # -- the phases, in step order ----------------------------------------------------------------
    def _unpack(self, batch: Any, closure: Any) -> _Batch:
        """The step's batch, by calling convention (runs the closure)."""
        if closure is None and callable(batch) and not isinstance(batch, (Tensor, nn.Module)):
            closure, batch = batch, None  # opt.step(closure), positionally
        if batch is not None:
            if closure is not None:
                raise TypeError("ComposedOptimizer.step: pass a batch or a closure, not both")
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(
                    f"ComposedOptimizer.step expected a batch (inputs, targets), a closure, or "
                    f"nothing after loss.backward(); got {_describe_arg(batch)}"
                )
            self._warn_if_discarding()
            return _Batch(batch[0], batch[1], "opt.step((inputs, targets))")
        if closure is not None:
            convention = "opt.step(closure)"
            self._observer.clear()
            self._observer.attach()
            try:
                with torch.enable_grad(), caller_forward(), contextlib.ExitStack() as stack:
                    if self._net is self.model and self._micro_batches == 1:
                        # optional passes (the GGN fast path's recorder) can watch the
                        # closure's forward: the observer's pre-hook makes them use hooks
                        for c in self.components:
                            if _has_gradient_pass(c) and c.gradient_pass_optional:
                                stack.enter_context(c.gradient_pass(self._net))
                    returned = closure()
            finally:
                self._observer.detach()
        else:
            convention, returned = "opt.step()", None
        seen = self._observer.take(convention)
        if all(p.grad is None for p in self._params):
            raise ObservationError(
                f"{convention}: the optimised parameters have no gradient; call loss.backward() "
                f"before {convention} (or let the closure call it)"
            )
        loss = seen.loss if seen.loss is not None else returned
        if not isinstance(loss, Tensor):
            raise ObservationError(f"{convention}: the loss module did not return a tensor")
        return _Batch(
            seen.inputs, seen.targets, convention, loss.detach(), forward_before_step=closure is None
        )

    def _warn_if_discarding(self) -> None:
        """``step(batch)`` computes its own gradient: say so when ``.grad`` holds the caller's."""
        left = self._grads_left
        for i, p in enumerate(self._params):
            g = p.grad
            if g is None:
                continue
            mark = None if left is None else left[i]
            if mark is None or mark[0] != id(g) or mark[1] != version(g):
                warnings.warn(
                    "opt.step((inputs, targets)) computes its own gradient and discards the one "
                    "in .grad; to step with the gradient you computed, call opt.step() after "
                    "loss.backward() (or opt.step(closure))",
                    UserWarning,
                    stacklevel=4,
                )
                return

    def _gradient(self, b: _Batch) -> _Gradient:
        """Phase 1: :math:`f(\\theta)` and :math:`g` on the batch (the optimiser's own pass, or
        the caller's gradient), averaged over data-parallel workers (the one place where the
        batch's loss and gradient are reduced), then the gradient-transform stage."""
        own = b.own or any(
            _has_gradient_pass(c) and not c.gradient_pass_optional for c in self.components
        )
        if own:
            loss, outputs = self._forward_backward(b.inputs, b.targets)
        else:
            assert b.caller_loss is not None
            loss, outputs = b.caller_loss, None
            if b.forward_before_step:
                self._recording_forward(b.inputs)
        if self.grad_all_reduce is not None:
            for p in self._params:  # same layout on every worker
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.grad_all_reduce([p.grad for p in self._params])  # type: ignore[misc]
        loss = self.all_reduce(loss)
        params = self._params
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
        raw = self._clip(grads)
        loss_f, grad_norm, raw_f = _floats([loss, norm(grads), raw])
        assert loss_f is not None
        # identities only (no references: holding the old gradients would change allocation)
        self._grads_left = [None if p.grad is None else (id(p.grad), version(p.grad)) for p in params]  # type: ignore[misc]
        return _Gradient(loss, outputs, grads, loss_f, grad_norm, raw_f)

    def _recording_forward(self, inputs: Any) -> None:
        """After ``loss.backward(); opt.step()`` the caller's forward ran unwatched: components
        whose gradient pass only records activations (the GGN fast path) get a forward of their
        own on the observed batch, without touching the model's buffers, under the caller's
        autocast and with gradients enabled, as the forward of ``step(batch)`` (so the recorder
        checks and reuses what it does there: that the first layer's input does not depend on
        the parameters, max-pooling indices); its graph is dropped unused. One forward, against
        a forward and a forward-mode pass on the general path."""
        comps = [
            c for c in self.components
            if _has_gradient_pass(c) and c.gradient_pass_optional and c.records_forward
        ]  # fmt: skip
        if not comps or self._micro_batches != 1:
            return
        with (
            torch.enable_grad(),
            side_effect_free(self._net, keep_autocast=True),
            contextlib.ExitStack() as stack,
        ):
            call_model(self._inside_passes(stack, comps), inputs)

    def _inside_passes(self, stack: contextlib.ExitStack, comps: list[Component]) -> nn.Module:
        """Enter ``comps``' :meth:`~qlrlab.interfaces.Component.gradient_pass` contexts on
        ``stack``, each wrapping the module the one before yielded; returns the module the
        forward pass must call."""
        module = self._net
        for comp in comps:
            module = stack.enter_context(comp.gradient_pass(module))
        return module

    def _clip(self, grads: list[Tensor]) -> Tensor | None:
        """Clip ``grads`` in place by value, then by global norm (``gradient.clip_value``,
        ``gradient.clip_norm``; as ``torch.nn.utils.clip_grad_value_`` and ``clip_grad_norm_``);
        returns the norm before clipping (``None`` when nothing is configured)."""
        value = getattr(self.gradient, "clip_value", None)
        max_norm = getattr(self.gradient, "clip_norm", None)
        if value is None and max_norm is None:
            return None
        raw = norm(grads)
        with torch.no_grad():
            if value is not None:
                torch._foreach_clamp_min_(grads, -value)
                torch._foreach_clamp_max_(grads, value)
            if max_norm is not None:
                total = raw if value is None else norm(grads)
                coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
                torch._foreach_mul_(grads, coef)
        return raw

    def _forward_backward(self, inputs: Any, targets: Any) -> tuple[Tensor, Tensor | None]:
        """Zero the gradients, then forward and backward under the components'
        ``gradient_pass`` contexts; returns the detached loss and outputs."""
        for group in self.param_groups:  # zero_grad(set_to_none=True) minus its profiler scope
            for p in group["params"]:
                p.grad = None
        k = self._micro_batches
        comps = [  # skip default no-ops, and optional passes that cannot see the whole batch
            c for c in self.components
            if _has_gradient_pass(c) and (k == 1 or not c.gradient_pass_optional)
        ]  # fmt: skip
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            module = self._inside_passes(stack, comps)
            if k == 1:
                outputs = call_model(module, inputs)
                loss = self.loss_fn(outputs, targets)
                loss.backward()
                return loss.detach(), outputs.detach()
            # micro-batches: the gradient of the whole (mean-reduced) batch, weighted by rows
            n = _rows(inputs)
            total = None
            for x, y in zip(_split_rows(inputs, k), _split_rows(targets, k)):
                rows = _rows(x)
                if rows == 0:
                    continue
                part = self.loss_fn(call_model(module, x), y) * (rows / n)
                part.backward()
                total = part.detach() if total is None else total + part.detach()
        assert total is not None
        return total, None

    def _bind_curvature(
        self, grad: _Gradient, inputs: Any, targets: Any, lam: float
    ) -> StepContext:
        """Phase 2: the step's :class:`~qlrlab.interfaces.StepContext`, with the curvature
        oracle bound to (model, loss, batch) at :math:`\\theta`."""
        problem = Problem(
            model=self._net, loss_fn=self.loss_fn, inputs=inputs, targets=targets,
            params=self._params, param_names=self._names, outputs=grad.outputs, loss=grad.loss,
        )  # fmt: skip
        bound = self.curvature.bind(problem) if self.curvature is not None else None
        return StepContext(
            problem=problem, grads=grad.grads, step=self._step, damping=lam, curvature=bound,
            param_groups=self.param_groups, group_index=self._group_index,
            all_reduce=self.all_reduce,
        )  # fmt: skip

    def _update(self, d: list[Tensor], proposal: Proposal) -> _Update:
        """Phase 5: :math:`\\delta = -\\alpha\\,\\mathrm{lr}_g d` (or the rule's explicit
        :math:`\\delta` times :math:`\\mathrm{lr}_g`) and its norms, without side effects."""
        lrs = [float(g["lr"]) for g in self.param_groups]
        lr, group = lrs[0], self._group_index
        uniform = all(m == lr for m in lrs)
        explicit = proposal.update is not None
        # the quadratic rule already computed ||d||^2 (same tensor ops: identical value)
        sq = proposal.sq_norm if not explicit and proposal.sq_norm is not None else None
        alpha = proposal.alpha * lr if lr != 1.0 else proposal.alpha  # (x * 1.0 == x: skip)
        direction_norm = (sq_norm(d) if sq is None else sq).sqrt()
        if not explicit and uniform:
            delta = list(torch._foreach_mul(d, -alpha))  # -(a*m) == (-a)*m exactly
            update_norm = abs(alpha) * direction_norm  # ||alpha d|| = |alpha| ||d||
        else:
            if proposal.update is None:
                delta = [(-proposal.alpha * lrs[group[i]]) * d[i] for i in range(len(d))]
            else:
                delta = [proposal.update[i] * lrs[group[i]] for i in range(len(d))]
            update_norm = norm(delta)
        keys = ("alpha", "direction_norm", "update_norm", "grad_dot_direction", "curvature",
                "momentum", "proposed_alpha", "proposed_sq_norm")  # fmt: skip
        values = _floats([
            alpha, direction_norm, update_norm, proposal.grad_dot_direction, proposal.curvature,
            proposal.momentum, proposal.alpha, proposal.sq_norm,
        ])  # fmt: skip
        combination = None
        if explicit and uniform and proposal.combination is not None:
            combination = [(c * lr, v) for c, v in proposal.combination]
        return _Update(delta, alpha, explicit, uniform, dict(zip(keys, values)), combination)

    def _predicted_change(
        self, ctx: StepContext, proposal: Proposal, update: _Update, lam: float, required: bool
    ) -> float | None:
        """:math:`\\Delta M` of the quadratic model the damping schedule's :math:`\\rho` uses,
        for the update actually taken (from the proposal's scalars where it has them)."""
        bound, grads = ctx.curvature, ctx.grads
        if bound is None or (not required and proposal.curvature is None):
            return None
        sc = update.scalars
        if update.uniform:
            lr = float(self.param_groups[0]["lr"])
            base = proposal.update if update.explicit else ctx.direction
            assert base is not None
            if update.explicit:
                scale = lr
            else:
                assert sc["proposed_alpha"] is not None
                scale = -sc["proposed_alpha"] * lr
            q = sc["curvature"]
            q = q if q is not None else float(self.all_reduce(bound.quadratic_form(base)))
            gd = sc["grad_dot_direction"]
            gd = gd if gd is not None else float(dot(grads, base))
            dd = sc["proposed_sq_norm"]
            dd = dd if dd is not None else float(sq_norm(base))
            g_delta, quad, norm2 = scale * gd, scale * scale * q, scale * scale * dd
        else:
            g_delta = float(dot(grads, update.delta))
            quad = float(self.all_reduce(bound.quadratic_form(update.delta)))
            norm2 = float(sq_norm(update.delta))
        undamped = g_delta + 0.5 * quad
        return undamped + 0.5 * lam * norm2 if self.damping.rho_model == "damped" else undamped

    def _apply(self, ctx: StepContext, update: _Update, need_new_loss: bool) -> float | None:
        """:math:`\\theta \\leftarrow \\theta + \\delta`; returns :math:`f(\\theta_{new})` on the
        same batch when needed (before the update from the bound curvature's cached
        activations when it offers that, after it with a side-effect-free forward otherwise)."""
        new_loss: Tensor | None = None
        bound = ctx.curvature
        if need_new_loss and bound is not None and update.uniform:
            if not update.explicit:
                assert ctx.direction is not None
                new_loss = bound.loss_after(update.alpha, ctx.direction)
            elif update.combination is not None:
                new_loss = bound.loss_at(update.combination)
        with torch.no_grad():
            torch._foreach_add_(self._params, update.delta)
        drop_stale_autocast_casts()
        if need_new_loss and new_loss is None:
            with torch.no_grad(), side_effect_free(self._net, keep_autocast=True):
                new_loss = self.loss_fn(ctx.problem.call_model(), ctx.problem.targets)
        return None if new_loss is None else _f(self.all_reduce(new_loss))

    @staticmethod
    def _rho(loss: float, new_loss: float | None, pred: float | None) -> float | None:
        """Phase 6: :math:`\\rho = (f(\\theta_{new}) - f(\\theta)) / \\Delta M` (NaN without a
        usable :math:`\\Delta M`; ``None`` without :math:`f(\\theta_{new})`)."""
        if new_loss is None:
            return None
        if pred is None or pred == 0.0:
            return float("nan")
        return (new_loss - loss) / pred

    def _refuse(self, txn: _Transaction | None, status: str, **fields: Any) -> StepInfo:
        """The one exit for a non-finite step: parameters untouched, every component back to
        its snapshot, and the damping schedule told (:meth:`DampingSchedule.on_nonfinite`)."""
        if txn is not None:
            txn.rollback(params=False)
        self.damping.on_nonfinite()
        return StepInfo(damping=self.damping.value, status=status, step=self._step, **fields)

    def _stateful(self) -> list[Component]:
        """The components whose state a step may change and a rejection must undo."""
        comps: list[Component] = [self.direction]
        if self.curvature is not None:
            comps.append(self.curvature)
        comps.append(self.step_size)
        return comps

    # -- torch.optim plumbing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Standard optimiser state plus every component's state under ``"qlrlab"``."""
        sd = super().state_dict()
        # the per-parameter view of opt.state holds the components' own tensors, saved below
        sd["state"] = {}
        sd["qlrlab"] = {
            "composition": self.composition,
            "step": self._step,
            "direction": clone_state(self.direction.state_dict()),
            "curvature": clone_state(self.curvature.state_dict()) if self.curvature else {},
            "step_size": clone_state(self.step_size.state_dict()),
            "damping": clone_state(self.damping.state_dict()),
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (λ and counters included).

        Raises:
            ValueError: the state was saved by a different composition (naming both).
        """
        sd = dict(state_dict)
        extra = sd.pop("qlrlab", None)
        if extra is not None:
            saved = extra.get("composition")
            if saved is not None and dict(saved) != self.composition:
                fmt = ", ".join
                raise ValueError(
                    "load_state_dict: the state was saved by an optimizer composed of "
                    f"{fmt(f'{k}={v}' for k, v in saved.items())}, but this one is "
                    f"{fmt(f'{k}={v}' for k, v in self.composition.items())}; build the "
                    "optimizer from the same spec (or preset) before loading"
                )
        super().load_state_dict(sd)
        if extra is None:
            return
        dev = self._params[0].device if self._params else torch.device("cpu")
        dtype = self._params[0].dtype if self._params else None
        extra = state_to_device(extra, dev, dtype)
        self._step = int(extra["step"])
        self.direction.load_state_dict(extra["direction"])
        if self.curvature is not None:
            self.curvature.load_state_dict(extra["curvature"])
        self.step_size.load_state_dict(extra["step_size"])
        self.damping.load_state_dict(extra["damping"])

    @property
    def step_count(self) -> int:
        """Number of steps attempted."""
        return self._step

    def __repr__(self) -> str:
        names = [type(c).__name__ for c in self.components]
        return f"ComposedOptimizer({', '.join(names)})"
