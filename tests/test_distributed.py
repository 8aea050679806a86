"""Two gloo workers with half the batch each take exactly the single-process step."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from qlrlab.distributed import (
    all_reduce_mean,
    build_distributed_optimizer,
    init_from_env,
    is_distributed,
    shard,
    shutdown,
)
from qlrlab.losses import HalfMSELoss

STEPS = 4
KEYS = ("loss", "alpha", "damping", "rho", "new_loss", "curvature", "grad_dot_direction")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _problem(kind: str) -> tuple[nn.Module, nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if kind == "ce":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
        lf: nn.Module = nn.CrossEntropyLoss()
    else:
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 1))
        x, y = torch.randn(32, 6, generator=g), torch.randn(32, 1, generator=g)
        lf = HalfMSELoss()
    return model.double(), lf, (x.double(), y.double() if y.is_floating_point() else y)


def _spec(backend: str) -> dict:
    if backend.startswith("kfac"):
        from qlrlab.presets import kfac

        mode = "exact" if backend.endswith("exact") else "factored_pi"
        spec = kfac(fisher="type-2", damping_mode=mode).model_dump()
        spec["track_rho"] = True
        if "owner" in backend:  # one worker per layer inverts and broadcasts
            spec["direction"]["inverses"] = "owner"
        return spec
    return {
        "direction": {"name": "adam"},
        "curvature": {"name": "ggn", "backend": backend},
        "step_size": {"name": "quadratic"},
        "damping": {"name": "levenberg_marquardt", "initial": 1e-3},
        "track_rho": True,
    }


def _run(opt, batch) -> list[dict]:
    return [{k: getattr(opt.step(batch), k) for k in KEYS} for _ in range(STEPS)]


CASES = [
    ("ce", "own", False),
    ("halfmse", "jvp", False),
    ("ce", "own", True),
    ("ce", "kfac", False),  # K-FAC with exact (KFLR) factors: averaged over the workers
    ("halfmse", "kfac", False),
    ("ce", "kfac_owner", False),  # layer 0's inverses from rank 0, layer 1's from rank 1
    ("halfmse", "kfac_owner_exact", False),
]


def _worker(rank: int, world: int, port: int, out) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(1)
        res = []
        for kind, backend, ddp in CASES:
            model, lf, batch = _problem(kind)
            net = nn.parallel.DistributedDataParallel(model) if ddp else model
            opt = build_distributed_optimizer(_spec(backend), net, lf)
            infos = _run(opt, shard(batch))
            params = [p.detach().tolist() for p in model.parameters()]  # plain data
            res.append((infos, params, getattr(opt.curvature, "last_path", None)))
        out.put((rank, res))
    finally:
        shutdown()


def test_two_workers_match_one_process() -> None:
    """AdamQLR (fast path, general path, DDP-wrapped model) and K-FAC (exact factors, adaptive
    α, μ, λ; inverses redundant or from one owner per layer, factored and exact damping) with
    2 gloo workers × half batch."""
    from qlrlab import build_optimizer

    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    refs = []  # single-process references while the workers start
    for kind, backend, _ in CASES:
        model, lf, batch = _problem(kind)
        opt = build_optimizer(_spec(backend), model, lf)
        refs.append((_run(opt, batch), [p.detach().clone() for p in model.parameters()]))
    results = dict(q.get() for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for ci, (ref, ref_params) in enumerate(refs):
        per_rank = []
        for rank in (0, 1):
            infos, params, path = results[rank][ci]
            expected_path = {"jvp": "jvp", "own": "fast"}.get(CASES[ci][1])
            if expected_path is not None:
                assert path == expected_path, CASES[ci]
            params = [torch.tensor(t, dtype=torch.float64) for t in params]
            for a, b in zip(infos, ref):
                for k in KEYS:
                    assert a[k] == pytest.approx(b[k], rel=1e-10, abs=1e-13), (CASES[ci], k)
            for pw, pr in zip(params, ref_params):
                torch.testing.assert_close(pw, pr, rtol=1e-10, atol=1e-12)
            per_rank.append((infos, params))
        # identical on both workers, bit for bit
        assert per_rank[0][0] == per_rank[1][0], CASES[ci]
        assert all(torch.equal(a, b) for a, b in zip(per_rank[0][1], per_rank[1][1]))


def test_single_process_helpers_are_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_from_env(device="cpu")
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert not is_distributed()
    t = torch.tensor(3.0)
    assert all_reduce_mean(t) is t
    x = torch.arange(6)
    assert torch.equal(shard(x, 1, 2), torch.tensor([3, 4, 5]))
    with pytest.raises(ValueError, match="evenly"):
        shard(torch.arange(5), 0, 2)


def test_local_share_splits_flattened_targets_consistently(monkeypatch: pytest.MonkeyPatch) -> None:
    """PTB-style batches: inputs [B, L], targets [B·L]; an odd batch is trimmed evenly."""
    from qlrlab.engine.runner import local_share
    from qlrlab.engine.specs import SpecError

    x = torch.arange(5 * 3).reshape(5, 3)
    y = x.reshape(-1) + 100
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr("qlrlab.distributed.is_distributed", lambda: True)
    xs, ys = local_share((x, y), 2)
    assert torch.equal(xs, x[2:4])  # 5 rows -> 4 kept, rank 1 gets rows 2..3
    assert torch.equal(ys, xs.reshape(-1) + 100)
    with pytest.raises(SpecError, match="batch_size"):
        local_share((x[:1], y[:3]), 2)


@pytest.mark.slow
def test_qlrlab_run_under_torchrun_matches_single_process(tmp_path) -> None:
    """`torchrun --nproc-per-node 2 -m qlrlab.cli run` (gloo, half batch each) logs the same
    losses, α, λ, ρ and test losses as one process, and only rank 0 writes results."""
    import subprocess
    import sys

    import pandas as pd

    spec = tmp_path / "run.yaml"
    spec.write_text(
        "name: trun\ntask: {name: uci_energy}\noptimizer: adamqlr\nbatch_size: 588\n"
        "budget: {steps: 12}\neval: {every: 4}\ndtype: float64\ndevice: cpu\n"
    )
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-port", str(_free_port()), "-m", "qlrlab.cli", "run", str(spec),
         "--out", str(tmp_path / "two"), "-q", "--no-report"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    one = subprocess.run(
        [sys.executable, "-m", "qlrlab.cli", "run", str(spec), "--out", str(tmp_path / "one"),
         "-q", "--no-report"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-2000:]
    (a,) = list((tmp_path / "one" / "runs").glob("*/metrics.parquet"))
    (b,) = list((tmp_path / "two" / "runs").glob("*/metrics.parquet"))
    da, db = pd.read_parquet(a), pd.read_parquet(b)
    assert len(da) == len(db) and da["step"].max() == 12
    for col in ("loss", "alpha", "damping", "rho", "test_loss", "val_loss"):
        pd.testing.assert_series_equal(da[col], db[col], rtol=1e-10, atol=1e-13)
