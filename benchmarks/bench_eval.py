"""Cost of one Fashion-MNIST evaluation (validation + test: 20,000 images through the paper's
784-50-10 MLP), on one thread, before and after keeping the prepared inputs, whole split against
cache-sized chunks, and against its floor, the first layer's matrix product alone (not part of the
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

    def evaluate(variant: str) -> float:
        kept = variant != "per-batch prepare"
        saved = None if kept else task.__dict__.pop("_prepared", None)
        task.prepared_cache_bytes = type(task).prepared_cache_bytes if kept else 0
        whole = variant in ("kept, whole split", "per-batch prepare")  # the latter: the old code
        task.eval_batch_size = 10_000 if whole else default_chunk
        t = time.perf_counter()
        for split in ("val", "test"):
            task.evaluate(model, split)
        elapsed = time.perf_counter() - t
        task.eval_batch_size = default_chunk
        if not kept:  # put the kept inputs back
            task.__dict__.pop("_prepared", None)
            if saved is not None:
                task.__dict__["_prepared"] = saved
        return elapsed

    first = model[0]
    inputs = [task._prepared_inputs(s) for s in ("val", "test")]

    def floor() -> float:
        """The first layer's matrix product alone (1.57 GFLOP for 20,000 images): no
        float32 evaluation of this model on this core can be faster."""
        t = time.perf_counter()
        with torch.no_grad():
            for x in inputs:
                for i in range(0, x.shape[0], default_chunk):
                    torch.mm(x[i : i + default_chunk], first.weight.T)
        return time.perf_counter() - t

    default_chunk = task.eval_batch_size
    variants = [
        "per-batch prepare",  # the behaviour before issue 15
        "kept, whole split",
        "kept, chunks (default)",
    ]
    for v in variants:  # warm-up (and the one-off preparation of the kept inputs)
        evaluate(v)
    floor()
    times: dict[str, list[float]] = {v: [] for v in [*variants, "floor"]}
    for r in range(a.repeats):
        order = [*variants, "floor"]
        for v in order if r % 2 else reversed(order):
            times[v].append(floor() if v == "floor" else evaluate(v))
    med = {v: statistics.median(t) for v, t in times.items()}
    flops = 2 * sum(int(x.shape[0]) for x in inputs) * first.in_features * first.out_features
    print(f"threads={a.threads} repeats={a.repeats} (median of val+test evaluations)")
    base = med["per-batch prepare"]
    for v in [*variants, "floor"]:
        label = "first-layer matmul only (floor)" if v == "floor" else v
        print(
            f"{label:32s} {med[v] * 1e3:7.1f} ms   ratio to per-batch prepare {med[v] / base:.2f}"
        )
    gflops = flops / med["floor"] / 1e9
    print(
        f"matmul throughput {gflops:.1f} GFLOP/s on this core; an evaluation in 15 ms would need "
        f"the first layer alone at {flops / 0.015 / 1e9:.0f} GFLOP/s; default / floor = "
        f"{med['kept, chunks (default)'] / med['floor']:.2f}"
    )


if __name__ == "__main__":
    main()
