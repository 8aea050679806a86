"""Step-size rules: choose :math:`\\alpha` (or a whole update) for the direction :math:`d`.

Each param group's ``lr`` multiplies the rule's :math:`\\alpha` (``fixed`` writes its ``lr`` there),
so ``torch.optim.lr_scheduler`` schedules work with every rule.
"""

from qlrlab.step_sizes.fixed import FixedSpec, FixedStepSize
from qlrlab.step_sizes.quadratic import QuadraticSpec, QuadraticStepSize

__all__ = ["FixedSpec", "FixedStepSize", "QuadraticSpec", "QuadraticStepSize"]
