"""Is the step time of identical runs stable, and if not, why? (issue 15; not part of the tests.)

Runs the same Fashion-MNIST Adam training (batch 50, one thread, the same seed) in ``--runs``
fresh processes, one after another, and prints each process's median step time together with
what could explain a difference between processes:

* ``steal``: the share of the process's wall time the hypervisor gave this VM's CPUs to other
  guests (``/proc/stat`` steal ticks) — a noisy neighbour slows every step of a process evenly;
* ``other``: CPU time of other processes on this machine during the run (``/proc/stat`` busy
  ticks minus the run's own), i.e. contention inside the VM;
* ``denormal``: with ``--flush-denormal`` every run also sets ``torch.set_flush_denormal(True)``
  (denormal floats in Adam's moments are a classic cause of slow steps);
* ``rss``: the process's resident memory (allocator behaviour).

Usage::

    python benchmarks/step_stability.py [--runs 12] [--steps 3000] [--flush-denormal both]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, os, resource, statistics, sys, time
import torch
torch.set_num_threads(1)
if sys.argv[2] == "1":
    torch.set_flush_denormal(True)
from qlrlab import build_optimizer
from qlrlab.tasks import TASKS
torch.manual_seed(0)
task = TASKS.validate({"name": "fashion_mnist", "download": False}).build("cpu")
opt = build_optimizer("adam", task.model, task.loss_fn)
gen = torch.Generator().manual_seed(0)
times = []
steps = int(sys.argv[1])
while len(times) < steps:
    for batch in task.train_batches(50, gen):
        t = time.perf_counter()
        opt.step(batch)
        times.append(time.perf_counter() - t)
        if len(times) >= steps:
            break
print(json.dumps({
    "median_ms": statistics.median(times[50:]) * 1e3,
    "first_half_ms": statistics.median(times[50 : steps // 2]) * 1e3,
    "second_half_ms": statistics.median(times[steps // 2 :]) * 1e3,
    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "cpu_s": time.process_time(),
}))
"""


def _stat() -> tuple[int, int, int]:
    """(busy, steal, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as fh:
        f = [int(v) for v in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f[:8]
    return user + nice + system + irq + softirq, steal, sum(f[:8])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--flush-denormal", choices=["off", "on", "both"], default="off")
    ap.add_argument(
        "--pin", action="store_true", help="pin each process to one CPU, alternating (taskset)"
    )
    a = ap.parse_args()
    modes = {"off": ["0"], "on": ["1"], "both": ["0", "1"]}[a.flush_denormal]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    hz = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1
    rows = []
    for i in range(a.runs):
        for mode in modes:  # interleaved
            b0, s0, t0 = _stat()
            w0 = time.perf_counter()
            cpu = (i * len(modes) + modes.index(mode)) % ncpu
            pin = ["taskset", "-c", str(cpu)] if a.pin else []
            out = subprocess.run(
                [*pin, sys.executable, "-c", CHILD, str(a.steps), mode],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            wall = time.perf_counter() - w0
            b1, s1, t1 = _stat()
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["flush_denormal"] = mode == "1"
            r["cpu"] = cpu if a.pin else None
            r["steal_pct"] = 100.0 * (s1 - s0) / max(t1 - t0, 1)
            # busy CPU-seconds of everything else (the child's own CPU time taken out)
            r["other_cpu_s"] = max((b1 - b0) / hz - r["cpu_s"], 0.0)
            r["wall_s"] = wall
            rows.append(r)
            print(
                f"run {i:2d} cpu {r['cpu'] if a.pin else '-'} "
                f"denormal-flush={'on ' if r['flush_denormal'] else 'off'} "
                f"step {r['median_ms']:.3f} ms (halves {r['first_half_ms']:.3f}/"
                f"{r['second_half_ms']:.3f})  steal {r['steal_pct']:.1f}%  other CPU "
                f"{r['other_cpu_s']:.1f} s of {wall * ncpu:.0f}  rss {r['rss_mb']:.0f} MB",
                flush=True,
            )
    if a.pin:
        for cpu in range(ncpu):
            ms = [r["median_ms"] for r in rows if r["cpu"] == cpu]
            if ms:
                print(
                    f"cpu {cpu}: median {statistics.median(ms):.3f} ms, min {min(ms):.3f}, "
                    f"max {max(ms):.3f} over {len(ms)} processes"
                )
    for mode in modes:
        ms = [r["median_ms"] for r in rows if r["flush_denormal"] == (mode == "1")]
        print(
            f"flush-denormal {'on' if mode == '1' else 'off'}: median {statistics.median(ms):.3f} "
            f"ms, min {min(ms):.3f}, max {max(ms):.3f}, max/min {max(ms) / min(ms):.2f} over "
            f"{len(ms)} processes"
        )


if __name__ == "__main__":
    main()
