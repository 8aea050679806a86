"""Ablation workers run on CPUs of their own (issue 15: identical runs, unequal step times)."""

from __future__ import annotations

import os
import time

import pytest

from qlrlab.engine.ablation import cpu_plan, worker_pool
from qlrlab.engine.specs import AblationSpec


def test_cpu_plan_gives_disjoint_sets_in_order() -> None:
    assert cpu_plan(2, 1, [0, 1]) == [(0,), (1,)]
    assert cpu_plan(2, 2, [3, 0, 1, 2, 5]) == [(0, 1), (2, 3)]
    assert cpu_plan(1, 3, range(8)) == [(0, 1, 2)]


@pytest.mark.parametrize(("workers", "threads", "cpus"), [(3, 1, [0, 1]), (2, 2, [0, 1, 2])])
def test_cpu_plan_does_not_pin_what_does_not_fit(workers: int, threads: int, cpus: list) -> None:
    assert cpu_plan(workers, threads, cpus) is None


def test_pin_cpus_is_off_by_default_and_can_be_switched_on() -> None:
    base = {"task": {"name": "rosenbrock"}, "optimizer": {"preset": "adam"}}
    assert AblationSpec.model_validate({"base": base}).pin_cpus is False
    assert AblationSpec.model_validate({"base": base, "pin_cpus": True}).pin_cpus is True


def _where() -> tuple[int, tuple[int, ...]]:
    time.sleep(0.3)  # keep this worker busy so that the next task goes to the other one
    return os.getpid(), tuple(sorted(os.sched_getaffinity(0)))


needs_two = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="pinning needs Linux and two CPUs",
)


@needs_two
def test_worker_pool_pins_each_worker_to_a_cpu_of_its_own() -> None:
    with worker_pool(2, 1, pin_cpus=True) as pool:
        seen = dict(f.result() for f in [pool.submit(_where) for _ in range(6)])
    assert len(seen) == 2, seen  # both workers ran tasks
    sets = list(seen.values())
    assert all(len(s) == 1 for s in sets), sets
    assert sets[0] != sets[1], sets


def test_unpinned_workers_keep_the_coordinators_cpus(monkeypatch) -> None:
    """``pin_cpus: false`` (or sets that do not fit) hands the workers no CPU set; a worker
    without one keeps the placement it inherited."""
    import qlrlab.engine.ablation as ablation

    if hasattr(os, "sched_getaffinity"):
        mine = os.sched_getaffinity(0)
        ablation._pin_from(None)
        assert os.sched_getaffinity(0) == mine
    calls = []
    monkeypatch.setattr(ablation, "cpu_plan", lambda *a: calls.append(a) or [(0,), (1,)])
    ablation.worker_pool(2, 1, pin_cpus=False).shutdown()
    assert calls == []  # not even planned
