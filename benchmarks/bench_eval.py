"""Cost of one Fashion-MNIST evaluation (validation + test: 20,000 images through the paper's
784-50-10 MLP), on one thread, before and after keeping the prepared inputs (not part of the
test suite).

``per-batch prepare`` converts the stored ``uint8`` images to floats and standardises them at
every evaluation (the previous behaviour, recovered by ``prepared_cache_bytes = 0``); ``kept``
prepares them once and keeps them (the default). The two run **interleaved** in one process on
the same model (median of ``--repeats`` evaluations each), so background load hits both alike.

Usage::

    python benchmarks/bench_eval.py [--data-dir ../shared/data] [--repeats 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from qlrlab.tasks import TASKS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parents[1]
    ap.add_argument("--data-dir", default=str(here.parent / "shared" / "data"))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    spec = {"name": "fashion_mnist", "data_dir": a.data_dir, "download": False}
    task = TASKS.validate(spec).build("cpu")
    model = task.model

    def evaluate(kept: bool) -> float:
        saved = None if kept else task.__dict__.pop("_prepared", None)
        task.prepared_cache_bytes = type(task).prepared_cache_bytes if kept else 0
        t = time.perf_counter()
        for split in ("val", "test"):
            task.evaluate(model, split)
        elapsed = time.perf_counter() - t
        if not kept:  # put the kept inputs back
            task.__dict__.pop("_prepared", None)
            if saved is not None:
                task.__dict__["_prepared"] = saved
        return elapsed

    evaluate(True), evaluate(False)  # warm-up (and the one-off preparation of "kept")
    times: dict[bool, list[float]] = {True: [], False: []}
    for r in range(a.repeats):
        for kept in (True, False) if r % 2 else (False, True):
            times[kept].append(evaluate(kept))
    old, new = statistics.median(times[False]), statistics.median(times[True])
    print(f"threads={a.threads} repeats={a.repeats} (median of val+test evaluations)")
    print(f"per-batch prepare: {old * 1e3:.1f} ms")
    print(f"kept (default):    {new * 1e3:.1f} ms   ratio {new / old:.2f}")


if __name__ == "__main__":
    main()
