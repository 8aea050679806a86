"""The contract checks (see :mod:`qlrlab.testing`)."""

from __future__ import annotations

import copy
import io
import math
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qlrlab.build import build_optimizer
from qlrlab.optimizer import ComposedOptimizer
from qlrlab.registry import CURVATURES, DAMPINGS, DIRECTIONS, STEP_SIZES, Registry
from qlrlab.specs import OptimizerSpec
from qlrlab.testing import _reference
from qlrlab.testing._doubles import PoisonedDirection, PoisonedStepSize, Verdict

__all__ = ["CHECKS", "Case", "ContractResult", "check_component", "contract_cases"]

FAMILIES: dict[str, Registry[Any]] = {
    "direction": DIRECTIONS,
    "curvature": CURVATURES,
    "step_size": STEP_SIZES,
    "damping": DAMPINGS,
}

#: partner components, tried in order until the composition with the component validates
PARTNERS: list[dict[str, Any]] = [
    {
        "direction": {"name": "adam"},
        "curvature": {"name": "ggn"},
        "step_size": {"name": "quadratic"},
        "damping": {"name": "levenberg_marquardt", "initial": 1e-3},
    },
    {
        "direction": {"name": "sgd"},
        "curvature": {"name": "ggn"},
        "step_size": {"name": "fixed", "lr": 0.05},
        "damping": {"name": "constant", "value": 1e-3},
    },
]

STEPS = 3  # steps before the event a check is about, and after it


@dataclass(frozen=True)
class Case:
    """One registry entry under test."""

    family: str
    name: str

    @property
    def id(self) -> str:
        """``family:name``."""
        return f"{self.family}:{self.name}"


@dataclass
class ContractResult:
    """The outcome of the contract for one :class:`Case`.

    Attributes:
        case: the registry entry.
        failures: check name → what went wrong (empty: the component passes).
        passed: the checks that ran and passed.
        skipped: check name → why it does not apply.
    """

    case: Case
    failures: dict[str, str] = field(default_factory=dict)
    passed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether every applicable check passed."""
        return not self.failures


def contract_cases(families: Iterable[str] | None = None) -> list[Case]:
    """Every entry of the four registries (or of ``families``), in registry order."""
    fams = list(families) if families is not None else list(FAMILIES)
    return [Case(f, n) for f in fams for n in FAMILIES[f].names()]


# -- the problem and the optimisers ------------------------------------------------------------
def _problem(dtype: torch.dtype) -> tuple[nn.Module, nn.Module, list[tuple[Tensor, Tensor]]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(dtype)
    batches = [
        (torch.randn(16, 4, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g))
        for _ in range(2 * STEPS + 2)
    ]
    return model, nn.CrossEntropyLoss(), batches


def _spec(case: Case) -> OptimizerSpec:
    errors = []
    for partners in PARTNERS:
        example = getattr(FAMILIES[case.family].get(case.name), "contract_example", {})
        data = {**partners, case.family: {"name": case.name, **example}}
        try:
            return OptimizerSpec.model_validate(data)
        except ValueError as exc:
            errors.append(str(exc).splitlines()[0])
    raise AssertionError(
        f"no valid composition with default partners ({'; '.join(errors)}); a component must "
        f"build from its spec's defaults (plus its spec class's ``contract_example`` fields, for "
        f"required ones) next to adam/sgd, ggn, quadratic/fixed and levenberg_marquardt/constant"
    )


def _build(case: Case, model: nn.Module, loss_fn: nn.Module, params: Any = None) -> Any:
    return build_optimizer(_spec(case), model, loss_fn, params)


def _step(opt: ComposedOptimizer, batch: Any, i: int) -> Any:
    torch.manual_seed(1000 + i)  # components may draw from the global generator
    return opt.step(batch)


def _run(opt: ComposedOptimizer, batches: list[Any], start: int, stop: int) -> list[dict]:
    return [_step(opt, batches[i], i).as_dict() for i in range(start, stop)]


def _same(a: Any, b: Any, where: str = "") -> str | None:
    """``None`` when two state trees / info dicts are bitwise equal, else where they differ."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return f"{where}: {type(a).__name__} vs {type(b).__name__}"
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
            if a.shape == b.shape and a.dtype == b.dtype and a.is_floating_point():
                if torch.equal(a.isnan(), b.isnan()) and torch.equal(
                    a.nan_to_num(0.0), b.nan_to_num(0.0)
                ):
                    return None
            return f"{where}: tensors differ"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            r = _same(a[k], b[k], f"{where}.{k}")
            if r:
                return r
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{where}: lengths {len(a)} vs {len(b)}"
        for i, (u, v) in enumerate(zip(a, b)):
            r = _same(u, v, f"{where}[{i}]")
            if r:
                return r
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def _params(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _state(opt: ComposedOptimizer) -> dict[str, Any]:
    return opt.state_dict()["qlrlab"]


def _expect_same(a: Any, b: Any, what: str) -> None:
    diff = _same(a, b, what)
    if diff:
        raise AssertionError(diff)


# -- the checks ----------------------------------------------------------------------------------
def check_state_round_trip(case: Case) -> None:
    """``state_dict`` mid-run, through ``torch.save``/``torch.load(weights_only=True)``, into a
    fresh optimiser on a copy of the model: the two continue bit for bit."""
    model, loss_fn, batches = _problem(torch.float64)
    opt = _build(case, model, loss_fn)
    _run(opt, batches, 0, STEPS)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twin_model = copy.deepcopy(model)
    twin = _build(case, twin_model, loss_fn)
    twin.load_state_dict(saved)
    a = _run(opt, batches, STEPS, 2 * STEPS)
    b = _run(twin, batches, STEPS, 2 * STEPS)
    _expect_same(a, b, "step infos after loading")
    _expect_same(_params(model), _params(twin_model), "parameters after loading")
    _expect_same(_state(opt), _state(twin), "state after loading")


def _interrupted_equals_skipped(
    case: Case, spoil: Callable[[ComposedOptimizer, bool], None]
) -> tuple[Any, ...]:
    """Run ``STEPS`` steps, a spoilt step, ``STEPS`` more; a twin skips the spoilt step (its
    counter advanced, its damping told of a refusal when ``spoil`` is a refusal): parameters,
    state and step infos must agree bit for bit."""
    model, loss_fn, batches = _problem(torch.float64)
    twin_model = copy.deepcopy(model)
    opts = []
    for m in (model, twin_model):
        opt = _build(case, m, loss_fn)
        if case.family != "direction":
            opt.direction = PoisonedDirection(opt.direction)
        if case.family != "step_size":
            opt.step_size = PoisonedStepSize(opt.step_size)
        if case.family != "damping":
            opt.damping = Verdict()
        opts.append(opt)
    opt, twin = opts
    _run(opt, batches, 0, STEPS)
    _run(twin, batches, 0, STEPS)
    before, params = _state(opt), _params(model)
    spoil(opt, True)
    info = _step(opt, batches[STEPS], STEPS)
    spoil(opt, False)
    return opt, twin, model, twin_model, batches, before, params, info


def _continue_and_compare(
    opt: ComposedOptimizer,
    twin: ComposedOptimizer,
    model: nn.Module,
    twin_model: nn.Module,
    batches: list[Any],
    before: dict[str, Any],
    params: list[Tensor],
    info: Any,
    status: str,
) -> None:
    if info.status != status:
        raise AssertionError(f"the spoilt step reported {info.status!r}, expected {status!r}")
    _expect_same(_params(model), params, "parameters after the undone step")
    now = _state(opt)
    for family in ("direction", "curvature", "step_size"):
        _expect_same(now[family], before[family], f"{family} state after the undone step")
    twin._step += 1  # the attempted step counts
    a = _run(opt, batches, STEPS + 1, 2 * STEPS + 1)
    b = _run(twin, batches, STEPS + 1, 2 * STEPS + 1)
    _expect_same(a, b, "step infos after the undone step")
    _expect_same(_params(model), _params(twin_model), "parameters after the undone step")


def check_rejected_restore(case: Case) -> None:
    """A rejected step restores the parameters and every component exactly: the run then
    continues as if the step had not been attempted."""
    if case.family == "damping":
        raise _Skip("the damping schedule is the one that decides on rejection")

    def spoil(opt: ComposedOptimizer, on: bool) -> None:
        opt.damping.reject = on

    *run, info = _interrupted_equals_skipped(case, spoil)
    _continue_and_compare(*run, info, "rejected")


def check_refused_restore(case: Case) -> None:
    """A refused (non-finite) step leaves the parameters and every component as they were."""

    def spoil(opt: ComposedOptimizer, on: bool) -> None:
        target = opt.direction if case.family == "step_size" else opt.step_size
        target.poison = on

    opt, twin, *rest, info = _interrupted_equals_skipped(case, spoil)
    twin.damping.on_nonfinite()  # what the refusal told the schedule
    _continue_and_compare(opt, twin, *rest, info, "nonfinite_alpha")


def check_dtypes(case: Case) -> None:
    """float32 and float64: steps are finite and parameters and state keep the dtype."""
    for dtype in (torch.float32, torch.float64):
        model, loss_fn, batches = _problem(dtype)
        opt = _build(case, model, loss_fn)
        infos = _run(opt, batches, 0, STEPS)
        if not all(math.isfinite(i["loss"]) for i in infos):
            raise AssertionError(f"{dtype}: non-finite loss {[i['loss'] for i in infos]}")
        if any(p.dtype != dtype or not torch.isfinite(p).all() for p in model.parameters()):
            raise AssertionError(f"{dtype}: parameters changed dtype or became non-finite")
        for t in _tensors(_state(opt)):
            if t.is_floating_point() and t.dtype not in (dtype, torch.float32):
                raise AssertionError(f"{dtype}: state tensor of dtype {t.dtype}")


def _tensors(tree: Any) -> list[Tensor]:
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def check_param_groups(case: Case) -> None:
    """Two param groups: a group with ``lr = 0`` does not move, the other does, and the state
    round-trips with groups."""
    model, loss_fn, batches = _problem(torch.float64)
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}]
    opt = _build(case, model, loss_fn, groups)
    opt.param_groups[1]["lr"] = 0.0
    frozen = _params(model[2])
    moving = _params(model[0])
    infos = _run(opt, batches, 0, STEPS)
    _expect_same(_params(model[2]), frozen, "parameters of the lr = 0 group")
    if all(i["status"] == "ok" for i in infos) and not _same(_params(model[0]), moving):
        if all((i["update_norm"] or 0.0) > 0 for i in infos):
            raise AssertionError("the lr > 0 group did not move although updates were non-zero")
    twin_model = copy.deepcopy(model)
    twin_groups = [
        {"params": list(twin_model[0].parameters())},
        {"params": list(twin_model[2].parameters())},
    ]
    twin = _build(case, twin_model, loss_fn, twin_groups)
    twin.load_state_dict(opt.state_dict())
    _expect_same(twin.param_groups[1]["lr"], 0.0, "loaded group lr")
    _expect_same(
        _run(opt, batches, STEPS, 2 * STEPS), _run(twin, batches, STEPS, 2 * STEPS), "infos"
    )


def check_determinism(case: Case) -> None:
    """Two runs from the same seed give bitwise-identical parameters, state and step infos."""
    runs = []
    for _ in range(2):
        model, loss_fn, batches = _problem(torch.float64)
        opt = _build(case, model, loss_fn)
        runs.append((_run(opt, batches, 0, 2 * STEPS), _params(model), _state(opt)))
    _expect_same(runs[0], runs[1], "second run")


def check_curvature_reference(case: Case) -> None:
    """Curvature oracles: :math:`C` is symmetric; ``quadratic_form``, ``quadratic_forms`` and
    ``matvec`` agree; an oracle whose class declares ``reference`` (``"ggn"``, ``"hessian"`` or
    ``"empirical_fisher"``) equals the dense float64 ``torch.func`` matrix."""
    if case.family != "curvature":
        raise _Skip("not a curvature oracle")
    model, loss_fn, batches = _problem(torch.float64)
    opt = _build(case, model, loss_fn)
    _run(opt, batches, 0, 1)  # one step: state (e.g. K-FAC factors) exists
    x, y = batches[1]
    bound = _reference.bind(opt.curvature, model, loss_fn, x, y)
    dense = _reference.dense_curvature(bound, model)
    n = dense.shape[0]
    if not torch.allclose(dense, dense.T, rtol=1e-8, atol=1e-10):
        raise AssertionError("C is not symmetric")
    g = torch.Generator().manual_seed(1)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    vs, ws = _reference.unflat(model, v), _reference.unflat(model, w)
    q = float(bound.quadratic_form(vs))
    if not math.isclose(q, float(v @ dense @ v), rel_tol=1e-8, abs_tol=1e-10):
        raise AssertionError(f"quadratic_form {q} != v.matvec(v) {float(v @ dense @ v)}")
    gram = bound.quadratic_forms([vs, ws])
    ref_gram = torch.stack([v, w]) @ dense @ torch.stack([v, w]).T
    if not torch.allclose(gram.to(torch.float64), ref_gram, rtol=1e-8, atol=1e-10):
        raise AssertionError("quadratic_forms disagrees with matvec")
    kind = getattr(type(opt.curvature), "reference", None)
    if kind is None:
        return
    ref = _reference.REFERENCES[kind](model, loss_fn, x, y)
    if not torch.allclose(dense, ref, rtol=1e-7, atol=1e-9):
        err = float((dense - ref).abs().max())
        raise AssertionError(f"C differs from the dense {kind} reference (max abs error {err})")


class _Skip(Exception):
    """The check does not apply to this component."""


CHECKS: dict[str, Callable[[Case], None]] = {
    "state_round_trip": check_state_round_trip,
    "rejected_restore": check_rejected_restore,
    "refused_restore": check_refused_restore,
    "dtypes": check_dtypes,
    "param_groups": check_param_groups,
    "determinism": check_determinism,
    "curvature_reference": check_curvature_reference,
}
"""The contract's checks, by name (each takes a :class:`Case` and raises on failure)."""


def check_component(case: Case, checks: Iterable[str] | None = None) -> ContractResult:
    """Run the contract's checks (default: all of :data:`CHECKS`) on one registry entry."""
    result = ContractResult(case)
    try:
        _spec(case)
    except AssertionError as exc:
        result.failures["builds"] = str(exc)
        return result
    for name in checks if checks is not None else CHECKS:
        try:
            CHECKS[name](case)
        except _Skip as exc:
            result.skipped[name] = str(exc)
        except AssertionError as exc:
            result.failures[name] = str(exc) or "assertion failed"
        except Exception as exc:
            tb = traceback.format_exception_only(type(exc), exc)[-1].strip()
            result.failures[name] = f"raised {tb}"
        else:
            result.passed.append(name)
    return result
