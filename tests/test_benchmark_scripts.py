"""Smoke tests of the benchmark scripts whose figures the docs quote (not timings)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout"
)
def test_ab_commits_compares_a_commit_with_the_working_tree() -> None:
    """``benchmarks/ab_commits.sh``: one line per tree and model with two ratios, and the
    temporary worktree of the old commit removed afterwards."""
    before = subprocess.run(
        ["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    done = subprocess.run(
        ["bash", "benchmarks/ab_commits.sh", "HEAD", "1", "--models", "fmnist_mlp",
         "--batch-sizes", "64", "--warmup", "1", "--steps", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [ln.split() for ln in done.stdout.splitlines() if ln.strip()]
    assert [ln[:3] for ln in lines] == [["1", "HEAD", "fmnist_mlp"], ["1", "working-tree", "fmnist_mlp"]]
    for ln in lines:
        assert all(re.fullmatch(r"\d+\.\d\d", x) for x in ln[3:5]), ln
    after = subprocess.run(
        ["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert after == before
