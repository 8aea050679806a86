r"""Limited-memory BFGS direction (Nocedal, 1980; Liu & Nocedal, 1989).

The direction is :math:`d_t = H_t g_t`, with :math:`H_t` the L-BFGS inverse-Hessian
approximation built from the last ``history`` curvature pairs by the **two-loop recursion**
(Nocedal & Wright, *Numerical Optimization*, Alg. 7.4):

.. math::
    q \leftarrow g;\quad
    \text{for } i = k-1,\dots,0:\ a_i = \rho_i s_i^\top q,\ q \leftarrow q - a_i y_i;\quad
    r \leftarrow \gamma q;\quad
    \text{for } i = 0,\dots,k-1:\ b_i = \rho_i y_i^\top r,\ r \leftarrow r + (a_i - b_i)s_i;
    \quad d = r,

with :math:`\rho_i = 1/s_i^\top y_i` and the initial scaling
:math:`H^0 = \gamma I`, :math:`\gamma = s_{k-1}^\top y_{k-1} / y_{k-1}^\top y_{k-1}` from the most
recent pair (N&W eq. 7.20). Before the first pair :math:`d = g` (:math:`H^0 = I`). The step is
:math:`\theta \leftarrow \theta - \alpha d`; :math:`\alpha` comes from the step-size rule
(``backtracking`` for the textbook line-search method, ``quadratic`` for AdamQLR's heuristics).

**Pairs.** :math:`s = \theta_t - \theta_{t-1}` is the displacement actually taken between two
gradient passes, whatever the step-size rule did (momentum, per-group ``lr``, clipping), so it is
always the *accepted* step. :math:`y` is a gradient difference, chosen by ``pairs``:

* ``same_batch`` (default): :math:`y = g(\theta_t; B_t) - g(\theta_{t-1}; B_t)`, both gradients
  on the *current* batch (the multi-batch / overlap scheme of Schraudolph et al., 2007, and
  Berahas, Nocedal & Takáč, 2016). The second gradient is computed by this component: one extra
  forward/backward pass per step at the stored previous parameters, through
  ``torch.func.functional_call`` inside :func:`qlrlab._passes.side_effect_free` — the model's
  parameters, ``.grad`` fields and buffers (BatchNorm running statistics) are untouched.
* ``consecutive``: :math:`y = g(\theta_t; B_t) - g(\theta_{t-1}; B_{t-1})`, no extra pass, but
  on mini-batches :math:`y` then mixes the change of batch into the curvature estimate (the
  difference of two batches' gradients can dominate :math:`y` once steps are small), which is why
  it is not the default. With full-batch training the two are the same iteration.

**Skipping.** A pair is stored only when :math:`s^\top y > \epsilon\|s\|\|y\|` (``eps``,
:math:`10^{-8}` by default: the cosine of the angle between :math:`s` and :math:`y` must exceed
:math:`\epsilon`), which keeps :math:`H_t` positive definite (N&W §6.1); skipped pairs are
counted in ``skipped``.

**Rejected steps.** A pair is formed at the *next* gradient pass, from the parameters found
there. When the damping schedule rejects a step (``accept_reject``), or a non-finite step is
refused, the optimiser's step transaction restores the parameters and this direction's state
from before the step (:meth:`snapshot` / :meth:`restore`), so the rejected displacement never
enters the memory; the next step forms the pair of the last accepted step again (in
``same_batch`` mode on the new batch). No accept/reject hook is needed: the restore *is* the
notification. The snapshot holds the stored tensors by reference (:meth:`compute` replaces them,
never writes into them), so it costs no copy. A step that changed nothing (:math:`s = 0`) is
skipped without the extra gradient pass.

The vectors are stored flat (one tensor of all optimised parameters, which must therefore share
one dtype and device). Data parallelism: the extra gradient is averaged over the workers with
``ctx.all_reduce``, as the optimiser averages its own gradient.

References:
    J. Nocedal, *Updating quasi-Newton matrices with limited storage*, Math. Comp. 1980.
    D. C. Liu & J. Nocedal, *On the limited memory BFGS method for large scale optimization*,
    Math. Prog. 1989. N. N. Schraudolph, J. Yu & S. Günter, *A stochastic quasi-Newton method for
    online convex optimization*, AISTATS 2007. A. S. Berahas, J. Nocedal & M. Takáč,
    *A multi-batch L-BFGS method for machine learning*, NeurIPS 2016.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from qlrlab._passes import functional_forward, side_effect_free
from qlrlab.interfaces import DirectionProvider, StepContext
from qlrlab.registry import DIRECTIONS, ComponentSpec

__all__ = ["LBFGSDirection", "LBFGSSpec", "two_loop"]


@DIRECTIONS.register("lbfgs")
class LBFGSSpec(ComponentSpec):
    """Spec of the L-BFGS direction.

    Attributes:
        history: number :math:`m \\ge 1` of curvature pairs kept.
        pairs: ``"same_batch"`` (extra gradient pass at the previous parameters on the current
            batch; default) or ``"consecutive"`` (gradients of consecutive batches).
        eps: pair-skipping threshold :math:`\\epsilon \\ge 0`: a pair is kept only when
            :math:`s^\\top y > \\epsilon\\|s\\|\\|y\\|`.
        scaling: use :math:`H^0 = \\gamma I` with :math:`\\gamma = s^\\top y / y^\\top y` of the
            newest pair (``True``) or :math:`H^0 = I`.
    """

    name: Literal["lbfgs"] = "lbfgs"
    history: int = Field(10, ge=1)
    pairs: Literal["same_batch", "consecutive"] = "same_batch"
    eps: float = Field(1e-8, ge=0.0)
    scaling: bool = True

    def build(self) -> LBFGSDirection:
        """Build the direction provider."""
        return LBFGSDirection(self)


def two_loop(g: Tensor, s: Tensor, y: Tensor, gamma: Tensor | float | None = None) -> Tensor:
    """The L-BFGS two-loop recursion :math:`H g` (module docstring).

    Args:
        g: flat vector.
        s: ``[k, n]`` displacements, oldest first.
        y: ``[k, n]`` gradient differences, oldest first.
        gamma: :math:`H^0 = \\gamma I`; ``None``: :math:`s_{k-1}^\\top y_{k-1}/y_{k-1}^\\top
            y_{k-1}` (1 when ``k = 0``).

    Returns:
        :math:`H g`, a new tensor.
    """
    k = s.shape[0]
    if k == 0:
        return g.clone() if gamma is None else g * gamma
    rho = 1.0 / (s * y).sum(1)
    if gamma is None:
        gamma = (s[-1] @ y[-1]) / (y[-1] @ y[-1])
    q = g.clone()
    a = [q.new_zeros(())] * k
    for i in range(k - 1, -1, -1):
        a[i] = rho[i] * (s[i] @ q)
        q.sub_(y[i] * a[i])
    r = q.mul_(gamma)
    for i in range(k):
        b = rho[i] * (y[i] @ r)
        r.add_(s[i] * (a[i] - b))
    return r


class LBFGSDirection(DirectionProvider):
    """L-BFGS direction provider.

    State (``state_dict``): ``step``; ``s`` and ``y``, ``[k, n]`` tensors of the stored pairs
    (oldest first, :math:`k \\le m`); ``prev_params`` (:math:`\\theta_{t-1}`, flat) and, for
    ``pairs: consecutive``, ``prev_grad``; the count of ``skipped`` pairs.
    """

    spec: LBFGSSpec

    def __init__(self, spec: LBFGSSpec | None = None) -> None:
        super().__init__(spec or LBFGSSpec())
        self.step = 0
        self.skipped = 0
        self.s: Tensor = torch.zeros(0, 0)
        self.y: Tensor = torch.zeros(0, 0)
        self.prev_params: Tensor | None = None
        self.prev_grad: Tensor | None = None
        self._shapes: list[torch.Size] = []
        self._numels: list[int] = []
        self._like: Tensor = torch.zeros(())

    def setup(self, params: Sequence[Tensor], model: nn.Module, loss_fn: nn.Module) -> None:
        """Check that the parameters share one dtype and device; allocate empty memory."""
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) > 1:
            raise ValueError(
                f"lbfgs: all optimised parameters must share one dtype and device (found "
                f"{sorted(str(k) for k in kinds)}); cast the model, or optimise the parts with "
                "separate optimisers"
            )
        self._shapes = [p.shape for p in params]
        self._numels = [p.numel() for p in params]
        n = sum(self._numels)
        ref = params[0].detach() if params else torch.zeros(())
        self._like = ref.new_zeros(())
        self.s = ref.new_zeros(0, n)
        self.y = ref.new_zeros(0, n)
        self.prev_params = None
        self.prev_grad = None
        self.step = 0
        self.skipped = 0

    def _flat(self, ts: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.detach().reshape(-1) for t in ts])

    def _split(self, v: Tensor) -> list[Tensor]:
        return [t.view(sh) for t, sh in zip(v.split(self._numels), self._shapes)]

    def _grad_at(self, theta: Tensor, ctx: StepContext) -> Tensor:
        """Gradient of the current batch's loss at ``theta`` (side-effect free)."""
        prob = ctx.problem
        old = [t.clone().requires_grad_(True) for t in self._split(theta)]
        with torch.enable_grad(), side_effect_free(prob.model):
            out = functional_forward(prob.model, prob.param_names, old, prob.inputs)
            loss = prob.loss_fn(out, prob.targets)
            gs = torch.autograd.grad(loss, old, allow_unused=True)
        flat = torch.cat(
            [(torch.zeros_like(o) if g is None else g).reshape(-1) for o, g in zip(old, gs)]
        )
        return ctx.all_reduce(flat.detach())

    @torch.no_grad()
    def _add_pair(self, s: Tensor, y: Tensor) -> None:
        sy = s @ y
        bound = self.spec.eps * torch.linalg.vector_norm(s) * torch.linalg.vector_norm(y)
        if not bool(torch.isfinite(sy)) or not bool(sy > bound):
            self.skipped += 1
            return
        keep = self.spec.history - 1
        self.s = torch.cat([self.s[self.s.shape[0] - keep :] if keep else self.s[:0], s[None]])
        self.y = torch.cat([self.y[self.y.shape[0] - keep :] if keep else self.y[:0], y[None]])

    def compute(self, grads: list[Tensor], ctx: StepContext) -> list[Tensor]:
        """Form the pair of the last accepted step, then return :math:`d = H_t g_t`."""
        self.step += 1
        g = self._flat(grads)
        theta = self._flat(ctx.problem.params)
        prev = self.prev_params
        if prev is not None:
            s = theta - prev
            if not bool((s != 0).any()):  # nothing moved (e.g. a refused step): no pair
                self.skipped += 1
            elif self.spec.pairs == "same_batch":
                self._add_pair(s, g - self._grad_at(prev, ctx))
            else:
                assert self.prev_grad is not None
                self._add_pair(s, g - self.prev_grad)
        self.prev_params = theta.clone()
        self.prev_grad = g.clone() if self.spec.pairs == "consecutive" else None
        with torch.no_grad():
            gamma = None if self.spec.scaling else 1.0
            d = two_loop(g, self.s, self.y, gamma)
        return self._split(d)

    def snapshot(self) -> dict[str, Any]:
        """The state as a value *by reference*: :meth:`compute` never writes into the stored
        tensors (it replaces them), so the step's undo record needs no copy of the
        :math:`2m` stored vectors."""
        return dict(self.state_dict())

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Put back exactly the tensors :meth:`snapshot` referenced."""
        self.step = int(snapshot["step"])
        self.skipped = int(snapshot["skipped"])
        self.s, self.y = snapshot["s"], snapshot["y"]
        self.prev_params, self.prev_grad = snapshot["prev_params"], snapshot["prev_grad"]

    def state_dict(self) -> dict[str, Any]:
        """Step and skip counters, the pairs and the previous point (and gradient)."""
        return {
            "step": self.step,
            "skipped": self.skipped,
            "s": self.s,
            "y": self.y,
            "prev_params": self.prev_params,
            "prev_grad": self.prev_grad,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore (copies of) the saved pairs and previous point, in the parameters' dtype and
        on their device."""
        like = self._like

        def copy(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().to(like.device, like.dtype, copy=True)

        self.step = int(state["step"])
        self.skipped = int(state["skipped"])
        self.s = state["s"].detach().to(like.device, like.dtype, copy=True)
        self.y = state["y"].detach().to(like.device, like.dtype, copy=True)
        self.prev_params = copy(state["prev_params"])
        self.prev_grad = copy(state["prev_grad"])
