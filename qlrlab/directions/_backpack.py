r"""Shared BackPACK machinery for the ``kfac`` and ``diag_ggn`` directions and the ``kfac`` oracle.

BackPACK (Dangel et al., 2020) computes Kronecker factors and GGN diagonals during the gradient
pass, but an extended module breaks ``torch.func`` (its full backward hooks are
``autograd.Function``\ s without ``setup_context``, so ``torch.func`` cannot transform them). So the
user's model is never extended. :class:`BackpackTwin` builds a **twin** instead:

* ``copy.deepcopy(model)`` with every Parameter and buffer mapped to *itself* in the memo, so the twin
  shares the user's Parameter objects (gradients land on them) and buffers (BatchNorm running
  statistics are updated exactly as by the user's model); in-place activations are made
  out-of-place on the twin only (BackPACK's hooks reject ``ReLU(inplace=True)``);
* ``backpack.extend(twin)`` for models made of ``nn.Sequential`` containers and leaf layers, or
  ``extend(twin, use_converter=True)`` (a ``torch.fx`` conversion that turns ``x + f(x)`` into
  BackPACK's ``SumModule``) for anything else — residual nets need it. Measured on torch 2.13 and
  BackPACK 1.7.1: the converter keeps the Parameter objects and module paths; functional calls in
  ``forward`` such as ``F.relu`` stay ``call_function`` nodes that BackPACK cannot see, so they
  are rejected at construction with the fix (use the ``nn`` module) instead of failing inside
  the backward pass;
* a private extended copy of the loss module. The optimiser calls the *user's* loss module; a
  temporary forward hook on it (removed when the pass ends) returns the extended copy's value
  instead, so BackPACK's loss hooks fire in the same single backward pass. ``HalfMSELoss`` is
  routed to an extended ``nn.MSELoss`` and the second-order quantities are halved (BackPACK ignores
  post-processing of the loss value).

Layers BackPACK has no second-order rule for (BatchNorm, LayerNorm, GELU, Embedding, ...) get
:class:`_GenericModuleExtension`: the transposed Jacobian of the layer applied to BackPACK's
backpropagated square-root factor by ``torch.func.vjp`` on a hook-free copy of the layer (exact,
batch-coupled layers included), and, for the ``diag_ggn`` fallback, the GGN diagonal of the layer's
own parameters :math:`\sum_{v,n}(J_{\theta,n}^\top s_{vn})^2` (per sample; for train-mode
normalisation layers, whose outputs couple the samples, per batch).
"""

from __future__ import annotations

import contextlib
import copy
import operator
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from qlrlab.losses import HalfMSELoss

__all__ = ["BackpackTwin", "LayerInfo", "make_extension"]

Fallback = Literal["diag_ggn", "adam", "identity", "error"]
ExtensionName = Literal["kfac", "kflr", "diag_ggn_exact", "diag_ggn_mc"]

#: Layers whose parameters get Kronecker factors.
KFAC_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

# functional nodes of a converted graph that do not create new tensor storage (BackPACK matches
# backpropagated quantities by ``data_ptr``, so views are transparent)
_SAFE_FUNCTIONS = {getattr, operator.getitem, torch.flatten, torch.reshape}
_SAFE_METHODS = {"view", "reshape", "flatten", "size", "dim", "contiguous"}


def make_extension(name: ExtensionName, mc_samples: int = 1) -> Any:
    """A fresh BackPACK extension instance (``KFAC``, ``KFLR``, ``DiagGGNExact``, ``DiagGGNMC``)."""
    from backpack.extensions import KFAC, KFLR, DiagGGNExact, DiagGGNMC

    if name == "kfac":
        return KFAC(mc_samples=mc_samples)
    if name == "kflr":
        return KFLR()
    if name == "diag_ggn_exact":
        return DiagGGNExact()
    return DiagGGNMC(mc_samples=mc_samples)


def _native_types(ext: Any) -> set[type[nn.Module]]:
    # BackPACK keeps its module table private; reading it avoids duplicating the table here
    table = getattr(ext, "_BackpropExtension__module_extensions", {})
    return set(table)


def _hookless(module: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` without hooks (shares parameters and buffers)."""
    clone = copy.copy(module)
    for attr in (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
    ):
        if hasattr(clone, attr):
            setattr(clone, attr, type(getattr(module, attr))())
    if isinstance(clone, nn.modules.batchnorm._NormBase) and clone.training:
        clone.track_running_stats = False  # batch statistics, no buffer writes
    return clone


def _batch_coupled(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._NormBase) and module.training


class _GenericModuleExtension:
    """BackPACK module extension for layers without a native second-order rule.

    Backpropagates the square-root factor :math:`S` (shape ``[V, N, *out]``) as
    :math:`J_x^\\top S` with ``torch.func`` and, when ``diag`` is set, stores the GGN diagonal of
    the layer's own parameters in ``store`` (keyed by ``id(parameter)``).
    """

    def __init__(self, diag: bool, store: dict[int, Tensor]) -> None:
        self.diag = diag
        self.store = store

    # BackPACK calls module extensions as ``ext_module(extension, module, g_inp, g_out)``
    def __call__(self, extension: Any, module: nn.Module, g_inp: Any, g_out: Any) -> None:
        from backpack.extensions.backprop_extension import BackpropExtension

        assert isinstance(extension, BackpropExtension)
        if hasattr(module, "input1"):
            raise NotImplementedError(
                f"kfac: layer {type(module).__name__} takes several tensor inputs; "
                "BackPACK-based curvature supports single-input layers only"
            )
        out = module.output
        bp = extension.saved_quantities.retrieve_quantity(out.data_ptr(), True)
        if bp is None:
            raise AssertionError(
                f"BackPACK quantity missing at {type(module).__name__}: an operation between "
                "layers is not an nn.Module (see qlrlab.directions._backpack)"
            )
        clone = _hookless(module)
        x = module.input0.detach()
        names = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        params = {n: p.detach() for n, p in module.named_parameters(recurse=False)}
        if self.diag and names:
            self._param_diag(clone, names, params, x, bp)
        if module.input0.requires_grad:

            def fx(xx: Tensor) -> Tensor:
                return torch.func.functional_call(clone, params, (xx,))

            _, vjp_fn = torch.func.vjp(fx, x)
            (jt,) = torch.func.vmap(vjp_fn)(bp)
            extension.saved_quantities.save_quantity(
                module.input0.data_ptr(), jt, extension.accumulate_backpropagated_quantities
            )

    def _param_diag(
        self, clone: nn.Module, names: list[str], params: dict[str, Tensor], x: Tensor, bp: Tensor
    ) -> None:
        fixed = {n: t for n, t in params.items() if n not in names}

        def fp(train: tuple[Tensor, ...], xx: Tensor) -> Tensor:
            return torch.func.functional_call(clone, {**fixed, **dict(zip(names, train))}, (xx,))

        train = tuple(params[n] for n in names)
        if _batch_coupled(clone):
            _, vjp_fn = torch.func.vjp(lambda *t: fp(t, x), *train)
            grads = torch.func.vmap(vjp_fn)(bp)  # [V, *param]
            diags = [(g**2).sum(0) for g in grads]
        else:

            def per_sample(xn: Tensor, sn: Tensor) -> tuple[Tensor, ...]:
                _, vjp_fn = torch.func.vjp(lambda *t: fp(t, xn.unsqueeze(0)), *train)
                gs = torch.func.vmap(vjp_fn)(sn.unsqueeze(1))  # over V
                return tuple((g**2).sum(0) for g in gs)

            per = torch.func.vmap(per_sample, in_dims=(0, 1))(x, bp)
            diags = [d.sum(0) for d in per]
        own = dict(module_params(clone))
        for n, dg in zip(names, diags):
            self.store[id(own[n])] = dg.detach()


def module_params(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Direct parameters of ``module`` (not of its children)."""
    return module.named_parameters(recurse=False)


@dataclass
class LayerInfo:
    """One parameter-holding leaf layer of the twin.

    Attributes:
        path: module path in the twin (the user's module path, converter-made modules aside).
        module: the twin's module.
        kind: ``"kfac"`` (Kronecker factors) or ``"fallback"``.
        weight: index of the weight in the optimiser's parameter list (``None`` if not optimised).
        bias: index of the bias (``None`` if absent or not optimised).
        others: indices of all optimised parameters of a fallback layer.
        joint: the bias is folded into the weight's input factor (kfac-jax's ``[W b]`` block).
        reason: why a fallback layer's parameters are not Kronecker-factored.
    """

    path: str
    module: nn.Module
    kind: Literal["kfac", "fallback"]
    weight: int | None = None
    bias: int | None = None
    others: list[int] = field(default_factory=list)
    joint: bool = False
    reason: str = ""


def _is_plain_sequential(model: nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            continue
        if any(True for _ in m.children()):
            return False
    return True


class BackpackTwin:
    """A BackPACK-extended twin of ``model`` sharing its Parameter objects and buffers.

    Args:
        model: the user's model (never modified).
        loss_fn: the user's loss module (only hooked for the duration of a pass).
        params: the optimised parameters.
        owner: the component name used in error messages (``"kfac"``...).
        extension: which BackPACK extension the gradient pass runs.
        mc_samples: Monte-Carlo samples for ``kfac`` / ``diag_ggn_mc``.
        fallback: what to do with parameters of layers K-FAC does not cover (``kfac`` only; the
            diagonal extensions cover every layer).
        converter: ``"auto"`` (fx converter unless the model is plain ``nn.Sequential``),
            ``"always"`` or ``"never"``.

    Raises:
        ValueError: for unsupported losses, functional operations BackPACK cannot see, or
            (``fallback="error"``) parameters in layers K-FAC does not cover — naming the layer
            type, its module path and the fix.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        params: Sequence[Tensor],
        *,
        owner: str,
        extension: ExtensionName,
        mc_samples: int = 1,
        fallback: Fallback = "diag_ggn",
        converter: Literal["auto", "always", "never"] = "auto",
        joint_bias: bool = False,
    ) -> None:
        from backpack import extend

        self.owner = owner
        self.model = model
        self.user_loss = loss_fn
        self.params = list(params)
        self.extension_name = extension
        self.mc_samples = mc_samples
        self.fallback = fallback
        self.ext_loss, self.curv_scale = self._extended_loss(loss_fn)
        memo: dict[int, Any] = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        twin = copy.deepcopy(model, memo)
        for m in twin.modules():
            if getattr(m, "inplace", False) is True:
                m.inplace = False
        use_conv = converter == "always" or (
            converter == "auto" and not _is_plain_sequential(model)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if use_conv:
                try:
                    twin = extend(twin, use_converter=True)
                except Exception as err:
                    raise ValueError(
                        f"{owner}: BackPACK's torch.fx converter could not trace "
                        f"{type(model).__name__} ({type(err).__name__}: {err}); make forward() "
                        "fx-traceable (no data-dependent control flow) or use another direction"
                    ) from err
                self._check_graph(twin)
            else:
                twin = extend(twin)
        self.twin = twin
        self.converted = use_conv
        self._conv_T: dict[int, int] = {}
        self._mean_input: dict[int, Tensor] = {}
        for m in twin.modules():
            if isinstance(m, nn.Conv2d):
                m.register_forward_hook(self._record_T)
        self.joint_bias = joint_bias
        self.layers = self._layer_table()
        if joint_bias:
            for lay in self.layers:
                if lay.kind == "kfac" and lay.weight is not None and lay.bias is not None:
                    lay.joint = True
                    lay.module.register_forward_hook(self._record_mean_input)
        self.diag_store: dict[int, Tensor] = {}
        self.ext = make_extension(extension, mc_samples)
        self._install_generic(self.ext)
        self._user_mods = dict(model.named_modules())

    # -- construction ---------------------------------------------------------------------------
    def _extended_loss(self, loss_fn: nn.Module) -> tuple[nn.Module, float]:
        from backpack import extend

        if isinstance(loss_fn, HalfMSELoss):
            return extend(nn.MSELoss(reduction=loss_fn.reduction)), 0.5
        if type(loss_fn) in (nn.MSELoss, nn.CrossEntropyLoss, nn.BCEWithLogitsLoss):
            if getattr(loss_fn, "reduction", "mean") not in ("mean", "sum"):
                raise ValueError(f"{self.owner}: the loss must use reduction 'mean' or 'sum'")
            if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.weight is not None:
                raise ValueError(
                    f"{self.owner}: BackPACK does not support class-weighted CrossEntropyLoss; "
                    "drop `weight` or use the adam/sgd directions"
                )
            return extend(copy.deepcopy(loss_fn)), 1.0
        raise ValueError(
            f"{self.owner}: BackPACK supports CrossEntropyLoss, MSELoss, BCEWithLogitsLoss (one "
            f"output) and qlrlab HalfMSELoss, not {type(loss_fn).__name__}; use another direction"
        )

    def _check_graph(self, gm: nn.Module) -> None:
        graph = getattr(gm, "graph", None)
        if graph is None:
            return
        for node in graph.nodes:
            if node.op == "call_function" and node.target not in _SAFE_FUNCTIONS:
                fname = getattr(node.target, "__name__", str(node.target))
                raise ValueError(
                    f"{self.owner}: forward() calls the function {fname!r} (graph node "
                    f"{node.name!r}); BackPACK only sees nn.Module calls, so its curvature would "
                    f"be wrong. Replace it by the equivalent module (e.g. F.relu -> nn.ReLU(), "
                    f"torch.cat/attention -> a supported layer) or use the adam/sgd directions"
                )
            if node.op == "call_method" and node.target not in _SAFE_METHODS:
                raise ValueError(
                    f"{self.owner}: forward() calls the tensor method {node.target!r} (graph node "
                    f"{node.name!r}), which BackPACK cannot see; use an nn.Module instead"
                )

    def _record_T(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        self._conv_T[id(module)] = int(output.shape[-2] * output.shape[-1])

    def _record_mean_input(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        """Mean input row (conv: mean patch) of the last call, for the joint-bias factor."""
        if not torch.is_grad_enabled():
            return
        from qlrlab.backends.kfac_hooks import _patches

        x = inputs[0].detach()
        rows = _patches(module, x) if isinstance(module, nn.Conv2d) else x  # type: ignore[arg-type]
        self._mean_input[id(module)] = rows.reshape(-1, rows.shape[-1]).mean(0)

    def _layer_table(self) -> list[LayerInfo]:
        index = {id(p): i for i, p in enumerate(self.params)}
        covered: set[int] = set()
        layers: list[LayerInfo] = []
        for path, m in self.twin.named_modules():
            own = [(n, p) for n, p in module_params(m) if id(p) in index]
            if not own:
                continue
            idx = [index[id(p)] for _, p in own]
            covered.update(idx)
            is_kfac = type(m) in KFAC_LAYERS
            if is_kfac and self.extension_name in ("kfac", "kflr"):
                names = dict(own)
                layers.append(
                    LayerInfo(
                        path,
                        m,
                        "kfac",
                        weight=index[id(names["weight"])] if "weight" in names else None,
                        bias=index[id(names["bias"])] if "bias" in names else None,
                    )
                )
                continue
            if self.extension_name in ("kfac", "kflr") and self.fallback == "error":
                raise ValueError(
                    f"{self.owner}: layer {type(m).__name__} at {path!r} has parameters that "
                    f"K-FAC does not cover (it handles nn.Linear and nn.Conv2d); "
                    f"set fallback: diag_ggn (diagonal GGN for those parameters) or identity "
                    f"(plain gradient), or exclude them from the optimised parameters"
                )
            why = f"{type(m).__name__} at {path!r} is not nn.Linear/nn.Conv2d"
            layers.append(LayerInfo(path, m, "fallback", others=idx, reason=why))
        missing = [i for i in range(len(self.params)) if i not in covered]
        if missing:
            names = {id(p): n for n, p in self.model.named_parameters()}
            bad = ", ".join(repr(names.get(id(self.params[i]), f"#{i}")) for i in missing)
            raise ValueError(
                f"{self.owner}: parameters {bad} are not held by a layer module that BackPACK can "
                f"see (e.g. a bare nn.Parameter used in forward); wrap them in a module or "
                f"optimise them with another direction"
            )
        return layers

    def _install_generic(self, ext: Any) -> None:
        native = _native_types(ext)
        is_kfac = self.extension_name in ("kfac", "kflr")
        diag = not is_kfac or self.fallback == "diag_ggn"
        generic = _GenericModuleExtension(diag=diag, store=self.diag_store)
        fallback_types = {type(lay.module) for lay in self.layers if lay.kind == "fallback"}
        for m in self.twin.modules():
            if any(True for _ in m.children()):
                continue  # containers and the converted graph module are not hooked
            t = type(m)
            norm = isinstance(m, nn.modules.batchnorm._NormBase)
            if t not in native or norm or (is_kfac and t in fallback_types):
                ext.set_module_extension(t, generic, overwrite=True)

    # -- passes ---------------------------------------------------------------------------------
    def _sync_modes(self) -> None:
        for path, m in self.twin.named_modules():
            um = self._user_mods.get(path)
            if um is not None:
                m.training = um.training

    def check_params(self) -> None:
        """Raise if the user replaced a Parameter object since the twin was built."""
        tw = {id(p) for p in self.twin.parameters()}
        if any(id(p) not in tw for p in self.params):
            raise RuntimeError(
                f"{self.owner}: a parameter of the model was replaced by a new object after the "
                "optimiser was built; rebuild the optimiser (in-place updates are fine)"
            )

    def _loss_hook(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        value = self.ext_loss(*args)
        return value * self.curv_scale if self.curv_scale != 1.0 else value

    @contextlib.contextmanager
    def gradient_pass(self) -> Iterator[nn.Module]:
        """Context for the optimiser's gradient pass: yields the twin; BackPACK runs inside."""
        from backpack import backpack

        self.check_params()
        self._sync_modes()
        self.clear()
        handle = self.user_loss.register_forward_hook(self._loss_hook)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Full backward hook.*")
                warnings.filterwarnings("ignore", message=".*seems to have been modified.*")
                with backpack(self.ext):
                    yield self.twin
        finally:
            handle.remove()

    def extra_pass(self, inputs: Any, targets: Any) -> None:
        """A separate forward/backward on the twin (gradients returned, ``.grad`` untouched)."""
        from backpack import backpack

        from qlrlab._passes import side_effect_free

        self.check_params()
        self._sync_modes()
        self.clear()
        with (
            warnings.catch_warnings(),
            torch.enable_grad(),
            side_effect_free(self.twin),
        ):
            warnings.filterwarnings("ignore", message=".*Full backward hook.*")
            warnings.filterwarnings("ignore", message=".*seems to have been modified.*")
            with backpack(self.ext):
                args = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
                out = self.twin(*args)
                loss = self._loss_hook(self.ext_loss, (out, targets), out)
                torch.autograd.grad(loss, [p for p in self.params if p.requires_grad])

    def clear(self) -> None:
        """Delete BackPACK results from the parameters (they would go stale)."""
        self.diag_store.clear()
        for p in self.params:
            if hasattr(p, self.ext.savefield):
                delattr(p, self.ext.savefield)

    def collect(self) -> dict[int, Any]:
        """Results of the last pass, by parameter index, scaled to the loss as computed.

        K-FAC layers: ``[G, A]`` for weights (conv ``A`` divided by the number of output
        locations :math:`T`, matching curvlinops' KFAC-expand input factor) and ``[G]`` for biases;
        diagonal quantities: a tensor shaped like the parameter.
        """
        field_ = self.ext.savefield
        s = self.curv_scale
        out: dict[int, Any] = {}
        for i, p in enumerate(self.params):
            val = getattr(p, field_, None)
            if val is None:
                val = self.diag_store.get(id(p))
            if val is None:
                continue
            if isinstance(val, (list, tuple)):
                val = [v.detach() for v in val]
                val[0] = val[0] * s
            else:
                val = val.detach() * s
            out[i] = val
        for lay in self.layers:
            if lay.kind == "kfac" and isinstance(lay.module, nn.Conv2d) and lay.weight in out:
                T = self._conv_T.get(id(lay.module), 1)
                out[lay.weight][1] = out[lay.weight][1] / T
            if lay.joint and lay.weight in out:
                # [[A, m], [m^T, 1]]: A is the mean of a a^T over all rows, m the mean row
                a = out[lay.weight][1]
                m = self._mean_input[id(lay.module)].to(a.dtype)
                top = torch.cat([a, m[:, None]], dim=1)
                bottom = torch.cat([m, m.new_ones(1)])[None, :]
                out[lay.weight][1] = torch.cat([top, bottom], dim=0)
                out.pop(lay.bias, None)  # type: ignore[arg-type]
        self.clear()
        return out


def fallback_indices(layers: Sequence[LayerInfo]) -> list[int]:
    """Indices of parameters handled by the fallback."""
    return [i for lay in layers if lay.kind == "fallback" for i in lay.others]
