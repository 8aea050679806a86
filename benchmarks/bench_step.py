"""Per-step cost of the optimiser presets against ``torch.optim.Adam`` (not part of the test suite).

For each model × batch size, every optimiser gets its own copy of the same initial model; after
``--warmup`` steps each, ``--steps`` rounds run **interleaved** (one step of each optimiser per
round, so background load hits all of them alike) and the median step time is reported together
with its ratio to ``torch.optim.Adam``'s median in the same rounds. ``mean × Adam`` divides the
means instead: the amortised cost of an optimiser whose steps differ (``kfac (inverses every
10)`` inverts its factors on one step in ten, which the median does not see); use ``--steps``
in multiples of ten for it. Its peak memory is the largest over one such period.

Data: the image models train on real Fashion-MNIST images and labels when the files are found
(``../shared/data/fashion_mnist``, ``$QLRLAB_DATA`` or the qlrlab data directory), otherwise on
Gaussian images labelled by a fixed random teacher; every round uses a new batch while the data
last (every optimiser gets the same batch in a round). Fresh, learnable batches matter for a fair
timing: memorising random labels on one repeated batch (or a handful of real ones) drives an
adaptive-step optimiser to logits of ±300 up to ±10⁶, where CPU ``exp`` (inside every
cross-entropy, the user's own loss included) takes an underflow slow path ten times slower than
usual, so the optimisers would no longer be timed on comparable numbers. The table reports each
model's largest absolute output after the run.

Models (``--models``): ``fmnist_mlp``, ``wide_mlp``, ``uci_mlp``, ``cnn`` (the default CPU grid),
``resnet18`` (the paper's ImageNet stem) and ``resnet18_cifar`` (3×3 CIFAR stem) on 32×32 images
with teacher labels, batch 128, and ``gpt_small``: the PTB decoder at reduced width
(``--gpt-layers``, ``--gpt-width``, ``--gpt-heads``, ``--gpt-vocab``; default 12 × 256, 4 heads,
vocabulary 10 000) on ``--seq-len`` (70) tokens per sequence, batch 30 sequences, tokens drawn
from a fixed random Markov chain (learnable, so no optimiser memorises noise). On CUDA the
default grid adds both ResNet-18 stems and the GPT.

Timing: on the CPU ``time.perf_counter`` around each step; on CUDA **CUDA events** recorded
around each step (the stream is synchronised before each step, so one optimiser's queued work
never overlaps another's); ``wall_median_ms`` keeps the host-side clock too.

Host synchronisations (CUDA, or ``--count-syncs``): one extra step per optimiser runs under
``torch.profiler``; ``item_calls`` counts ``aten::_local_scalar_dense`` (every ``.item()`` /
``float(tensor)``, on CPU tensors too, such as ``torch.optim.Adam``'s per-parameter step
counters, which do not synchronise with a GPU), and on CUDA ``cuda_syncs`` counts the runtime's ``cudaStreamSynchronize`` /
``cudaDeviceSynchronize`` / ``cudaEventSynchronize`` calls and ``d2h_copies`` the device-to-host
copies; a second extra step runs under ``torch.cuda.set_sync_debug_mode("warn")``, whose
warnings (``sync_warnings``, with their source lines in ``sync_sites``) name each synchronising
call.

Peak memory:

* CUDA: ``torch.cuda.max_memory_allocated`` over one step, minus what was allocated before the
  step (every optimiser's model lives on the device at once), plus the bytes this optimiser
  holds between steps (parameters, gradients and optimiser state, as on the CPU); the batch is
  handled as on the CPU.
* CPU: PyTorch has no CPU peak counter, so one step runs under ``torch.profiler`` with
  ``profile_memory=True``; the running sum of the allocator's raw allocation/free records
  (``[memory]`` events with their byte counts and timestamps) gives the
  step's peak *above* what was live before it, to which we add the bytes held between steps by
  the parameters, gradients and the optimiser state (found by walking its state). The batch
  itself is excluded (it is the same for every optimiser). Allocator caching and fragmentation
  are not included, so this is the working set torch asks for, not RSS. A second ratio adds the
  batch's bytes to both sides (on CUDA the batch is already inside the absolute figure).

Usage::

    python benchmarks/bench_step.py                  # default grid, 1 thread
    python benchmarks/bench_step.py --models fmnist_mlp --batch-sizes 3200 --steps 50
    python benchmarks/bench_step.py --out benchmarks/results/step   # writes .json and .md
    python benchmarks/bench_step.py --device cuda --models resnet18 resnet18_cifar gpt_small
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from qlrlab import build_optimizer
from qlrlab.losses import HalfMSELoss
from qlrlab.optimizer import ComposedOptimizer
from qlrlab.presets import PRESETS, get_preset


class SmallCNN(nn.Sequential):
    """The issue's small CNN: Conv(1→16,3)-ReLU-MaxPool2-Conv(16→32,3)-ReLU-MaxPool2-Linear."""

    def __init__(self, in_ch: int = 1, size: int = 28, classes: int = 10) -> None:
        s = size // 4
        super().__init__(
            nn.Conv2d(in_ch, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * s * s, classes),
        )


def _mlp(sizes: list[int]) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


def _fmnist(n: int) -> tuple[Tensor, Tensor] | None:
    """The first ``n`` Fashion-MNIST training images (standardised) and labels, from
    ``../shared/data`` or the qlrlab data directory (``None`` when the files are not there)."""
    import os
    from pathlib import Path

    from qlrlab.data.formats import read_idx
    from qlrlab.data.paths import get_data_dir

    here = Path(__file__).resolve().parent
    candidates = [here.parent.parent / "shared" / "data", get_data_dir()]
    if os.environ.get("QLRLAB_DATA"):
        candidates.insert(0, Path(os.environ["QLRLAB_DATA"]))
    for root in candidates:
        f = root / "fashion_mnist" / "train-images-idx3-ubyte.gz"
        if f.exists():
            x = torch.from_numpy(read_idx(f)[:n].astype("float32") / 255.0)
            x = ((x - 0.2860) / 0.3530).unsqueeze(1)  # the training set's mean and std
            labels = read_idx(f.with_name("train-labels-idx1-ubyte.gz"))[:n]
            return x, torch.from_numpy(labels.astype("int64"))
    return None


def _teacher_labels(x: Tensor, classes: int, g: torch.Generator) -> Tensor:
    """Labels of a fixed random linear teacher: a learnable task, so that no optimiser is
    driven to the extreme logits that memorising random labels on one batch produces."""
    w = torch.randn(x[0].numel(), classes, generator=g)
    return (x.flatten(1) @ w).argmax(1)


#: the small GPT of ``gpt_small`` (the PTB decoder at reduced width); ``main`` sets it from
#: ``--gpt-*`` and ``--seq-len``
GPT_CONFIG: dict[str, int] = {"layers": 12, "width": 256, "heads": 4, "vocab": 10000, "seq": 70}


def _markov_tokens(n: int, seq: int, vocab: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` token sequences of length ``seq + 1`` from a fixed random Markov chain (each token
    has 8 likely successors): inputs are the first ``seq`` tokens, targets the next ones."""
    succ = torch.randint(vocab, (vocab, 8), generator=g)
    tok = torch.empty(n, seq + 1, dtype=torch.int64)
    tok[:, 0] = torch.randint(vocab, (n,), generator=g)
    for t in range(seq):
        pick = torch.randint(8, (n,), generator=g)
        tok[:, t + 1] = succ[tok[:, t], pick]
    return tok[:, :-1].contiguous(), tok[:, 1:].contiguous()


def make_problem(
    name: str, batch: int, device: torch.device, pool: int = 1
) -> tuple[nn.Module, nn.Module, list[Any]]:
    """(model, loss, batches) for a benchmark model name: ``pool`` distinct batches.

    Image models use real Fashion-MNIST images when the files are available (labels from a
    fixed random teacher otherwise, with Gaussian images); the UCI MLP uses Gaussian data.
    """
    g = torch.Generator().manual_seed(0)
    n = batch * pool
    if name in ("fmnist_mlp", "wide_mlp", "cnn"):
        if name == "fmnist_mlp":
            model, loss = _mlp([784, 50, 10]), nn.CrossEntropyLoss()
        elif name == "wide_mlp":
            model, loss = _mlp([784, 256, 10]), nn.CrossEntropyLoss()
        else:
            model, loss = SmallCNN(), nn.CrossEntropyLoss()
        real = _fmnist(n) if n <= 60000 else None
        if real is not None:
            x, y = real
        else:
            x = torch.randn(n, 1, 28, 28, generator=g)
            y = _teacher_labels(x, 10, g)
    elif name == "uci_mlp":
        model, loss = _mlp([8, 50, 1]), HalfMSELoss()
        x = torch.randn(n, 8, generator=g)
        y = x @ torch.randn(8, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    elif name in ("resnet18", "resnet18_cifar"):
        from qlrlab.models import ResNet18

        stem = "cifar" if name == "resnet18_cifar" else "imagenet"
        model, loss = ResNet18(num_classes=10, stem=stem), nn.CrossEntropyLoss()
        x = torch.randn(n, 3, 32, 32, generator=g)
        y = _teacher_labels(x, 10, g)
    elif name == "gpt_small":
        from qlrlab.models import GPT

        c = GPT_CONFIG
        model = GPT(
            vocab_size=c["vocab"], n_layer=c["layers"], n_embd=c["width"], n_head=c["heads"],
            n_positions=c["seq"], flatten_output=True,
        )  # fmt: skip
        loss = nn.CrossEntropyLoss()
        x, y = _markov_tokens(n, c["seq"], c["vocab"], g)
    else:
        raise KeyError(name)
    torch.manual_seed(0)
    batches = [
        (x[i * batch : (i + 1) * batch].to(device), y[i * batch : (i + 1) * batch].to(device))
        for i in range(pool)
    ]
    if name == "gpt_small":  # targets [B, T] -> [B·T], as the flattened logits
        batches = [(bx, by.reshape(-1)) for bx, by in batches]
    return model.to(device), loss, batches


#: optimiser label -> (preset, overrides as {"component.field": value}; ``"convention"``: how the
#: step is called, ``"batch"`` (default), ``"closure"`` or ``"backward"`` (the caller's
#: forward and backward, then ``opt.step()``))
OPTIMISERS: dict[str, tuple[str, dict[str, Any]]] = {
    "adam (composed)": ("adam", {}),
    "adamqlr (own→fast)": ("adamqlr", {"curvature.backend": "own"}),
    "adamqlr step(closure)": ("adamqlr", {"convention": "closure"}),
    "adamqlr backward; step()": ("adamqlr", {"convention": "backward"}),
    "adamqlr (jvp)": ("adamqlr", {"curvature.backend": "jvp"}),
    "adamqlr (curvlinops)": ("adamqlr", {"curvature.backend": "curvlinops"}),
    "kfac": ("kfac", {}),
    "kfac (inverses every 10)": ("kfac", {"direction.inverse_period": 10}),
    "kfac (backpack)": ("kfac", {"direction.backend": "backpack"}),
    "lbfgs": ("lbfgs", {}),
    "lbfgs_qlr": ("lbfgs_qlr", {}),
    "fadam": ("fadam", {}),
    "fadam_qlr": ("fadam_qlr", {}),
    "adafisher": ("adafisher", {}),
    "adafisher_qlr": ("adafisher_qlr", {}),
}


def build_step(
    label: str, model: nn.Module, loss_fn: nn.Module
) -> tuple[Callable[[Any], Any], Any]:
    """A function doing one step on the batch it is given, and the optimiser."""
    if label == "torch.optim.Adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(batch: Any) -> Any:
            x, y = batch
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            return loss

        return step, opt
    preset, overrides = OPTIMISERS[label]
    overrides = dict(overrides)
    convention = overrides.pop("convention", "batch")
    spec = get_preset(preset)
    if overrides:
        data = spec.model_dump()
        for key, value in overrides.items():
            component, field = key.split(".")
            data[component][field] = value
        spec = type(spec).model_validate(data)
    copt = build_optimizer(spec, model, loss_fn)
    if convention == "closure":

        def step_closure(batch: Any) -> Any:
            x, y = batch

            def closure() -> Tensor:
                copt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            return copt.step(closure)

        return step_closure, copt
    if convention == "backward":

        def step_backward(batch: Any) -> Any:
            x, y = batch
            copt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            return copt.step()

        return step_backward, copt
    return copt.step, copt


def _tensor_bytes(obj: Any, seen: set[int]) -> int:
    if isinstance(obj, Tensor):
        key = obj.untyped_storage().data_ptr()
        if key in seen or obj.device.type == "meta":
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def held_bytes(model: nn.Module, opt: Any) -> int:
    """Bytes held between steps: parameters, gradients and optimiser state."""
    seen: set[int] = set()
    n = _tensor_bytes([p for p in model.parameters()], seen)
    n += _tensor_bytes([p.grad for p in model.parameters() if p.grad is not None], seen)
    if isinstance(opt, ComposedOptimizer):
        for comp in opt.components:
            n += _tensor_bytes(comp.state_dict(), seen)
    else:
        n += _tensor_bytes(list(opt.state.values()), seen)
    return n


def peak_step_bytes(
    step: Callable[[], Any], model: nn.Module, opt: Any, device: torch.device
) -> int:
    """Peak bytes during one step (see the module docstring for the method)."""
    base = held_bytes(model, opt)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return base + int(torch.cuda.max_memory_allocated()) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    # replay the allocator's raw "[memory]" records (+bytes on allocation, -bytes on free) in
    # time order; the running sum is the live-bytes change since the step began
    raw = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    raw.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in raw:
        cur += e.nbytes()
        peak = max(peak, cur)
    return base + peak


_SYNC_RUNTIME = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def host_syncs(step: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """Host synchronisations in one call of ``step`` (see the module docstring).

    Returns ``item_calls`` (``aten::_local_scalar_dense`` ops: ``.item()``, ``float(t)``), and
    on CUDA ``cuda_syncs`` (runtime synchronise calls), ``d2h_copies`` (device-to-host memory
    copies), ``sync_warnings`` (calls flagged by ``torch.cuda.set_sync_debug_mode``) and
    ``sync_sites`` (their ``file:line``, most frequent first).
    """
    import collections
    import os
    import warnings

    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=acts) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    names = collections.Counter(e.name for e in prof.events())
    out: dict[str, Any] = {"item_calls": names.get("aten::_local_scalar_dense", 0)}
    if not cuda:
        return out
    # the profiler's own closing synchronisation is not part of the step
    out["cuda_syncs"] = max(0, sum(names.get(n, 0) for n in _SYNC_RUNTIME) - 1)
    out["d2h_copies"] = sum(v for k, v in names.items() if "DtoH" in k or "Device -> Pageable" in k)
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    flagged = [w for w in caught if "synchroniz" in str(w.message)]
    sites = collections.Counter(f"{os.path.basename(w.filename)}:{w.lineno}" for w in flagged)
    out["sync_warnings"] = len(flagged)
    out["sync_sites"] = ", ".join(f"{k}×{v}" for k, v in sites.most_common())
    return out


def max_abs_output(model: nn.Module, batch: Any) -> float:
    """Largest absolute network output on ``batch`` (eval mode, no side effects kept)."""
    twin = copy.deepcopy(model).eval()
    with torch.no_grad():
        return float(twin(batch[0]).abs().max())


def bench_case(
    model_name: str,
    batch: int,
    labels: list[str],
    warmup: int,
    steps: int,
    device: torch.device,
    pool: int | None = None,
    count_syncs: bool | None = None,
) -> list[dict[str, Any]]:
    """Interleaved timing of all ``labels`` on one model × batch size.

    Round ``r`` gives every optimiser the same batch, number ``r mod pool`` of ``pool`` distinct
    batches (real data where available; by default as many as the run has steps, up to the
    60 000 training images and at most 64), so that no optimiser memorises a few batches.
    ``count_syncs`` (default: on CUDA) adds the host-synchronisation counts of
    :func:`host_syncs` to each row.
    """
    if pool is None:
        pool = min(warmup + steps, 64)
    pool = max(1, min(pool, 60000 // batch))
    model0, loss_fn, batches = make_problem(model_name, batch, device, pool)
    runs: dict[str, tuple[Callable[[Any], Any], Any, nn.Module]] = {}
    for label in labels:
        model = copy.deepcopy(model0)
        try:
            step, opt = build_step(label, model, loss_fn)
            for i in range(warmup):
                step(batches[i % pool])
        except Exception as exc:  # e.g. curvlinops cannot do train-mode BatchNorm
            print(f"  skip {label}: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        runs[label] = (step, opt, model)
    times: dict[str, list[float]] = {k: [] for k in runs}
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    wall: dict[str, list[float]] = {k: [] for k in runs}
    events: dict[str, list[tuple[Any, Any]]] = {k: [] for k in runs}
    for r in range(steps):
        b = batches[(warmup + r) % pool]
        for label, (step, _, _) in runs.items():
            sync()
            t0 = time.perf_counter()
            if cuda:  # CUDA events around the step's work on the stream
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                step(b)
                e1.record()
                events[label].append((e0, e1))
            else:
                step(b)
            sync()
            wall[label].append(time.perf_counter() - t0)
    if cuda:
        times = {k: [1e-3 * e0.elapsed_time(e1) for e0, e1 in v] for k, v in events.items()}
    else:
        times = wall
    med = {k: statistics.median(v) for k, v in times.items()}
    ref_t = med["torch.optim.Adam"]
    ref_mean = statistics.fmean(times["torch.optim.Adam"])
    b = batches[0]
    # the largest over one period of a periodic schedule (K-FAC's inverse refresh), else one step
    mem = {
        k: max(peak_step_bytes(lambda s=s: s(b), m, o, device) for _ in range(_period(o)))
        for k, (s, o, m) in runs.items()
    }
    ref_m = mem["torch.optim.Adam"]
    batch_bytes = _tensor_bytes(list(b), set())
    if count_syncs is None:
        count_syncs = cuda
    syncs = (
        {k: host_syncs(lambda s=s: s(b), device) for k, (s, _, _) in runs.items()}
        if count_syncs
        else {}
    )
    rows = []
    for label in runs:
        q1, _, q3 = statistics.quantiles(times[label], n=4)
        row = {
            "model": model_name,
            "batch": batch,
            "optimizer": label,
            "median_ms": 1e3 * med[label],
            "iqr_ms": 1e3 * (q3 - q1),
            "ratio_to_adam": med[label] / ref_t,
            "mean_ms": 1e3 * statistics.fmean(times[label]),
            "mean_ratio_to_adam": statistics.fmean(times[label]) / ref_mean,
            "peak_mb": mem[label] / 2**20,
            "mem_ratio_to_adam": mem[label] / ref_m,
            "peak_with_batch_mb": (mem[label] + batch_bytes) / 2**20,
            "mem_with_batch_ratio_to_adam": (mem[label] + batch_bytes) / (ref_m + batch_bytes),
        }
        row["timing"] = "cuda_events" if cuda else "perf_counter"
        row["wall_median_ms"] = 1e3 * statistics.median(wall[label])
        row.update(syncs.get(label, {}))
        opt = runs[label][1]
        row["max_abs_output"] = max_abs_output(runs[label][2], b)
        curv = getattr(opt, "curvature", None)
        row["ggn_path"] = getattr(curv, "last_path", None)
        rows.append(row)
    fast = med.get("adamqlr (own→fast)")
    cl = med.get("adamqlr (curvlinops)")
    for row in rows:
        row["fast_over_curvlinops"] = (fast / cl) if fast and cl else None
    return rows


def _period(opt: Any) -> int:
    """Steps after which the optimiser's work repeats (K-FAC's ``inverse_period``; else 1)."""
    spec = getattr(getattr(opt, "direction", None), "spec", None)
    return max(1, int(getattr(spec, "inverse_period", 1)))


DEFAULT_GRID: dict[str, list[int]] = {
    "fmnist_mlp": [3200],
    "wide_mlp": [3200],
    "uci_mlp": [512],
    "cnn": [128],
}


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    head = (
        "| model | batch | optimiser | median ms | IQR ms | × Adam | mean × Adam | peak MB "
        "| mem × Adam | mem × Adam incl. batch | GGN path | max abs output |"
    )
    out = [head, "|" + "---|" * 12]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['batch']} | {r['optimizer']} | {r['median_ms']:.2f} | "
            f"{r['iqr_ms']:.2f} | {r['ratio_to_adam']:.2f} | {r['mean_ratio_to_adam']:.2f} | "
            f"{r['peak_mb']:.1f} | "
            f"{r['mem_ratio_to_adam']:.2f} | {r['mem_with_batch_ratio_to_adam']:.2f} | "
            f"{r['ggn_path'] or ''} | {r['max_abs_output']:.1f} |"
        )
    fc = {(r["model"], r["batch"]): r["fast_over_curvlinops"] for r in rows}
    out.append("")
    out.append("| model | batch | fast path / curvlinops back-end (step time) |")
    out.append("|---|---|---|")
    for (m, b), v in fc.items():
        out.append(f"| {m} | {b} | {'' if v is None else f'{v:.2f}'} |")
    return "\n".join(out)


#: default batch sizes of the models outside the CPU grid (added to the grid on CUDA)
EXTRA_GRID: dict[str, list[int]] = {"resnet18": [128], "resnet18_cifar": [128], "gpt_small": [30]}


def syncs_markdown(rows: list[dict[str, Any]]) -> str:
    """Host synchronisations per step (rows measured with ``count_syncs``) as a Markdown table."""
    out = [
        "| model | batch | optimiser | .item() calls | CUDA syncs | D2H copies | "
        "sync warnings | where |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "item_calls" not in r:
            continue
        out.append(
            f"| {r['model']} | {r['batch']} | {r['optimizer']} | {r['item_calls']} | "
            f"{r.get('cuda_syncs', '')} | {r.get('d2h_copies', '')} | "
            f"{r.get('sync_warnings', '')} | {r.get('sync_sites', '')} |"
        )
    return "\n".join(out)


def main() -> None:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", nargs="*", default=None, help="subset of the default grid")
    ap.add_argument("--batch-sizes", nargs="*", type=int, default=None)
    ap.add_argument("--optimizers", nargs="*", default=None, help="labels of OPTIMISERS")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="path prefix for .json and .md output")
    ap.add_argument("--count-syncs", action="store_true", help="count host syncs (CUDA: always)")
    ap.add_argument("--gpt-layers", type=int, default=GPT_CONFIG["layers"])
    ap.add_argument("--gpt-width", type=int, default=GPT_CONFIG["width"])
    ap.add_argument("--gpt-heads", type=int, default=GPT_CONFIG["heads"])
    ap.add_argument("--gpt-vocab", type=int, default=GPT_CONFIG["vocab"])
    ap.add_argument("--seq-len", type=int, default=GPT_CONFIG["seq"], help="gpt_small tokens")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    GPT_CONFIG.update(
        layers=args.gpt_layers, width=args.gpt_width, heads=args.gpt_heads,
        vocab=args.gpt_vocab, seq=args.seq_len,
    )  # fmt: skip
    grid = dict(DEFAULT_GRID)
    if device.type == "cuda":
        grid.update(EXTRA_GRID)
    if args.models:
        grid = {m: grid.get(m, EXTRA_GRID.get(m, [128])) for m in args.models}
    labels = ["torch.optim.Adam"] + [
        k
        for k, (p, _) in OPTIMISERS.items()
        if p in PRESETS and (not args.optimizers or k in args.optimizers)
    ]
    rows: list[dict[str, Any]] = []
    for model_name, sizes in grid.items():
        for bs in args.batch_sizes or sizes:
            print(f"== {model_name} batch {bs}", flush=True)
            rows += bench_case(
                model_name, bs, labels, args.warmup, args.steps, device,
                count_syncs=True if args.count_syncs else None,
            )  # fmt: skip
    md = to_markdown(rows)
    if any("item_calls" in r for r in rows):
        md += "\n\n" + syncs_markdown(rows)
    print(md)
    meta = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": args.threads,
        "machine": platform.platform(),
        "processor": platform.processor(),
        "steps": args.steps,
        "warmup": args.warmup,
    }
    if device.type == "cuda":
        meta.update(
            cuda=torch.version.cuda,
            gpu=torch.cuda.get_device_name(device),
            timing="cuda_events",
        )
    if "gpt_small" in grid:
        meta["gpt"] = dict(GPT_CONFIG)
    if args.out:
        with open(args.out + ".json", "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
        with open(args.out + ".md", "w") as fh:
            fh.write(md + "\n")


if __name__ == "__main__":
    main()
