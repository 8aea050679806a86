r"""Data parallelism with ``torch.distributed``: every worker takes the same step.

With :math:`W` workers each holding an equal share :math:`B_w` of the global batch
:math:`B = \bigcup_w B_w`, the mean loss and every quantity of the quadratic model are averages of
the workers' local values:

.. math::
    f_B = \frac1W\sum_w f_{B_w},\qquad g = \frac1W\sum_w g_w,\qquad
    d^\top C_B d = \frac1W\sum_w d^\top C_{B_w} d .

The composed optimiser therefore needs only

* the **gradient** averaged (one flat all-reduce after the gradient pass, or DDP's own bucketed
  all-reduce when the model is wrapped in ``DistributedDataParallel``); the direction :math:`d`
  is then computed from the same :math:`g` and the same state on every worker, so :math:`g^\top d`
  and :math:`\|d\|^2` are already identical everywhere and are **not** reduced again;
* the **scalars** :math:`f(\theta)`, :math:`d^\top C d` (and Gram matrices) and
  :math:`f(\theta_{new})` averaged — :class:`~qlrlab.ComposedOptimizer` routes exactly these
  through its ``all_reduce`` hook (the kfac-jax rule of averaging the quadratic-model
  coefficients), so every worker computes the same :math:`\alpha`, :math:`\rho` and
  :math:`\lambda` and the replicas never drift apart.

Curvature factors (K-FAC): direction providers receive ``ctx.all_reduce`` in their
:class:`~qlrlab.interfaces.StepContext` and may average their fresh factor statistics with it
before the running average; inverses are then computed redundantly on every worker (cheapest
for small models: no extra communication) or, with :func:`broadcast_from_owners`, once per factor
on an owner worker and broadcast.

Caveats: the equality with a single process holds for equal per-worker batch sizes (the mean of
means); train-mode BatchNorm normalises with each worker's own batch statistics unless the model
uses ``nn.SyncBatchNorm``; Monte-Carlo curvature estimates draw different samples per worker.

Launching: ``torchrun --nproc-per-node 2 -m qlrlab run ...`` (gloo on CPU, NCCL on GPUs); the
CLI calls :func:`init_from_env` first, which is a no-op outside ``torchrun``, and
:func:`shutdown` last.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistInfo",
    "all_reduce_gradients",
    "all_reduce_mean",
    "broadcast_from_owners",
    "init_from_env",
    "is_distributed",
    "shard",
    "shutdown",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 when not distributed).
        world_size: number of processes (1 when not distributed).
        local_rank: rank on this node (selects the GPU).
        device: the device this process should use.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes logs and results)."""
        return self.rank == 0


def is_distributed() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_from_env(backend: str | None = None, device: str | None = None) -> DistInfo:
    """Initialise ``torch.distributed`` from ``torchrun``'s environment variables.

    Outside ``torchrun`` (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) nothing is initialised and a
    single-process :class:`DistInfo` is returned, so callers can use it unconditionally.

    Args:
        backend: ``"gloo"``, ``"nccl"``...; default NCCL when CUDA is available and the device
            is not ``"cpu"``, else gloo.
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available). With CUDA the process
            uses GPU ``LOCAL_RANK``.

    Returns:
        The process's :class:`DistInfo`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistInfo(0, 1, local, dev)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev)


def shutdown() -> None:
    """Leave the process group cleanly: wait for every worker, then destroy it (a no-op when
    ``torch.distributed`` is not initialised).

    Without the barrier a worker that finishes first can tear down its gloo connections while
    its peer is still closing them; the peer then aborts at exit ("terminate called without an
    active exception", exit code -6) although its results are complete.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_mean(t: Tensor, group: Any = None) -> Tensor:
    """Average ``t`` over the workers (returns a new tensor; identity when not distributed).

    Args:
        t: any tensor (typically a 0-d scalar of the quadratic model).
        group: process group (default: the world).
    """
    if not is_distributed():
        return t
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    out /= dist.get_world_size(group)
    return out


def all_reduce_gradients(grads: Sequence[Tensor], group: Any = None) -> None:
    """Average a list of gradients in place over the workers with one flat all-reduce.

    Args:
        grads: tensors of identical shapes and order on every worker.
        group: process group (default: the world).
    """
    if not is_distributed() or not grads:
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for g in grads:
        by_dtype.setdefault((g.dtype, g.device), []).append(g)
    world = dist.get_world_size(group)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= world
        offset = 0
        for t in ts:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def broadcast_from_owners(
    tensors: Sequence[Sequence[Tensor] | None],
    compute: Callable[[int], None] | None = None,
    group: Any = None,
) -> None:
    """Compute per-item results once, on an owner worker, and broadcast them in place.

    Item ``i`` (e.g. the inverses of one K-FAC factor) is owned by worker ``i % world_size``:
    ``compute(i)`` runs only there and must fill ``tensors[i]`` in place; the others receive the
    result. Without a process group ``compute`` simply runs for every item. The alternative,
    computing every item redundantly on every worker, needs no communication and is cheaper
    when the items are small.

    Args:
        tensors: per item, the (pre-allocated, same-shaped on every worker) result tensors.
        compute: fills item ``i``'s tensors (``None``: only broadcast, results already there).
        group: process group (default: the world).
    """
    world = dist.get_world_size(group) if is_distributed() else 1
    rank = dist.get_rank(group) if world > 1 else 0
    for i, ts in enumerate(tensors):
        if ts is None:
            continue
        if compute is not None and i % world == rank:
            compute(i)
        if world > 1:
            src = dist.get_global_rank(group, i % world) if group is not None else i % world
            for t in ts:
                dist.broadcast(t, src=src, group=group)


def shard(batch: Any, rank: int | None = None, world_size: int | None = None) -> Any:
    """This worker's contiguous, equal share of a global batch (tensors or tuples of them).

    Args:
        batch: a tensor, or a (nested) tuple/list of tensors with a common leading dimension,
            divisible by the world size.
        rank: defaults to this process's rank.
        world_size: defaults to the world size.
    """
    w = world_size if world_size is not None else (dist.get_world_size() if is_distributed() else 1)
    r = rank if rank is not None else (dist.get_rank() if is_distributed() else 0)
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(b, r, w) for b in batch)
    n = batch.shape[0]
    if n % w:
        raise ValueError(f"batch of {n} does not split evenly over {w} workers")
    k = n // w
    return batch[r * k : (r + 1) * k]


def __getattr__(name: str) -> Any:
    """``qlrlab.distributed.build_distributed_optimizer``: kept as an alias of
    :func:`qlrlab.build.build_distributed_optimizer` (the builder sits above the optimiser;
    this module holds only communication primitives, below the components)."""
    if name == "build_distributed_optimizer":
        from qlrlab.build import build_distributed_optimizer

        return build_distributed_optimizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
