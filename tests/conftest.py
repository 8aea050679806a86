"""Shared pytest configuration: deterministic, single-threaded-friendly defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored afterwards (engine runs set it themselves)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def shared_data() -> Path:
    """Path of ``../shared/data`` (skips the test when it is absent)."""
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data not present")
    return SHARED_DATA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``-n 2 --dist loadgroup``, as the README runs the suite) the tests
    that start Ray run one after another in one worker: two Ray instances at once would compete
    for the same two CPUs."""
    for item in items:
        path = str(item.fspath)
        if path.endswith("test_ray_cluster.py") or "ray_backend" in item.name:
            item.add_marker(pytest.mark.xdist_group("ray"))


def pytest_configure(config: pytest.Config) -> None:
    """An xdist worker runs its in-process tests on one torch thread: two workers on two cores
    with two threads each would oversubscribe the CPUs."""
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
