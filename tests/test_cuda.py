"""Device-parametrised tests of the CUDA paths (issue 17).

Every test here is marked ``cuda`` and runs once per device in ``DEVICES``: the CPU variant
always runs (it proves the test's logic on CPU-only CI), the CUDA variant is skipped with
"CUDA not available" where there is no GPU (``pytest -ra`` lists the count and the reason).
``benchmarks/gpu_check.py`` runs them on a GPU with ``pytest tests -m cuda``.

References are computed on the CPU in float64 (dense GGN/Hessian with ``torch.func``, the same
optimiser on the CPU); the device result is moved back to the CPU and compared.

The last test (not ``cuda``-marked, ``slow``) runs ``benchmarks/gpu_check.py`` end to end in its
CPU mode at tiny sizes.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import qlrlab
from qlrlab.curvature import GGNSpec, HessianSpec
from qlrlab.directions.kfac import KFACDirection, KFACSpec
from qlrlab.interfaces import Problem, StepContext
from qlrlab.optimizer import _floats
from qlrlab.presets import get_preset
from tests._reference import dense_ggn, dense_hessian, to_flat

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
NO_CUDA = "CUDA not available"
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA), id="cuda")
#: the devices every test runs on: the CPU always, CUDA where present
DEVICES = [pytest.param("cpu", id="cpu"), CUDA]
#: (saved on, loaded on) pairs for the state_dict round trips
PAIRS = [
    pytest.param("cpu", "cpu", id="cpu->cpu"),
    pytest.param("cuda", "cpu", marks=CUDA.marks, id="cuda->cpu"),
    pytest.param("cpu", "cuda", marks=CUDA.marks, id="cpu->cuda"),
    pytest.param("cuda", "cuda", marks=CUDA.marks, id="cuda->cuda"),
]
D64 = torch.float64


def _cpu(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().cpu() for t in ts]


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(D64)


def _cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 8),
        nn.ReLU(),
        nn.Linear(8, 3),
    ).to(D64)


def _batches(kind: str, n: int = 5, size: int = 24, dtype: torch.dtype = D64) -> list:
    g = torch.Generator().manual_seed(2)
    if kind == "mlp":
        return [
            (
                torch.randn(size, 6, generator=g, dtype=dtype),
                torch.randint(0, 4, (size,), generator=g),
            )
            for _ in range(n)
        ]
    return [
        (
            torch.randn(size, 1, 8, 8, generator=g, dtype=dtype),
            torch.randint(0, 3, (size,), generator=g),
        )
        for _ in range(n)
    ]


def _to(batch: tuple, device: str) -> tuple:
    return tuple(t.to(device) for t in batch)


# --- the composed optimiser reduces to torch.optim.Adam / SGD on the device -----------------


@pytest.mark.cuda
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("which", ["adam", "sgd_momentum"])
def test_composed_optimiser_reduces_to_torch_on_device(device: str, which: str) -> None:
    model = _mlp().to(device)
    ref = copy.deepcopy(model)
    loss_fn = nn.CrossEntropyLoss()
    if which == "adam":
        torch_opt: torch.optim.Optimizer = torch.optim.Adam(
            ref.parameters(), lr=3e-3, betas=(0.8, 0.99), eps=1e-7
        )
        spec: dict = {
            "direction": {"name": "adam", "beta1": 0.8, "beta2": 0.99, "eps": 1e-7},
            "step_size": {"name": "fixed", "lr": 3e-3},
        }
    else:
        torch_opt = torch.optim.SGD(ref.parameters(), lr=1e-2, momentum=0.9)
        spec = {
            "direction": {"name": "sgd", "momentum": 0.9},
            "step_size": {"name": "fixed", "lr": 1e-2},
        }
    opt = qlrlab.build_optimizer(spec, model, loss_fn)
    for b in _batches("mlp", n=8):
        x, y = _to(b, device)
        torch_opt.zero_grad()
        ref_loss = loss_fn(ref(x), y)
        ref_loss.backward()
        torch_opt.step()
        info = opt.step((x, y))
        assert info.status == "ok"
        assert info.loss == pytest.approx(ref_loss.item(), rel=1e-12, abs=1e-12)
    assert all(p.device.type == device for p in model.parameters())
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


# --- fast path = general path on the device --------------------------------------------------


def _adamqlr(backend: str) -> dict:
    return {
        "direction": {"name": "adam"},
        "curvature": {"name": "ggn", "backend": backend},
        "step_size": {"name": "quadratic"},
        "damping": {"name": "levenberg_marquardt"},
        "track_rho": True,
    }


@pytest.mark.cuda
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_fast_path_equals_general_path_on_device(device: str, kind: str) -> None:
    model0 = (_mlp() if kind == "mlp" else _cnn()).to(device)
    batches = [_to(b, device) for b in _batches(kind, n=4)]
    runs = {}
    for backend in ("fast", "jvp"):
        m = copy.deepcopy(model0)
        opt = qlrlab.build_optimizer(_adamqlr(backend), m, nn.CrossEntropyLoss())
        runs[backend] = (m, opt, [opt.step(b) for b in batches])
    (mf, of, inf_f), (mj, _, inf_j) = runs["fast"], runs["jvp"]
    assert of.curvature.last_path == "fast"
    for a, b in zip(inf_f, inf_j):
        assert a.status == b.status == "ok"
        for key in ("alpha", "curvature", "new_loss", "rho", "damping", "loss"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-9, abs=1e-12), key
    for pa, pb in zip(mf.parameters(), mj.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-8, atol=1e-10)
    for ba, bb in zip(mf.buffers(), mj.buffers()):
        torch.testing.assert_close(ba, bb, rtol=1e-8, atol=1e-10)


# --- GGN / Hessian on the device against float64 references computed on the CPU -------------


@pytest.mark.cuda
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("curvature", ["ggn", "ggn_jvp", "hessian"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_curvature_on_device_matches_cpu_float64_reference(
    device: str, curvature: str, kind: str
) -> None:
    model = (_mlp() if kind == "mlp" else _cnn()).eval()  # eval: BatchNorm is affine
    if kind == "cnn":  # non-trivial running statistics
        with torch.no_grad():
            model.train()(_batches(kind, n=1)[0][0])
        model.eval()
    loss_fn = nn.CrossEntropyLoss()
    x, y = _batches(kind, n=1, size=7)[0]
    ref = (dense_hessian if curvature == "hessian" else dense_ggn)(model, loss_fn, x, y)
    g = torch.Generator().manual_seed(4)
    d = [torch.randn(p.shape, generator=g, dtype=D64) for p in model.parameters()]
    fd = to_flat(d)

    dev_model = copy.deepcopy(model).to(device)
    params = list(dev_model.parameters())
    names = [n for n, _ in dev_model.named_parameters()]
    spec = {
        "ggn": GGNSpec(),
        "ggn_jvp": GGNSpec(backend="jvp"),
        "hessian": HessianSpec(),
    }[curvature]
    problem = Problem(dev_model, loss_fn, x.to(device), y.to(device), params, names)
    bound = spec.build().bind(problem)
    dd = [t.to(device) for t in d]
    q = bound.quadratic_form(dd)
    mv = bound.matvec(dd)
    assert q.device.type == device and all(t.device.type == device for t in mv)
    torch.testing.assert_close(q.cpu(), fd @ ref @ fd, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(to_flat(_cpu(mv)), ref @ fd, rtol=1e-10, atol=1e-12)


# --- K-FAC factors on the device = on the CPU ---------------------------------------------------


def _kfac_pass(device: str) -> tuple[list, list[torch.Tensor]]:
    model = _mlp().to(device)
    loss_fn = nn.CrossEntropyLoss()
    d = KFACDirection(KFACSpec(fisher="type-2", curvature_ema=0.0))
    params = list(model.parameters())
    d.setup(params, model, loss_fn)
    x, y = _to(_batches("mlp", n=1)[0], device)
    model.zero_grad()
    with d.gradient_pass(model) as twin:
        loss_fn(twin(x), y).backward()
    g = [p.grad.clone() for p in params]
    prob = Problem(model, loss_fn, x, y, params, [n for n, _ in model.named_parameters()])
    ctx = StepContext(prob, g, 1, 1e-2, None, [{"lr": 1.0}], [0] * len(params))
    direction = d.compute(g, ctx)
    factors = [[t.detach().cpu() for t in f] for f in d.factors if f is not None]
    return factors, _cpu(direction)


@pytest.mark.cuda
@pytest.mark.parametrize("device", DEVICES)
def test_kfac_factors_on_device_equal_factors_on_cpu(device: str) -> None:
    ref_factors, ref_dir = _kfac_pass("cpu")
    factors, direction = _kfac_pass(device)
    assert len(factors) == len(ref_factors) == 4  # one entry per parameter
    assert sum(len(f) == 2 for f in factors) == 2  # the weights: Kronecker pairs (A, G)
    for f, r in zip(factors, ref_factors):
        assert len(f) == len(r)
        for a, b in zip(f, r):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(direction, ref_dir):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


# --- state_dict saved on one device loads on the other ----------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("src,dst", PAIRS)
@pytest.mark.parametrize("preset", ["adamqlr", "kfac"])
def test_state_dict_saved_on_one_device_loads_on_the_other(src: str, dst: str, preset: str) -> None:
    """Train 3 steps on ``src``, save (model, optimiser) with ``torch.save``, load with
    ``map_location="cpu"`` as the engine does into a fresh model and optimiser on ``dst``, and
    continue 3 steps; the same 3 steps continued on ``src`` give the same result."""
    loss_fn = nn.CrossEntropyLoss()
    spec = get_preset(preset)
    if preset == "kfac":  # exact (type-2) factors: no Monte-Carlo draws that differ by device
        data = spec.model_dump()
        data["direction"]["fisher"] = "type-2"
        spec = type(spec).model_validate(data)
    batches = _batches("mlp", n=6)
    model = _mlp().to(src)
    opt = qlrlab.build_optimizer(spec, model, loss_fn)
    for b in batches[:3]:
        opt.step(_to(b, src))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, map_location="cpu", weights_only=True)

    twin = _mlp().to(dst)
    twin_opt = qlrlab.build_optimizer(spec, twin, loss_fn)
    twin.load_state_dict(state["model"])
    twin_opt.load_state_dict(state["optimizer"])
    infos_ref = [opt.step(_to(b, src)) for b in batches[3:]]
    infos = [twin_opt.step(_to(b, dst)) for b in batches[3:]]
    assert all(p.device.type == dst for p in twin.parameters())
    for a, b in zip(infos, infos_ref):
        assert a.status == b.status == "ok"
        if src == dst:  # same device: the same numbers
            assert a.loss == b.loss and a.alpha == b.alpha
        else:
            assert a.loss == pytest.approx(b.loss, rel=1e-9)
            assert a.alpha == pytest.approx(b.alpha, rel=1e-6)
    tol = 0.0 if src == dst else 1e-7
    for p, q in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(p.cpu(), q.cpu(), rtol=tol, atol=tol)


# --- bf16 autocast ------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "preset,backend",
    [
        ("adam", None),
        ("adamqlr", "jvp"),
        ("adamqlr", "own"),  # fixed by issue 13 (float32 curvature under autocast)
        ("kfac", None),  # fixed: factors from captured tensors cast to the parameters' dtype
    ],
)  # fmt: skip
def test_bf16_autocast_step(device: str, preset: str, backend: str | None) -> None:
    """Steps under ``torch.autocast(bfloat16)`` keep float32 parameters, stay finite and track
    the float32 run's loss and step size to bf16 accuracy."""
    torch.manual_seed(0)
    model0 = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(64, 10, generator=g).to(device),
            torch.randint(0, 4, (64,), generator=g).to(device),
        )
        for _ in range(3)
    ]
    spec = get_preset(preset)
    if backend is not None:
        data = spec.model_dump()
        data["curvature"]["backend"] = backend
        spec = type(spec).model_validate(data)
    runs = {}
    for autocast in (False, True):
        m = copy.deepcopy(model0)
        opt = qlrlab.build_optimizer(spec, m, nn.CrossEntropyLoss())
        infos = []
        for b in batches:
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                infos.append(opt.step(b))
        runs[autocast] = (m, infos)
    m, infos = runs[True]
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert all(torch.isfinite(p).all() for p in m.parameters())
    for a, b in zip(infos, runs[False][1]):
        assert a.status == "ok"
        assert a.loss == pytest.approx(b.loss, rel=2e-2)
        assert a.alpha == pytest.approx(b.alpha, rel=5e-2)
        # the loss at the new parameters is evaluated at the new parameters (autocast's cached
        # casts of the old weights are dropped after the update), so rho follows
        if b.rho is not None:
            assert a.rho == pytest.approx(b.rho, abs=0.05)


# --- the engine's device: runs and checkpoints ------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("device", DEVICES)
def test_engine_runs_and_checkpoints_on_device(tmp_path, device: str) -> None:
    from qlrlab.engine.runner import RunInterrupted, execute_run
    from qlrlab.engine.specs import RunSpec, run_hash
    from qlrlab.engine.storage import RunStore, load_checkpoint

    spec = RunSpec.model_validate(
        {
            "task": {"name": "uci_energy", "subset": 128},
            "optimizer": "adamqlr",
            "batch_size": 32,
            "budget": {"steps": 9},
            "eval": {"every": 3},
            "device": device,
            "dtype": "float64",
            "seed": 3,
            "checkpoint_every": 3,
        }
    )
    full = execute_run(spec, RunStore(tmp_path / "full"))
    assert full.status == "completed" and full.summary["steps"] == 9
    store = RunStore(tmp_path / "split")
    with pytest.raises(RunInterrupted):
        execute_run(spec, store, stop_after=4)
    ckpt = load_checkpoint(store.run_dir(run_hash(spec)) / "checkpoint.pt")
    assert ckpt is not None and ckpt["step"] == 4
    # the checkpoint is readable on a CPU-only machine: every tensor loads onto the CPU
    tensors = [v for v in ckpt["model"].values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    resumed = execute_run(spec, store)
    a = RunStore(tmp_path / "full").metrics(full.hash)
    b = store.metrics(resumed.hash)
    assert list(b["step"]) == list(range(10))
    for col in ("loss", "alpha", "damping", "val_loss", "test_loss"):
        assert a[col].tolist() == pytest.approx(b[col].tolist(), rel=1e-12, nan_ok=True), col
    rec = json.loads((RunStore(tmp_path / "full").run_dir(full.hash) / "spec.json").read_text())
    assert rec["spec"]["device"] == device


# --- _floats: one device-to-host transfer for all the scalars ----------------------------------


def _count_ops(fn, device: str) -> tuple[object, dict[str, int]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    counts: dict[str, int] = {}
    for e in prof.events():
        counts[e.name] = counts.get(e.name, 0) + 1
    return result, counts


@pytest.mark.cuda
@pytest.mark.parametrize("device", DEVICES)
def test_floats_transfers_once_on_an_accelerator(device: str) -> None:
    xs = [
        torch.tensor(1.5, device=device),
        None,
        torch.tensor(-2.25, dtype=torch.float64, device=device),
        0.5,
        torch.tensor(float("inf"), device=device),
        torch.tensor(3, device=device),
    ]
    expected = [1.5, None, -2.25, 0.5, float("inf"), 3.0]
    vals, counts = _count_ops(lambda: _floats(xs), device)
    assert vals == expected
    assert all(v is None or type(v) is float for v in vals)
    if device == "cpu":  # .item() each: cheaper than stacking on the CPU
        assert counts.get("aten::_local_scalar_dense", 0) == 4
        assert "aten::stack" not in counts
    else:  # one stack, one copy to the host, no per-scalar .item()
        assert counts.get("aten::stack", 0) == 1
        assert counts.get("aten::_local_scalar_dense", 0) == 0
        torch.cuda.synchronize()
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                assert _floats(xs) == expected
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        assert len(syncs) == 1, [str(w.message) for w in caught]


# --- the GPU check script, in its CPU mode at tiny sizes -----------------------------------------


@pytest.mark.slow
def test_gpu_check_script_cpu_tiny(tmp_path, shared_data) -> None:
    """``benchmarks/gpu_check.py --device cpu --tiny`` runs every step and writes the summary
    (the tests step runs one quick test here, so that the suite does not run twice)."""
    out = tmp_path / "out"
    env = {**os.environ, "QLRLAB_DATA": str(shared_data), "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
        "--out", str(out), "--work", str(tmp_path / "work"),
        "--pytest-args", "tests/test_cuda.py -m cuda -k floats -ra -q -p no:cacheprovider",
        "--bench-groups", "gpt_small",  # ResNet-18's CPU bench alone took ~3 min: trained below
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["ablate.log", "bench.log", "pytest.log", "results.json", "summary.md"]
    res = json.loads((out / "results.json").read_text())
    assert res["ok"] and res["env"]["device"] == "cpu"
    assert [s["step"] for s in res["steps"]] == [
        "tests", "bench gpt_small", "ablate fashion_mnist", "ablate resnet18",
        "report fashion_mnist", "report resnet18",
    ]  # fmt: skip
    assert "1 skipped" in (out / "pytest.log").read_text()  # the CUDA variant: no CUDA here
    rows = res["bench_rows"]
    for model in ("gpt_small",):
        labels = {r["optimizer"] for r in rows if r["model"] == model}
        assert {"torch.optim.Adam", "adamqlr (own→fast)", "adamqlr (jvp)"} <= labels, model
    assert all(r["timing"] == "perf_counter" and "item_calls" in r for r in rows)
    assert "6 runs finished, status: completed" in res["ablations"]["fashion_mnist"]
    assert "2 runs finished, status: completed" in res["ablations"]["resnet18"]
    summary = (out / "summary.md").read_text()
    for text in ("Step cost against torch.optim.Adam", "× Adam", "Ablation: fashion_mnist",
                 "Ablation: resnet18", ".item() calls"):  # fmt: skip
        assert text in summary, text
