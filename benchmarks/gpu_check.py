"""One prepared GPU check of qlrlab (issue 17); ``benchmarks/gpu_check.sh`` runs it on the GPU
machine after installing the carried wheels. Not part of the test suite (a slow test runs it in
its CPU mode at tiny sizes: ``tests/test_cuda.py::test_gpu_check_script_cpu_tiny``).

Steps, each a subprocess with its own time limit (a step that fails or runs out of time is
recorded and the next one still runs):

1. **env**: Python, torch, CUDA, cuDNN, the GPU's name, capability and memory, the versions of
   the carried packages, the git revision.
2. **tests**: ``pytest tests -m cuda -ra`` (the device-parametrised tests of
   ``tests/test_cuda.py``: their CPU and CUDA variants).
3. **bench**: ``benchmarks/bench_step.py`` on ``--device``: the MLPs and the CNN, ResNet-18 at
   32×32 (batch 128, the paper's ImageNet stem and the CIFAR stem) and the small GPT (the PTB
   decoder at width 256, 12 layers, batch 30 × 70 tokens); AdamQLR (fast path, ``torch.func``
   jvp, curvlinops), K-FAC (inverses every step and every 10) against ``torch.optim.Adam``,
   interleaved, median of 30 steps (CUDA events on CUDA), peak memory, host syncs per step.
   One subprocess per model group, so that one failure loses one group only.
4. **ablate**: ``qlrlab ablate benchmarks/gpu_ablation_fmnist.yaml`` (Fashion-MNIST; Adam,
   AdamQLR, K-FAC; 2 seeds) and ``benchmarks/gpu_ablation_resnet.yaml`` (ResNet-18 on synthetic
   32×32 images written in the CIFAR-10 layout) through the CLI, then ``qlrlab report DIR
   --no-plots`` for each (the table; plots would not come back from the device machine).
   ``--tiny`` cuts budgets and data through ``--set`` overrides of the same specs.
5. **write**: into ``--out`` (default ``$OUT``, else ``gpu_check_out``) at most 8 files, as the
   device tool brings back: ``summary.md`` (environment, step status and times, every Markdown
   table), ``results.json`` (everything, the raw benchmark rows included) and one log per step.

Usage::

    bash benchmarks/gpu_check.sh                       # on the GPU machine (installs .whl/ first)
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gc   # the CPU proof, ~1 min
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: bench_step.py model groups: (name, models, per-group arguments)
BENCH_GROUPS: list[tuple[str, list[str]]] = [
    ("small", ["fmnist_mlp", "wide_mlp", "uci_mlp", "cnn"]),
    ("resnet18", ["resnet18"]),
    ("resnet18_cifar", ["resnet18_cifar"]),
    ("gpt_small", ["gpt_small"]),
]

#: (full, tiny) sizes; "limit" entries are each step's time limit in seconds
SIZES: dict[str, dict[str, Any]] = {
    "full": {
        "bench": ["--warmup", "5", "--steps", "30"],
        "bench_batch": {},  # bench_step's defaults: 3200 / 512 / 128 / 128 / 30 sequences
        "gpt": [],  # 12 layers x 256, 4 heads, vocabulary 10 000, 70 tokens
        "fmnist": [],
        "resnet": [],
        "synthetic": (5, 1000, 1000),  # CIFAR-layout batches, images per batch, test images
        # 360 s in all (with the two reports); in practice far less (see docs/performance.md)
        "limit": {"tests": 80, "small": 45, "resnet18": 35, "resnet18_cifar": 40,
                  "gpt_small": 45, "fmnist": 50, "resnet": 35, "report": 15},
    },
    "tiny": {
        "bench": ["--warmup", "1", "--steps", "3"],
        "bench_batch": {"small": "64", "resnet18": "4", "resnet18_cifar": "4", "gpt_small": "2"},
        # a few optimisers only: the plumbing is the same for all, and each costs ~2 s on the CPU
        "bench_optimizers": ["adamqlr (own→fast)", "adamqlr (jvp)", "kfac"],
        "gpt": ["--gpt-layers", "2", "--gpt-width", "32", "--gpt-heads", "2",
                "--gpt-vocab", "100", "--seq-len", "8"],
        "fmnist": ["--set", "base.budget.steps=4", "--set", "base.batch_size=100",
                   "--set", "base.eval.every=2", "--set", "base.checkpoint_every=2",
                   "--set", "base.task.subset=1000", "--set", "base.task.eval_subset=500"],
        "resnet": ["--set", "base.budget.steps=2", "--set", "base.batch_size=8",
                   "--set", "base.eval.every=1", "--set", "base.checkpoint_every=1",
                   "--set", "base.task.stem=imagenet"],
        "synthetic": (5, 8, 8),
        "limit": {"tests": 300, "small": 300, "resnet18": 300, "resnet18_cifar": 300,
                  "gpt_small": 300, "fmnist": 300, "resnet": 300, "report": 120},
    },
}  # fmt: skip


def environment(device: str) -> dict[str, Any]:
    """Versions and the device (step 1)."""
    from importlib import metadata

    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": device,
    }
    for pkg in ("pydantic", "backpack-for-pytorch", "curvlinops-for-pytorch", "optuna", "numpy",
                "pandas", "pyarrow", "scipy"):  # fmt: skip
        try:
            env[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            env[pkg] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(
            gpu=torch.cuda.get_device_name(0),
            capability=f"{p.major}.{p.minor}",
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            multiprocessors=p.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
        )
    try:
        env["git_revision"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["git_revision"] = None
    return env


def write_synthetic_cifar(root: Path, batches: int, per_batch: int, test: int) -> Path:
    """Gaussian-free synthetic CIFAR-10: ``root/cifar10/cifar-10-batches-py`` with 5 training
    batches (``batches`` of them non-empty) of ``per_batch`` uint8 32×32×3 images whose labels
    follow a fixed random linear teacher of the pixels (learnable), and a test batch."""
    import numpy as np

    d = root / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3072, 10)).astype(np.float32)

    def batch(n: int) -> dict[bytes, Any]:
        x = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        y = ((x.astype(np.float32) - 127.5) @ w).argmax(1)
        return {b"data": x, b"labels": [int(v) for v in y]}

    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch if i <= batches else 0)))
    (d / "test_batch").write_bytes(pickle.dumps(batch(test)))
    return root


def run_step(name: str, cmd: list[str], limit: float, log: Path, env: dict[str, str]) -> dict:
    """Run ``cmd`` with a time limit, output to ``log``; returns status, seconds, exit code."""
    t0 = time.perf_counter()
    print(f"[gpu_check] {name}: {shlex.join(cmd)}", flush=True)
    with log.open("a") as fh:
        fh.write(f"\n===== {name}: {shlex.join(cmd)}\n")
        fh.flush()
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=limit
            ).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            rc, status = None, f"timed out after {limit:.0f} s"
    secs = time.perf_counter() - t0
    with log.open("a") as fh:
        fh.write(f"===== {name}: {status} in {secs:.1f} s\n")
    print(f"[gpu_check] {name}: {status} in {secs:.1f} s", flush=True)
    return {"step": name, "status": status, "seconds": round(secs, 1), "exit": rc}


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns 0 when every step succeeded, else 1."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the CPU proof)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    ap.add_argument("--work", default=None, help="scratch folder (default: OUT/../ a temp dir)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["tests", "bench", "ablate"])
    ap.add_argument(
        "--pytest-args",
        default="tests -m cuda -ra -q -p no:cacheprovider --continue-on-collection-errors",
        help="arguments of the tests step (a shell-quoted string)",
    )
    ap.add_argument("--no-print-summary", dest="print_summary", action="store_false")
    ap.add_argument("--bench-groups", nargs="*", default=[g for g, _ in BENCH_GROUPS])
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    size = SIZES["tiny" if args.tiny else "full"]
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="qlrlab_gpu_check_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    if not env.get("QLRLAB_DATA"):
        for cand in (ROOT / ".gpu_data", ROOT.parent / "shared" / "data"):
            if (cand / "fashion_mnist").is_dir():
                env["QLRLAB_DATA"] = str(cand)
                break
    py = sys.executable

    # 1. environment
    info = environment(args.device)
    info["qlrlab_data"] = env.get("QLRLAB_DATA")
    print("[gpu_check] environment: " + json.dumps(info), flush=True)
    if args.device == "cuda" and not info["cuda_available"]:
        msg = "--device cuda but CUDA is not available (use --device cpu for the CPU proof)"
        print(f"[gpu_check] {msg}", file=sys.stderr)
        (out / "results.json").write_text(json.dumps({"env": info, "error": msg}, indent=1))
        return 2
    steps: list[dict[str, Any]] = []
    limit = size["limit"]

    # 2. the CUDA tests
    if "tests" not in args.skip:
        cmd = [py, "-m", "pytest", *shlex.split(args.pytest_args)]
        steps.append(run_step("tests", cmd, limit["tests"], out / "pytest.log", env))

    # 3. step costs
    bench_rows: list[dict[str, Any]] = []
    bench_md: list[str] = []
    bench_meta: dict[str, Any] = {}
    if "bench" not in args.skip:
        for group, models in BENCH_GROUPS:
            if group not in args.bench_groups:
                continue
            prefix = work / f"bench_{group}"
            cmd = [py, str(ROOT / "benchmarks" / "bench_step.py"), "--device", args.device,
                   "--models", *models, *size["bench"], "--out", str(prefix),
                   "--count-syncs"]  # fmt: skip
            if size.get("bench_optimizers"):
                cmd += ["--optimizers", *size["bench_optimizers"]]
            if group in size["bench_batch"]:
                cmd += ["--batch-sizes", size["bench_batch"][group]]
            if group == "gpt_small":
                cmd += size["gpt"]
            res = run_step(f"bench {group}", cmd, limit[group], out / "bench.log", env)
            steps.append(res)
            if prefix.with_suffix(".json").exists():
                data = json.loads(prefix.with_suffix(".json").read_text())
                bench_rows += data["rows"]
                bench_meta[group] = data["meta"]
                bench_md.append(f"### {group}\n\n" + prefix.with_suffix(".md").read_text())

    # 4. ablations through the CLI
    ablations: dict[str, str] = {}
    if "ablate" not in args.skip:
        # the table only (plots would not come back from the device machine anyway)
        common = ["-q", "--overwrite", "--no-report", "--set", f"base.device={args.device}"]
        fm_out = work / "ablate_fmnist"
        cmd = [py, "-m", "qlrlab", "ablate", str(ROOT / "benchmarks" / "gpu_ablation_fmnist.yaml"),
               "--out", str(fm_out), *common, *size["fmnist"]]  # fmt: skip
        steps.append(
            run_step("ablate fashion_mnist", cmd, limit["fmnist"], out / "ablate.log", env)
        )
        data_root = write_synthetic_cifar(work / "synthetic_data", *size["synthetic"])
        rn_out = work / "ablate_resnet"
        cmd = [py, "-m", "qlrlab", "ablate", str(ROOT / "benchmarks" / "gpu_ablation_resnet.yaml"),
               "--out", str(rn_out), "--set", f"base.task.data_dir={data_root}", *common,
               *size["resnet"]]  # fmt: skip
        steps.append(run_step("ablate resnet18", cmd, limit["resnet"], out / "ablate.log", env))
        for key, d in (("fashion_mnist", fm_out), ("resnet18", rn_out)):
            cmd = [py, "-m", "qlrlab", "report", str(d), "--no-plots"]
            steps.append(run_step(f"report {key}", cmd, limit["report"], out / "ablate.log", env))
            table = d / "report" / "table.md"
            summaries = sorted((d / "runs").glob("*/summary.json"))
            statuses = [json.loads(p.read_text()).get("status") for p in summaries]
            ablations[key] = (
                f"{len(summaries)} runs finished, status: {', '.join(map(str, statuses))}\n\n"
                + (table.read_text() if table.exists() else "(no report table)")
            )

    # 5. write
    total = time.perf_counter() - t_start
    ok = all(s["status"] == "ok" for s in steps)
    results = {
        "env": info,
        "args": vars(args),
        "steps": steps,
        "total_seconds": round(total, 1),
        "ok": ok,
        "bench_meta": bench_meta,
        "bench_rows": bench_rows,
        "ablations": ablations,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    md = [
        "# qlrlab GPU check" + (" (CPU proof, tiny sizes)" if args.tiny else ""),
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in info.items()],
        "",
        f"Total {total:.1f} s. Command: `{shlex.join([sys.executable, *sys.argv])}`",
        "",
        "| step | status | seconds |",
        "|---|---|---|",
        *[f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps],
        "",
    ]
    if "tests" not in args.skip:
        md += ["## Tests (last lines)", "", "```", _tail(out / "pytest.log"), "```", ""]
    if bench_md:
        md += ["## Step cost against torch.optim.Adam", "", *bench_md, ""]
    for key, text in ablations.items():
        md += [f"## Ablation: {key}", "", text, ""]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    if args.print_summary:  # the device tool returns the console's tail: put the tables there
        print((out / "summary.md").read_text(), flush=True)
    print(f"[gpu_check] {'all steps ok' if ok else 'some steps FAILED'}; total {total:.1f} s; "
          f"wrote {out}/summary.md and results.json", flush=True)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
