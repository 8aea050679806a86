"""The component contract (qlrlab.testing) over every registry entry, the command line, the
custom-heuristic example's components, and a broken component that must fail it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from qlrlab.testing import Case, assert_contract, check_component, contract_cases

ROOT = Path(__file__).resolve().parents[1]
FORGETFUL = ROOT / "tests" / "plugins" / "forgetful.py"
EXAMPLE = ROOT / "examples" / "custom_heuristic" / "my_heuristics.py"


#: registry entries with a known, recorded defect (strict xfail: fixing one fails the test
#: until it is taken off). diag_ggn's last-bit alpha after a resume was a copied model carrying a
#: copy of the optimiser's observing hook (tests/test_fastpath.py covers the fix).
KNOWN_DEFECTS: dict[str, str] = {}


def _cases() -> list:
    return [
        pytest.param(c, marks=pytest.mark.xfail(reason=KNOWN_DEFECTS[c.id], strict=True))
        if c.id in KNOWN_DEFECTS
        else c
        for c in contract_cases()
    ]


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.id)
def test_every_registered_component_passes_the_contract(case: Case) -> None:
    assert_contract(case)


def test_every_family_is_covered() -> None:
    families = {c.family for c in contract_cases()}
    assert families == {"direction", "curvature", "step_size", "damping"}
    assert len(contract_cases()) >= 20


@pytest.fixture
def forgetful():
    from qlrlab.plugins import load_plugins
    from qlrlab.registry import DIRECTIONS

    load_plugins([str(FORGETFUL)])
    yield Case("direction", "forgetful_momentum")
    DIRECTIONS.unregister("forgetful_momentum")


def test_a_component_that_forgets_its_state_fails(forgetful: Case) -> None:
    result = check_component(forgetful)
    assert not result.ok
    for check in ("state_round_trip", "rejected_restore", "refused_restore"):
        assert check in result.failures, result.failures
    with pytest.raises(AssertionError, match="forgetful_momentum breaks the component contract"):
        assert_contract(forgetful)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlrlab.testing", *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip


def test_cli_fails_on_the_broken_plugin_and_passes_the_example() -> None:
    bad = _cli("--plugin", str(FORGETFUL), "--only-plugins")
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL direction:forgetful_momentum" in bad.stdout
    good = _cli("--plugin", str(EXAMPLE), "--only-plugins")
    assert good.returncode == 0, good.stdout + good.stderr
    assert "PASS step_size:capped_quadratic" in good.stdout
    assert "PASS damping:smooth_rho" in good.stdout
    missing = _cli("--plugin", "no_such_plugin_module")
    assert missing.returncode == 2 and "no_such_plugin_module" in missing.stderr


#: K-FAC's factors are products of batch means, so averaging the workers' K-FAC quadratic forms
#: (or sampling per worker, ``fisher: mc``) is not the full batch's K-FAC; the K-FAC classes
#: (issue 14's) do not yet declare ``data_parallel_exact = False``. Listed, and checked to still
#: differ, so that the entry is removed once they do. newton_cg: CG stops at a residual
#: tolerance, and the workers' round-off (mean of two half-batch products) lands on the other
#: side of it (alpha agrees to 2e-6, not to 1e-9).
NOT_DATA_PARALLEL_EXACT = {"direction:kfac", "curvature:kfac", "direction:newton_cg"}


@pytest.mark.slow
def test_two_gloo_processes_equal_one_for_every_component() -> None:
    from qlrlab.testing import check_distributed

    report = check_distributed(contract_cases())
    failed = {c.id: why for c, why in report.items() if why is not None}
    assert set(failed) == NOT_DATA_PARALLEL_EXACT, failed
