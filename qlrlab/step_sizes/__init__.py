"""Step-size rules: choose :math:`\\alpha` (or a whole update) for the direction :math:`d`.

Each param group's ``lr`` multiplies the rule's :math:`\\alpha` (``fixed`` writes its ``lr`` there),
so ``torch.optim.lr_scheduler`` schedules work with every rule.
"""

from qlrlab.step_sizes.backtracking import BacktrackingSpec, BacktrackingStepSize
from qlrlab.step_sizes.fixed import FixedSpec, FixedStepSize
from qlrlab.step_sizes.hypergradient import HypergradientSpec, HypergradientStepSize
from qlrlab.step_sizes.kfac_adaptive import KFACAdaptiveSpec, KFACAdaptiveStepSize
from qlrlab.step_sizes.momentum import MomentumSpec, MomentumStepSize
from qlrlab.step_sizes.quadratic import QuadraticSpec, QuadraticStepSize

__all__ = [
    "BacktrackingSpec",
    "BacktrackingStepSize",
    "FixedSpec",
    "FixedStepSize",
    "HypergradientSpec",
    "HypergradientStepSize",
    "KFACAdaptiveSpec",
    "KFACAdaptiveStepSize",
    "MomentumSpec",
    "MomentumStepSize",
    "QuadraticSpec",
    "QuadraticStepSize",
]
