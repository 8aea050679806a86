"""The contract every component passes: built-in ones and yours.

Every entry of the four registries (:mod:`qlrlab.registry`) is composed with default partners
(``adam``/``sgd``, ``ggn``, ``quadratic``/``fixed``, ``levenberg_marquardt``/``constant``) into
a :class:`~qlrlab.optimizer.ComposedOptimizer` on a tiny MLP and checked for

* ``state_round_trip``: ``state_dict`` mid-run, saved and loaded with ``weights_only=True`` into
  a fresh optimiser, continues bit for bit;
* ``rejected_restore`` and ``refused_restore``: after a rejected step and after a refused
  (non-finite) step the parameters and every component's state are exactly as before, and the
  run continues as if the step had not been attempted;
* ``dtypes``: float32 and float64;
* ``param_groups``: a group with ``lr = 0`` stays put; state round-trips with groups;
* ``determinism``: the same seed gives the same run, bit for bit;
* ``curvature_reference`` (curvature oracles): :math:`C` is symmetric, its ``quadratic_form``,
  ``quadratic_forms`` and ``matvec`` agree, and an oracle whose class declares ``reference``
  equals the dense float64 ``torch.func`` matrix (:mod:`qlrlab.testing._reference`);
* ``distributed`` (on request): two gloo processes with half the batch each equal one process.

Use it from pytest::

    import pytest
    from qlrlab.testing import assert_contract, contract_cases

    @pytest.mark.parametrize("case", contract_cases(), ids=lambda c: c.id)
    def test_contract(case):
        assert_contract(case)

or from the command line, with your own components loaded as plugins (exit code 1 when a
component fails)::

    python -m qlrlab.testing --plugin my_heuristics.py
"""

from __future__ import annotations

from qlrlab.testing._contract import (
    CHECKS,
    Case,
    ContractResult,
    check_component,
    contract_cases,
)
from qlrlab.testing._distributed import check_distributed

__all__ = [
    "CHECKS",
    "Case",
    "ContractResult",
    "assert_contract",
    "check_component",
    "check_distributed",
    "contract_cases",
]


def assert_contract(case: Case | str, checks: list[str] | None = None) -> ContractResult:
    """Run the contract on ``case`` (a :class:`Case` or ``"family:name"``); raise
    ``AssertionError`` listing every failed check."""
    if isinstance(case, str):
        family, _, name = case.partition(":")
        case = Case(family, name)
    result = check_component(case, checks)
    if not result.ok:
        lines = [f"{case.id} breaks the component contract:"]
        lines += [f"  {check}: {why}" for check, why in result.failures.items()]
        raise AssertionError("\n".join(lines))
    return result
