"""Evaluation keeps its prepared inputs (issue 15: Fashion-MNIST evaluations spent 59 of 93 ms
converting the same uint8 images to floats again): same numbers, one preparation per split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qlrlab.tasks import TASKS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def task(one_thread):
    if not (DATA / "fashion_mnist" / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("needs ../shared/data/fashion_mnist")
    spec = {"name": "fashion_mnist", "data_dir": str(DATA), "download": False, "eval_subset": 3000}
    return TASKS.validate(spec).build("cpu")


def test_kept_inputs_give_the_same_numbers_and_are_prepared_once(task, monkeypatch):
    calls: list[tuple[str, int]] = []
    real = type(task).prepare

    def counting(self, inputs, split, epoch_state=None):
        calls.append((split, int(inputs.shape[0])))
        return real(self, inputs, split, epoch_state)

    monkeypatch.setattr(type(task), "prepare", counting)
    model = task.model
    first = [task.evaluate(model, s) for s in ("val", "test")]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    second = [task.evaluate(model, s) for s in ("val", "test")]
    assert calls == [("val", 3000), ("test", 3000)]  # once per split, the whole split
    # the reference: prepared batch by batch at every evaluation, as before
    task.__dict__.pop("_prepared")
    task.prepared_cache_bytes = 0
    ref = [task.evaluate(model, s) for s in ("val", "test")]
    assert second == ref
    assert first != second  # the kept inputs go through the current model
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in ref)


def test_evaluation_builds_no_autograd_graph(task):
    model = task.model
    seen = []
    handle = model.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad))
    try:
        task.evaluate(model, "val")
    finally:
        handle.remove()
    assert seen and not any(seen)  # every chunk of the split without a graph
