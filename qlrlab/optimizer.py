r"""The composed optimiser: one ``torch.optim.Optimizer`` built from four components.

One call ``info = opt.step((inputs, targets))`` runs (Clarke & Hernández-Lobato, 2024, Alg. 1
generalised):

1. zero the gradients; the **gradient pass** :math:`f(\theta), g` (wrapped by the components'
   ``gradient_pass`` contexts); a non-finite loss or gradient stops here, leaves the parameters
   and the direction state untouched and increases the damping;
2. bind the **curvature oracle** to (model, loss, batch) at :math:`\theta`;
3. the **direction** :math:`d`;
4. the **step size** :math:`\alpha` (times each group's ``lr``), or an explicit update
   :math:`\delta`; a non-finite :math:`\alpha` leaves the parameters untouched;
5. :math:`\theta \leftarrow \theta + \delta` with :math:`\delta = -\alpha d`;
6. if the damping schedule asks (or ``track_rho``): :math:`f(\theta_{new})` on the same batch in
   the same mode without touching buffers, the predicted change

   .. math:: \Delta M = g^\top\delta + \tfrac12\delta^\top C\delta\ [+\ \tfrac12\lambda_{t-1}\|\delta\|^2]

   and :math:`\rho = (f(\theta_{new}) - f(\theta))/\Delta M`;
7. the **damping** update (which may reject the step: parameters, direction and step-size state
   are then restored exactly).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qlrlab._passes import side_effect_free
from qlrlab._tensorlist import dot, norm, sq_norm
from qlrlab.interfaces import (
    BoundCurvature,
    Component,
    CurvatureOracle,
    DampingSchedule,
    DirectionProvider,
    Problem,
    Proposal,
    StepContext,
    StepSizeRule,
)
from qlrlab.specs import OptimizerSpec
from qlrlab.step_sizes.fixed import FixedStepSize

__all__ = ["ComposedOptimizer", "StepInfo", "build_optimizer"]


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


def _clone_state(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_state(v) for v in obj)
    return copy.deepcopy(obj)


class ComposedOptimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` composed of a direction provider, a curvature oracle, a
    step-size rule and a damping schedule.

    Args:
        params: parameters or param groups (default: all trainable parameters of ``model``).
            Each group's ``lr`` multiplies the rule's :math:`\\alpha` (``fixed`` sets it).
        model: the model (the extra passes call it functionally; never modified).
        loss_fn: mean-reduced loss module, ``loss_fn(model(inputs), targets)``.
        direction: the direction provider.
        step_size: the step-size rule.
        curvature: the curvature oracle (``None``: none; rules that need one refuse to build).
        damping: the damping schedule (``None``: constant :math:`\\lambda = 0`).
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
        spec: OptimizerSpec | None = None,
        track_rho: bool = False,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
        grad_all_reduce: Callable[[list[Tensor]], None] | None = None,
    ) -> None:
        from qlrlab.damping.constant import ConstantDamping

        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        lr = step_size.initial_group_lr if isinstance(step_size, FixedStepSize) else 1.0
        super().__init__(params, {"lr": lr})
        self.model = model
        self.loss_fn = loss_fn
        self.direction = direction
        self.curvature = curvature
        self.step_size = step_size
        self.damping = damping if damping is not None else ConstantDamping()
        self.spec = spec
        self.track_rho = track_rho
        self.all_reduce: Callable[[Tensor], Tensor] = all_reduce or (lambda t: t)
        self.grad_all_reduce = grad_all_reduce
        self._step = 0

        names = {id(p): n for n, p in model.named_parameters()}
        self._params: list[Tensor] = []
        self._group_index: list[int] = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(
                        "params: every optimised parameter must belong to `model` "
                        "(pass params=None to optimise all of model.parameters())"
                    )
                self._params.append(p)
                self._group_index.append(gi)
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
    def _gradient_pass(self, inputs: Any, targets: Any) -> tuple[Tensor, Tensor]:
        for group in self.param_groups:  # zero_grad(set_to_none=True) minus its profiler scope
            for p in group["params"]:
                p.grad = None
        # skip the default no-op contexts
        comps = [c for c in self.components if _has_gradient_pass(c)]
        with torch.enable_grad():
            if len(comps) == 1:  # the usual case (e.g. the GGN fast path): no ExitStack
                with comps[0].gradient_pass(self.model) as module:
                    loss, outputs = self._forward_backward(module, inputs, targets)
            else:
                with contextlib.ExitStack() as stack:
                    module = self.model
                    for comp in comps:
                        module = stack.enter_context(comp.gradient_pass(module))
                    loss, outputs = self._forward_backward(module, inputs, targets)
        return loss.detach(), outputs.detach()

    def _forward_backward(self, module: Any, inputs: Any, targets: Any) -> tuple[Tensor, Tensor]:
        outputs = module(*inputs) if isinstance(inputs, (tuple, list)) else module(inputs)
        loss = self.loss_fn(outputs, targets)
        loss.backward()
        return loss, outputs

    def _loss_at_current(self, problem: Problem) -> Tensor:
        with torch.no_grad(), side_effect_free(self.model):
            return self.loss_fn(problem.call_model(), problem.targets)

    def step(self, batch: Any = None, closure: Any = None) -> StepInfo:  # type: ignore[override]
        """One full step on ``batch = (inputs, targets)``; returns a :class:`StepInfo`.

        Computes the gradient itself (never call ``backward`` before it).
        """
        if closure is not None or batch is None:
            raise TypeError(
                "ComposedOptimizer.step takes the batch: opt.step((inputs, targets)); "
                "it computes the loss and gradient itself (closures are not used)"
            )
        inputs, targets = batch
        self._step += 1
        t = self._step
        lam = float(self.damping.value)
        loss0, outputs = self._gradient_pass(inputs, targets)
        if self.grad_all_reduce is not None:
            for p in self._params:  # same layout on every worker
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.grad_all_reduce([p.grad for p in self._params])  # type: ignore[misc]
        loss0 = self.all_reduce(loss0)
        params = self._params
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in params]
        loss_f, grad_norm = _floats([loss0, norm(grads)])
        assert loss_f is not None
        if not math.isfinite(loss_f):
            self.damping.on_nonfinite()
            return StepInfo(
                loss=loss_f, damping=self.damping.value, status="nonfinite_loss", step=t
            )
        if not _finite(grad_norm):
            self.damping.on_nonfinite()
            return StepInfo(
                loss=loss_f, damping=self.damping.value, grad_norm=grad_norm,
                status="nonfinite_grad", step=t,
            )  # fmt: skip

        problem = Problem(
            model=self.model, loss_fn=self.loss_fn, inputs=inputs, targets=targets,
            params=params, param_names=self._names, outputs=outputs, loss=loss0,
        )  # fmt: skip
        bound: BoundCurvature | None = (
            self.curvature.bind(problem) if self.curvature is not None else None
        )
        ctx = StepContext(
            problem=problem, grads=grads, step=t, damping=lam, curvature=bound,
            param_groups=self.param_groups, group_index=self._group_index,
            all_reduce=self.all_reduce,
        )  # fmt: skip

        may_reject = self.damping.may_reject
        snapshot = None
        if may_reject:
            snapshot = (
                [p.detach().clone() for p in params],
                _clone_state(self.direction.state_dict()),
                _clone_state(self.step_size.state_dict()),
            )

        d = self.direction.compute(grads, ctx)
        ctx.direction = d
        proposal = self.step_size.propose(ctx)
        alpha_base = proposal.alpha
        mults = [float(g["lr"]) for g in self.param_groups]
        uniform = all(m == mults[0] for m in mults)
        # the quadratic rule already computed ||d||^2 (same tensor ops: identical value)
        dd_t = (
            proposal.sq_norm if proposal.update is None and proposal.sq_norm is not None else None
        )
        # explicit update delta (per group multipliers applied); computed before the finiteness
        # checks below (no side effects) so that every scalar comes back in one transfer
        gi = self._group_index
        alpha_eff_t = alpha_base * mults[0] if mults[0] != 1.0 else alpha_base  # x*1.0 == x
        dn_t = (sq_norm(d) if dd_t is None else dd_t).sqrt()
        if proposal.update is None and uniform:
            update = list(torch._foreach_mul(d, -alpha_eff_t))  # -(a*m) == (-a)*m exactly
            un_t = abs(alpha_eff_t) * dn_t  # ||alpha d|| = |alpha| ||d||
        else:
            if proposal.update is None:
                update = [(-alpha_base * mults[gi[i]]) * d[i] for i in range(len(d))]
            else:
                update = [proposal.update[i] * mults[gi[i]] for i in range(len(d))]
            un_t = norm(update)
        (
            alpha_eff, direction_norm, update_norm, gd_f, q_f, momentum, alpha_f, sq_f,
        ) = _floats([
            alpha_eff_t, dn_t, un_t, proposal.grad_dot, proposal.quad_form, proposal.momentum,
            alpha_base, proposal.sq_norm,
        ])  # fmt: skip
        if not (_finite(alpha_eff) and _finite(update_norm)):  # refuse: parameters untouched
            self._restore(snapshot, params=False)
            self.damping.on_nonfinite()
            return StepInfo(
                loss=loss_f, alpha=alpha_eff, damping=self.damping.value, grad_norm=grad_norm,
                direction_norm=direction_norm, grad_dot_direction=gd_f,
                curvature=q_f, status="nonfinite_alpha", step=t,
            )  # fmt: skip

        need_rho = self.track_rho or self.damping.needs_new_loss(t)
        pred_damped, pred_undamped = self._predicted_change(
            proposal, update, d, grads, bound, uniform, mults[0], lam, need_rho,
            (alpha_f, gd_f, q_f, sq_f),
        )  # fmt: skip
        new_loss_t: Tensor | None = None
        if need_rho and bound is not None and proposal.update is None and uniform:
            new_loss_t = bound.loss_after(alpha_eff_t, d)
        with torch.no_grad():
            torch._foreach_add_(params, update)
        if need_rho and new_loss_t is None:
            new_loss_t = self._loss_at_current(problem)
        new_loss = None
        rho = None
        pred = pred_damped if self.damping.rho_model == "damped" else pred_undamped
        if new_loss_t is not None:
            new_loss = _f(self.all_reduce(new_loss_t))
            assert new_loss is not None
            if pred is None or pred == 0.0:
                rho = float("nan")
            else:
                rho = (new_loss - loss_f) / pred
        accepted = self.damping.update(rho=rho, loss=loss_f, new_loss=new_loss, step=t)
        status = "ok"
        if not accepted:
            assert snapshot is not None, "a schedule that rejects steps must set may_reject = True"
            self._restore(snapshot, params=True)
            status = "rejected"
        return StepInfo(
            loss=loss_f,
            alpha=alpha_eff,
            damping=self.damping.value,
            rho=rho,
            grad_dot_direction=gd_f,
            curvature=q_f,
            predicted_change=pred,
            new_loss=new_loss,
            grad_norm=grad_norm,
            direction_norm=direction_norm,
            update_norm=update_norm,
            momentum=momentum,
            status=status,
            step=t,
        )

    def _restore(self, snapshot: tuple | None, *, params: bool) -> None:
        """Undo this step's state changes from a ``may_reject`` snapshot (no-op without one):
        the direction's and step-size rule's state, and the parameters when ``params``."""
        if snapshot is None:
            return
        if params:
            with torch.no_grad():
                for p, saved in zip(self._params, snapshot[0]):
                    p.copy_(saved)
        self.direction.load_state_dict(snapshot[1])
        self.step_size.load_state_dict(snapshot[2])

    def _predicted_change(
        self,
        proposal: Proposal,
        update: list[Tensor],
        d: list[Tensor],
        grads: list[Tensor],
        bound: BoundCurvature | None,
        uniform: bool,
        mult: float,
        lam: float,
        required: bool,
        floats: tuple[float | None, float | None, float | None, float | None],
    ) -> tuple[float | None, float | None]:
        """(damped, undamped) :math:`\\Delta M` for the update actually taken (``floats``: the
        proposal's alpha, grad_dot, quad_form and sq_norm already converted, or ``None``)."""
        if bound is None:
            return None, None
        if not required and proposal.quad_form is None:
            return None, None
        if uniform:
            base = d if proposal.update is None else proposal.update
            alpha_f, gd_f, q_f, dd_f = floats
            assert alpha_f is not None
            scale = -alpha_f * mult if proposal.update is None else mult
            q = q_f if q_f is not None else float(self.all_reduce(bound.quadratic_form(base)))
            gd = gd_f if gd_f is not None else float(dot(grads, base))
            dd = dd_f if dd_f is not None else float(sq_norm(base))
            g_delta = scale * gd
            quad = scale * scale * q
            norm2 = scale * scale * dd
        else:
            g_delta = float(dot(grads, update))
            quad = float(self.all_reduce(bound.quadratic_form(update)))
            norm2 = float(sq_norm(update))
        undamped = g_delta + 0.5 * quad
        return undamped + 0.5 * lam * norm2, undamped

    # -- torch.optim plumbing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Standard optimiser state plus every component's state under ``"qlrlab"``."""
        sd = super().state_dict()
        sd["qlrlab"] = {
            "step": self._step,
            "direction": _clone_state(self.direction.state_dict()),
            "curvature": _clone_state(self.curvature.state_dict()) if self.curvature else {},
            "step_size": _clone_state(self.step_size.state_dict()),
            "damping": _clone_state(self.damping.state_dict()),
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
        dtype = self._params[0].dtype if self._params else None
        extra = _to_device(extra, dev, dtype)
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


def _to_device(obj: Any, device: torch.device, dtype: torch.dtype | None = None) -> Any:
    """Move every tensor to ``device``; floating tensors also to ``dtype`` (the parameters')."""
    if isinstance(obj, Tensor):
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype)
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device, dtype) for v in obj)
    return obj


def build_optimizer(
    spec: OptimizerSpec | Mapping[str, Any] | str,
    model: nn.Module,
    loss_fn: nn.Module,
    params: Iterable[Any] | None = None,
    *,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    grad_all_reduce: Callable[[list[Tensor]], None] | None = None,
) -> ComposedOptimizer:
    """Build a :class:`ComposedOptimizer` from a spec.

    Args:
        spec: an :class:`OptimizerSpec`, a mapping validated into one, or a preset name.
        model: the model to optimise.
        loss_fn: the mean-reduced loss module.
        params: parameters or param groups (default: all trainable parameters of ``model``).
        all_reduce: data-parallel averaging of scalars (see :mod:`qlrlab.distributed`).
        grad_all_reduce: in-place data-parallel averaging of the gradients (not needed with a
            DDP-wrapped model); :func:`qlrlab.distributed.build_distributed_optimizer` sets both.

    Returns:
        The optimiser; call ``opt.step((inputs, targets))``.
    """
    if isinstance(spec, str):
        from qlrlab.presets import get_preset

        spec = get_preset(spec)
    elif not isinstance(spec, OptimizerSpec):
        spec = OptimizerSpec.model_validate(dict(spec))
    return ComposedOptimizer(
        params,
        model=model,
        loss_fn=loss_fn,
        direction=spec.direction.build(),
        curvature=spec.curvature.build() if spec.curvature is not None else None,
        step_size=spec.step_size.build(),
        damping=spec.damping.build(),
        spec=spec,
        track_rho=spec.track_rho,
        all_reduce=all_reduce,
        grad_all_reduce=grad_all_reduce,
    )
