"""Does ``torch.compile`` help the AdamQLR step's small tail? (not part of the test suite)

The fast path's step is three large matrix products plus a tail of small element-wise work:
the cross-entropy quadratic form :math:`u^\\top H_z u` and the shifted forward
:math:`f(\\theta - \\alpha d)` after the first layer. This script takes a realistic state (the
Fashion-MNIST MLP after a few AdamQLR steps, batch 3200, real images when available), and times
each tail piece eager against ``torch.compile(..., dynamic=False)`` (interleaved, medians),
printing the compile time, the speed-up, the largest difference from eager and the step time for
scale. Nothing in qlrlab is compiled by default; see ``docs/performance.md``.

Usage::

    python benchmarks/compile_probe.py [--rounds 200] [--out benchmarks/results/compile_probe]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from bench_step import make_problem
from torch import Tensor

from qlrlab import build_optimizer
from qlrlab.losses import output_quadratic_form


def _shifted_tail(
    y1: Tensor, u1: Tensor, alpha: Tensor, w2: Tensor, dw2: Tensor, b2: Tensor, db2: Tensor,
    target: Tensor,
) -> Tensor:  # fmt: skip
    """f(θ − αd) after the first layer: relu(y − αu), the head at θ − αd, cross-entropy."""
    h = torch.relu(y1 - alpha * u1)
    return F.cross_entropy(F.linear(h, w2 - alpha * dw2, b2 - alpha * db2), target)


def _time(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: 1e6 * statistics.median(v) for k, v in ts.items()}


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="path prefix for a .json file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, loss_fn, batches = make_problem("fmnist_mlp", 3200, torch.device("cpu"), 4)
    opt = build_optimizer("adamqlr", model, loss_fn)
    steps = []
    for i in range(20):
        t0 = time.perf_counter()
        opt.step(batches[i % 4])
        steps.append(time.perf_counter() - t0)
    step_us = 1e6 * statistics.median(steps[5:])

    # capture one step's tail inputs
    x, y = batches[0]
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params)
    d = [g / (g.norm() + 1e-12) for g in grads]
    with torch.no_grad():
        flat = x.flatten(1)
        y1 = F.linear(flat, params[0], params[1])
        u1 = F.linear(flat, d[0], d[1])
        z = F.linear(torch.relu(y1), params[2], params[3])
        u = F.linear(torch.relu(y1), d[2]) + F.linear(u1 * (y1 > 0), params[2], d[3])
    alpha = torch.tensor(0.05)
    cases: dict[str, tuple[Callable[..., Tensor], tuple[Any, ...]]] = {
        "ce_quadratic_form": (
            lambda z, y, u: output_quadratic_form(loss_fn, z, y, u),
            (z, y, u.t().contiguous().t()),
        ),
        "shifted_tail": (_shifted_tail, (y1, u1, alpha, params[2], d[2], params[3], d[3], y)),
    }
    rows = []
    with torch.no_grad():
        for name, (fn, inputs) in cases.items():
            t0 = time.perf_counter()
            compiled = torch.compile(fn, dynamic=False)
            out_c = compiled(*inputs)
            compile_s = time.perf_counter() - t0
            out_e = fn(*inputs)
            med = _time(
                {
                    "eager": lambda fn=fn, a=inputs: fn(*a),
                    "compiled": lambda c=compiled, a=inputs: c(*a),
                },
                args.rounds,
            )
            rows.append(
                {
                    "piece": name,
                    "compile_s": compile_s,
                    "eager_us": med["eager"],
                    "compiled_us": med["compiled"],
                    "saved_us": med["eager"] - med["compiled"],
                    "max_abs_diff": float((out_c - out_e).abs().max()),
                    "step_us": step_us,
                }
            )
    for r in rows:
        print(
            f"{r['piece']}: compile {r['compile_s']:.1f} s, eager {r['eager_us']:.0f} us, "
            f"compiled {r['compiled_us']:.0f} us (saves {r['saved_us']:.0f} us of a "
            f"{r['step_us'] / 1e3:.1f} ms step), max |diff| {r['max_abs_diff']:.2e}"
        )
    if args.out:
        with open(args.out + ".json", "w") as fh:
            json.dump(
                {"torch": torch.__version__, "threads": args.threads, "rows": rows}, fh, indent=1
            )


if __name__ == "__main__":
    main()
