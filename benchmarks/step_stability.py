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

With ``--ablation`` it instead runs what the issue ran: ``qlrlab ablate`` with 2 worker
processes over ``--runs`` seeds of that training, once with the workers pinned to CPUs of their
own (``pin_cpus: true``) and once unpinned (the default), interleaved ``--rounds`` times, and
prints every run's training time per step (``train_time / steps`` of its summary).

Usage::

    python benchmarks/step_stability.py [--runs 12] [--steps 3000] [--flush-denormal both]
    python benchmarks/step_stability.py --ablation [--runs 8] [--steps 3000] [--rounds 2]
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


ABLATION = """
name: step_stability
workers: 2
threads_per_worker: 1
pin_cpus: {pin}
base:
  task: {{name: fashion_mnist, download: false}}
  optimizer: adam
  batch_size: 50
  budget: {{steps: {steps}}}
  eval: {{at_start: false, at_end: false}}
repeats: {runs}
"""


def ablation(runs: int, steps: int, rounds: int) -> None:
    """Pinned against unpinned ablation workers (see the module docstring)."""
    import tempfile
    from pathlib import Path

    per: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for pin in (True, False):
                spec = Path(tmp) / f"{pin}-{r}.yaml"
                spec.write_text(ABLATION.format(pin=str(pin).lower(), steps=steps, runs=runs))
                out = Path(tmp) / f"out-{pin}-{r}"
                subprocess.run(
                    [sys.executable, "-m", "qlrlab", "ablate", str(spec), "--out", str(out),
                     "--quiet", "--no-report"],
                    check=True,
                    capture_output=True,
                )
                ms = []
                for f in sorted(out.glob("runs/*/summary.json")):
                    summary = json.loads(f.read_text())
                    ms.append(1e3 * summary["train_time"] / summary["steps"])
                per[pin] += ms
                print(
                    f"round {r} pin_cpus={str(pin).lower():5s} ms/step: "
                    + " ".join(f"{m:.3f}" for m in ms),
                    flush=True,
                )
    for pin, ms in per.items():
        print(
            f"pin_cpus={str(pin).lower():5s}: median {statistics.median(ms):.3f} ms, min "
            f"{min(ms):.3f}, max {max(ms):.3f}, max/min {max(ms) / min(ms):.2f} over {len(ms)} runs"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--flush-denormal", choices=["off", "on", "both"], default="off")
    ap.add_argument(
        "--pin", action="store_true", help="pin each process to one CPU, alternating (taskset)"
    )
    ap.add_argument("--ablation", action="store_true", help="pinned vs unpinned ablation workers")
    ap.add_argument("--rounds", type=int, default=2, help="with --ablation: interleaved rounds")
    a = ap.parse_args()
    if a.ablation:
        ablation(a.runs, a.steps, a.rounds)
        return
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
