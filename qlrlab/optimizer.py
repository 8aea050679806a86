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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qlrlab._passes import side_effect_free
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
        grad_norm: :math:`\\|g\\|`.
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


def _has_gradient_pass(comp: Any) -> bool:
    """Whether ``comp`` overrides :meth:`Component.gradient_pass` (the default is a no-op)."""
    fn = getattr(comp, "gradient_pass", None)
    return getattr(fn, "__func__", None) is not Component.gradient_pass


@dataclass
class _Gradient:
    """Phase 1's result: :math:`f(\\theta)` and :math:`g` on the batch (averaged over workers)."""

    loss: Tensor
    outputs: Tensor
    grads: list[Tensor]
    loss_f: float
    grad_norm: float | None

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
        return {"loss": self.loss_f, "grad_norm": self.grad_norm}


@dataclass
class _Update:
    """Phase 5's result: the update :math:`\\delta` and its scalars (one host transfer)."""

    delta: list[Tensor]
    alpha: Tensor  # the rule's alpha times group 0's lr
    explicit: bool  # the rule proposed delta itself (not -alpha d)
    uniform: bool  # every param group has the same lr
    scalars: dict[str, float | None]

    @property
    def finite(self) -> bool:
        """Whether the step may be taken (:math:`\\alpha` and :math:`\\|\\delta\\|` finite)."""
        return _finite(self.scalars["alpha"]) and _finite(self.scalars["update_norm"])

    def report(self) -> dict[str, Any]:
        """The :class:`StepInfo` fields this phase knows."""
        keys = ("alpha", "direction_norm", "grad_dot_direction", "curvature")
        return {k: self.scalars[k] for k in keys}


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
                for p, saved in zip(self._params, self._copies):
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
        self.all_reduce: Callable[[Tensor], Tensor] = all_reduce or (lambda t: t)
        self.grad_all_reduce = grad_all_reduce
        self._step = 0

        names = {id(p): n for n, p in model.named_parameters()}
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
            comp.setup(self._params, model, loss_fn)

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
        """One step on ``batch = (inputs, targets)``; returns a :class:`StepInfo`.

        Computes the gradient itself (never call ``backward`` before it). The step is a
        transaction: a rejected or refused step leaves parameters and every component's state
        as they were (the damping schedule, which decides, keeps its update).
        """
        inputs, targets = self._unpack(batch, closure)
        self._step += 1
        t, lam = self._step, float(self.damping.value)
        grad = self._gradient(inputs, targets)  # 1. f(θ), g
        if grad.status != "ok":  # nothing has run yet
            return self._refuse(None, grad.status, **grad.report())
        may_reject = self.damping.may_reject
        txn = _Transaction(self._stateful(), self._params if may_reject else None)
        ctx = self._bind_curvature(grad, inputs, targets, lam)  # 2. C bound at θ
        ctx.direction = d = self.direction.compute(ctx.grads, ctx)  # 3. d
        proposal = self.step_size.propose(ctx)  # 4. α (or δ)
        update = self._update(d, proposal)  # 5. δ = -α d · lr
        if not update.finite:  # refuse: parameters untouched
            return self._refuse(txn, "nonfinite_alpha", **grad.report(), **update.report())
        need_rho = self.track_rho or self.damping.needs_new_loss(t)
        pred = self._predicted_change(ctx, proposal, update, lam, need_rho)  # ΔM
        new_loss = self._apply(ctx, update, need_rho)  # θ ← θ + δ; f(θ_new)
        rho = self._rho(grad.loss_f, new_loss, pred)  # 6. ρ
        accepted = self.damping.update(rho=rho, loss=grad.loss_f, new_loss=new_loss, step=t)
        if accepted:  # 7. the damping's verdict
            txn.commit()
        else:
            txn.rollback(params=True)
        return StepInfo(
            **grad.report(), **update.report(), damping=self.damping.value, rho=rho,
            predicted_change=pred, new_loss=new_loss, update_norm=update.scalars["update_norm"],
            momentum=update.scalars["momentum"], status="ok" if accepted else "rejected", step=t,
        )  # fmt: skip

    # -- the phases, in step order ----------------------------------------------------------------
    @staticmethod
    def _unpack(batch: Any, closure: Any) -> tuple[Any, Any]:
        if closure is not None or batch is None:
            raise TypeError(
                "ComposedOptimizer.step takes the batch: opt.step((inputs, targets)); "
                "it computes the loss and gradient itself (closures are not used)"
            )
        inputs, targets = batch
        return inputs, targets

    def _gradient(self, inputs: Any, targets: Any) -> _Gradient:
        """Phase 1: :math:`f(\\theta)` and :math:`g` on the batch, averaged over data-parallel
        workers (the one place where the batch's loss and gradient are reduced)."""
        loss, outputs = self._forward_backward(inputs, targets)
        if self.grad_all_reduce is not None:
            for p in self._params:  # same layout on every worker
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.grad_all_reduce([p.grad for p in self._params])  # type: ignore[misc]
        loss = self.all_reduce(loss)
        params = self._params
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
        loss_f, grad_norm = _floats([loss, norm(grads)])
        assert loss_f is not None
        return _Gradient(loss, outputs, grads, loss_f, grad_norm)

    def _forward_backward(self, inputs: Any, targets: Any) -> tuple[Tensor, Tensor]:
        """Zero the gradients, then forward and backward under the components'
        ``gradient_pass`` contexts; returns the detached loss and outputs."""
        for group in self.param_groups:  # zero_grad(set_to_none=True) minus its profiler scope
            for p in group["params"]:
                p.grad = None
        comps = [c for c in self.components if _has_gradient_pass(c)]  # skip default no-ops
        with torch.enable_grad(), contextlib.ExitStack() as stack:
            module = self.model
            for comp in comps:
                module = stack.enter_context(comp.gradient_pass(module))
            outputs = module(*inputs) if isinstance(inputs, (tuple, list)) else module(inputs)
            loss = self.loss_fn(outputs, targets)
            loss.backward()
        return loss.detach(), outputs.detach()

    def _bind_curvature(
        self, grad: _Gradient, inputs: Any, targets: Any, lam: float
    ) -> StepContext:
        """Phase 2: the step's :class:`~qlrlab.interfaces.StepContext`, with the curvature
        oracle bound to (model, loss, batch) at :math:`\\theta`."""
        problem = Problem(
            model=self.model, loss_fn=self.loss_fn, inputs=inputs, targets=targets,
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
            alpha, direction_norm, update_norm, proposal.grad_dot, proposal.quad_form,
            proposal.momentum, proposal.alpha, proposal.sq_norm,
        ])  # fmt: skip
        return _Update(delta, alpha, explicit, uniform, dict(zip(keys, values)))

    def _predicted_change(
        self, ctx: StepContext, proposal: Proposal, update: _Update, lam: float, required: bool
    ) -> float | None:
        """:math:`\\Delta M` of the quadratic model the damping schedule's :math:`\\rho` uses,
        for the update actually taken (from the proposal's scalars where it has them)."""
        bound, grads = ctx.curvature, ctx.grads
        if bound is None or (not required and proposal.quad_form is None):
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
        if need_new_loss and bound is not None and not update.explicit and update.uniform:
            assert ctx.direction is not None
            new_loss = bound.loss_after(update.alpha, ctx.direction)
        with torch.no_grad():
            torch._foreach_add_(self._params, update.delta)
        if need_new_loss and new_loss is None:
            with torch.no_grad(), side_effect_free(self.model):
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
        sd["qlrlab"] = {
            "step": self._step,
            "direction": clone_state(self.direction.state_dict()),
            "curvature": clone_state(self.curvature.state_dict()) if self.curvature else {},
            "step_size": clone_state(self.step_size.state_dict()),
            "damping": clone_state(self.damping.state_dict()),
        }
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (λ and counters included)."""
        sd = dict(state_dict)
        extra = sd.pop("qlrlab", None)
        super().load_state_dict(sd)
        if extra is None:
            return
        dev = self._params[0].device if self._params else torch.device("cpu")
        extra = state_to_device(extra, dev)
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
