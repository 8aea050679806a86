"""Cost of the overflow-safe global norm (``qlrlab._tensorlist.norm``) against the plain fused
norm it replaced, interleaved in one process (medians of 400 calls each, one thread).

The safe norm reads the fast result once (``float(out)``) and recomputes in float64 only when it
is not finite; this script checks that the read costs (almost) nothing on the step's path.

Usage::

    python benchmarks/bench_norm.py
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor

from qlrlab._tensorlist import norm


def plain_norm(xs: list[Tensor]) -> Tensor:
    """The previous fused norm (overflows in float32 above ~1.8e19 per element)."""
    if len(xs) == 1:
        return torch.linalg.vector_norm(xs[0])
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(xs)))


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sizes = {
        "Fashion-MNIST MLP (784-1000-1000-10)": [
            (784, 1000),
            (1000,),
            (1000, 1000),
            (1000,),
            (1000, 10),
            (10,),
        ],
        "UCI Energy MLP (8-50-1)": [(8, 50), (50,), (50, 1), (1,)],
    }
    for name, shapes in sizes.items():
        xs = [torch.randn(s) for s in shapes]
        times: dict[str, list[float]] = {"plain": [], "safe": []}
        for r in range(400):
            order = [("plain", plain_norm), ("safe", norm)]
            for key, f in order if r % 2 else order[::-1]:
                t = time.perf_counter()
                float(f(xs))
                times[key].append(time.perf_counter() - t)
        p, s = statistics.median(times["plain"]), statistics.median(times["safe"])
        print(f"{name}: plain {p * 1e6:.1f} us, safe {s * 1e6:.1f} us, ratio {s / p:.3f}")


if __name__ == "__main__":
    main()
