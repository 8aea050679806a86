"""qlrlab: study the heuristics that make second-order optimisers work.

Build any combination of a direction provider, a curvature oracle, a step-size rule and a damping
schedule from a validated spec, and train with it as one ``torch.optim.Optimizer``::

    import qlrlab
    spec = qlrlab.presets.adamqlr()
    opt = qlrlab.build_optimizer(spec, model, loss_fn)
    info = opt.step((inputs, targets))
"""

# _lifeline first: an ablation worker ties its life to its coordinator before torch loads
from qlrlab import _lifeline, curvature, damping, directions, presets, step_sizes  # noqa: F401
from qlrlab.build import build_optimizer
from qlrlab.interfaces import (
    BoundCurvature,
    CurvatureOracle,
    DampingSchedule,
    DirectionProvider,
    Problem,
    Proposal,
    StepContext,
    StepSizeRule,
)
from qlrlab.losses import HalfMSELoss
from qlrlab.optimizer import ComposedOptimizer, StepInfo
from qlrlab.registry import CURVATURES, DAMPINGS, DIRECTIONS, STEP_SIZES, ComponentSpec, Registry
from qlrlab.specs import OptimizerSpec, optimizer_json_schema

__version__ = "0.1.0"

__all__ = [
    "CURVATURES",
    "DAMPINGS",
    "DIRECTIONS",
    "STEP_SIZES",
    "BoundCurvature",
    "ComponentSpec",
    "ComposedOptimizer",
    "CurvatureOracle",
    "DampingSchedule",
    "DirectionProvider",
    "HalfMSELoss",
    "OptimizerSpec",
    "Problem",
    "Proposal",
    "Registry",
    "StepContext",
    "StepInfo",
    "StepSizeRule",
    "__version__",
    "build_optimizer",
    "curvature",
    "damping",
    "directions",
    "optimizer_json_schema",
    "presets",
    "step_sizes",
]
