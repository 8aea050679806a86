"""The contract's ``distributed`` check: two gloo processes with half the batch each take the
single-process step (one spawn for every case, since starting processes dominates)."""

from __future__ import annotations

import math
import socket
from collections.abc import Iterable
from typing import Any

import torch

from qlrlab.testing._contract import STEPS, Case, _build, _problem, _step

__all__ = ["check_distributed"]

KEYS = ("loss", "alpha", "damping", "rho", "new_loss", "status")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _runs(cases: list[Case], distributed: bool) -> list[Any]:
    from qlrlab.build import build_distributed_optimizer
    from qlrlab.distributed import shard

    out: list[Any] = []
    for case in cases:
        try:
            model, loss_fn, batches = _problem(torch.float64)
            if distributed:
                opt = build_distributed_optimizer(_build(case, model, loss_fn).spec, model, loss_fn)
                batches = [shard(b) for b in batches]
            else:
                opt = _build(case, model, loss_fn)
            infos = [_step(opt, batches[i], i).as_dict() for i in range(STEPS)]
            params = [p.tolist() for p in model.parameters()]
            out.append([[[i[k] for k in KEYS] for i in infos], params])
        except Exception as exc:
            out.append(f"raised {type(exc).__name__}: {exc}")
    return out


def _worker(rank: int, port: int, cases: list[Case], queue: Any) -> None:
    import torch.distributed as dist

    from qlrlab.distributed import shutdown
    from qlrlab.plugins import load_plugins_from_env

    torch.set_num_threads(1)
    load_plugins_from_env()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        queue.put((rank, _runs(cases, True)))
    finally:
        shutdown()


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(u, v) for u, v in zip(a, b))
    return a == b


def check_distributed(cases: Iterable[Case], timeout: float = 300.0) -> dict[Case, str | None]:
    """Run every case on two gloo workers (half the batch each) and in this process; returns
    case → ``None`` (equal to round-off) or what differs. Oracles whose class sets
    ``data_parallel_exact = False`` (Monte-Carlo samples differ per worker) are reported as
    ``None`` without comparison only if they also run without error."""
    import torch.multiprocessing as mp

    cases = list(cases)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, cases, queue)) for r in range(2)]
    for p in procs:
        p.start()
    single = _runs(cases, False)
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join(timeout)
        if p.exitcode != 0:
            raise RuntimeError(f"a gloo worker exited with code {p.exitcode}")
    report: dict[Case, str | None] = {}
    for i, case in enumerate(cases):
        ref, r0, r1 = single[i], results[0][i], results[1][i]
        for res in (ref, r0, r1):
            if isinstance(res, str):
                report[case] = res
                break
        else:
            from qlrlab.testing._contract import _spec

            spec = _spec(case)
            comps = [spec.direction, spec.curvature, spec.step_size, spec.damping]
            built = [c.build() for c in comps if c is not None]
            if not all(getattr(c, "data_parallel_exact", True) for c in built):
                report[case] = None
            elif not (_close(r0, r1) and r0 == r1):
                report[case] = "the two workers disagree"
            elif not _close(r0, ref):
                report[case] = "two workers differ from one process"
            else:
                report[case] = None
    return report
