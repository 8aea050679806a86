"""Multi-node ``torchrun``: two "nodes" of one process each on 127.0.0.1, joined by a c10d
rendezvous (two separate ``torchrun`` invocations, as on two machines), train one run data-parallel
and log the same losses, α, λ, ρ and test losses as one process on the whole batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]

SPEC = (
    "name: multinode\ntask: {name: uci_energy}\noptimizer: adamqlr\nbatch_size: 588\n"
    "budget: {steps: 12}\neval: {every: 4}\ndtype: float64\ndevice: cpu\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_c10d_rendezvous_match_one_process(tmp_path: Path) -> None:
    spec = tmp_path / "run.yaml"
    spec.write_text(SPEC)
    port = _free_port()
    out = tmp_path / "two"  # one output directory, as on a shared file system
    nodes = []
    for node in (0, 1):
        tmp = tmp_path / f"node{node}-tmp"  # where a non-zero rank keeps its throw-away copy
        tmp.mkdir()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "qlrlab-multinode-test",
               "-m", "qlrlab.cli", "run", str(spec), "--out", str(out), "-q", "--no-report"]  # fmt: skip
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        nodes.append((proc, tmp))
    try:
        for proc, _ in nodes:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-3000:]
    finally:
        for proc, _ in nodes:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    one = subprocess.run(
        [sys.executable, "-m", "qlrlab.cli", "run", str(spec), "--out", str(tmp_path / "one"),
         "-q", "--no-report"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    # rank 0 wrote the results; the rank-1 process ran on exactly one of the two "nodes"
    rank1 = [p for _, tmp in nodes for p in tmp.glob("qlrlab-rank1-*/runs/*/metrics.parquet")]
    assert len(rank1) == 1
    assert not [p for _, tmp in nodes for p in tmp.glob("qlrlab-rank[02-9]*")]
    (a,) = list((tmp_path / "one" / "runs").glob("*/metrics.parquet"))
    (b,) = list(out.glob("runs/*/metrics.parquet"))
    da, db, d1 = pd.read_parquet(a), pd.read_parquet(b), pd.read_parquet(rank1[0])
    assert len(da) == len(db) and da["step"].max() == 12
    for col in ("loss", "alpha", "damping", "rho", "test_loss", "val_loss"):
        pd.testing.assert_series_equal(da[col], db[col], rtol=1e-10, atol=1e-13)
        pd.testing.assert_series_equal(db[col], d1[col], rtol=0, atol=0)  # same on both nodes
