"""Execute one run: build the task and optimiser, train within the budget, log every step.

A run logs one tidy row per step (train batch loss, α, λ, ρ, gᵀd, dᵀCd, predicted and actual
change, norms, ``time`` = training seconds excluding evaluation, ``wall_time`` including it) and
adds evaluation columns (``val_loss``, ``test_accuracy``, ...) on the rows where it evaluated. It
stops at the first limit of its budget, or when a loss goes non-finite (status ``diverged``; the
summary then holds the last finite metrics). Checkpoints (model, optimiser, data-order RNG,
counters) are written every ``checkpoint_every`` steps and on SIGTERM or Ctrl-C (SIGINT); a re-run
of an unfinished run continues from its checkpoint and reproduces the uninterrupted numbers (a
run whose metrics file is missing or damaged starts again from step 0 instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch

from qlrlab.engine.errors import SpecError
from qlrlab.engine.hashing import run_hash
from qlrlab.engine.models import RunSpec, finite
from qlrlab.engine.storage import (
    RunStore,
    atomic_write_json,
    environment_info,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    warn,
    write_parquet_atomic,
)
from qlrlab.losses import NaNPaddedLoss
from qlrlab.optimizer import StepInfo

__all__ = [
    "Reporter",
    "RunInterrupted",
    "RunResult",
    "execute_run",
    "resolve_device",
    "run_safely",
    "summarise",
]

#: ``reporter(step, train_seconds, metrics) -> stop``: called after each evaluation; returning
#: ``True`` stops the run with status ``pruned`` (used by the tuners).
Reporter = Callable[[int, float, Mapping[str, float]], bool]

#: Per-step columns: every numeric field of :class:`qlrlab.StepInfo` (derived, so a field added
#: there is logged without touching the engine).
_STEP_FIELDS = tuple(
    f.name for f in dataclasses.fields(StepInfo) if f.name not in ("status", "step")
)


class RunInterrupted(RuntimeError):
    """The run was asked to stop (SIGTERM, Ctrl-C); a checkpoint was written."""


@dataclass
class RunResult:
    """What :func:`execute_run` returns.

    Attributes:
        hash: the run's identity.
        status: ``completed``, ``diverged``, ``pruned`` or ``failed``.
        summary: the summary row written to ``summary.json``.
    """

    hash: str
    status: str
    summary: dict[str, Any]


def resolve_device(device: str) -> torch.device:
    """Map ``"auto"`` to CUDA when available, else CPU.

    Raises:
        SpecError: ``"cuda"`` requested but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SpecError(
            "device 'cuda' requested but CUDA is not available",
            field="device",
            fix="use device: auto or device: cpu",
        )
    return torch.device(device)


class _StopFlag:
    """Turns SIGTERM and Ctrl-C (SIGINT) into a flag polled by the training loop, which then
    writes a checkpoint and raises :class:`RunInterrupted` (main thread only). A second Ctrl-C
    raises ``KeyboardInterrupt`` at once. SIGINT is left alone where it is ignored (ablation
    workers, whose coordinator handles Ctrl-C)."""

    def __init__(self) -> None:
        self.raised = False
        self.signal_name = ""
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                if sig == signal.SIGINT and signal.getsignal(sig) is not signal.default_int_handler:
                    continue
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:
                    pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.raised and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.raised = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


_SigtermFlag = _StopFlag  # the former name


def _budget_steps(spec: RunSpec, task: Any, batch_size: int) -> tuple[int | None, float | None]:
    b = spec.budget
    spe = task.steps_per_epoch(batch_size)
    limits: list[int] = []
    if b.steps is not None:
        limits.append(int(b.steps))
    if b.epochs is not None:
        limits.append(max(1, math.ceil(b.epochs * spe)))
    if not limits and b.seconds is None:
        if getattr(task, "default_steps", None):
            limits.append(int(task.default_steps))
        elif getattr(task, "default_epochs", None):
            limits.append(int(task.default_epochs) * spe)
        else:
            raise SpecError(
                "no budget: the task has no default and budget.steps/epochs/seconds are unset",
                field="budget",
                fix="set budget.steps, budget.epochs or budget.seconds",
            )
    return (min(limits) if limits else None), b.seconds


def _evaluate(task: Any, model: torch.nn.Module, splits: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for split in splits:
        try:
            res = task.evaluate(model, split)
        except (NotImplementedError, KeyError):
            continue
        for k, v in res.items():
            out[f"{split}_{k}"] = float(v)
    return out


def _info_dict(info: Any) -> dict[str, Any]:
    if hasattr(info, "as_dict"):
        d = dict(info.as_dict())
    elif isinstance(info, Mapping):
        d = dict(info)
    else:
        d = {"loss": float(info)}
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        out[k] = v
    return out


def execute_run(
    spec: RunSpec,
    store: RunStore,
    *,
    labels: Mapping[str, Any] | None = None,
    reporter: Reporter | None = None,
    progress: bool = False,
    position: int = 0,
    resume: bool = True,
    stop_after: int | None = None,
) -> RunResult:
    """Train one run and store its spec, metrics, summary and checkpoints under ``store``.

    Args:
        spec: the resolved run.
        store: the output directory's store; the run goes to ``runs/<hash>``.
        labels: labels recorded with the run (variant, seed...).
        reporter: called after every evaluation; returning ``True`` prunes the run.
        progress: show a tqdm bar for this run.
        position: tqdm line.
        resume: continue from a checkpoint when one exists.
        stop_after: testing hook: raise :class:`RunInterrupted` after this many steps (after
            writing a checkpoint).

    Returns:
        The :class:`RunResult`.

    Raises:
        RunInterrupted: on SIGTERM (after checkpointing) or ``stop_after``.
        Exception: anything the task or optimiser raises (see :func:`run_safely`).
    """
    import qlrlab

    h = run_hash(spec)
    rdir = store.run_dir(h)
    rdir.mkdir(parents=True, exist_ok=True)
    ckpt_path = rdir / "checkpoint.pt"
    metrics_path = rdir / "metrics.parquet"
    summary_path = rdir / "summary.json"
    with contextlib.suppress(FileNotFoundError):
        summary_path.unlink()
    env = environment_info()
    atomic_write_json(
        rdir / "spec.json",
        {
            "hash": h,
            "spec": spec.model_dump(mode="json"),
            "seed": spec.seed,
            "labels": dict(labels or {}),
            "threads": torch.get_num_threads(),
            **env,
        },
    )

    device = resolve_device(spec.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[spec.dtype]
    torch.manual_seed(spec.seed)
    task = spec.task_spec().build(device, dtype)
    model, loss_fn = task.model, task.loss_fn
    world = _world_size()
    batch_size = spec.batch_size or int(task.default_batch_size)
    if spec.nan_padding:  # the optimiser sees the original's padded-batch curvature
        if world > 1:
            raise SpecError(
                "the NaN-padding emulation runs in one process only",
                field="nan_padding",
                fix="run without torchrun, or set nan_padding: false",
            )
        loss_fn = NaNPaddedLoss(loss_fn, batch_size)
    if world > 1:
        from qlrlab.distributed import build_distributed_optimizer

        optimizer = build_distributed_optimizer(spec.optimizer_spec(), model, loss_fn)
    else:
        optimizer = qlrlab.build_optimizer(spec.optimizer_spec(), model, loss_fn)
    steps_per_epoch = task.steps_per_epoch(batch_size)
    max_steps, max_seconds = _budget_steps(spec, task, batch_size)

    gen = torch.Generator().manual_seed(spec.seed)
    step, epoch, batch_in_epoch = 0, 0, 0
    train_time, wall_offset = 0.0, 0.0
    # one-off warm-up: the first optimiser step of each process (allocation, kernel selection:
    # 0.3-0.5 s against 1 ms later); logged so that reports can leave it out of time axes
    warmup_time, first_in_process = 0.0, True
    epoch_state = gen.get_state()
    rows: list[dict[str, Any]] = []
    ckpt = load_checkpoint(ckpt_path) if resume else None
    if ckpt is not None and ckpt.get("hash") != h:
        ckpt = None
    if ckpt is not None:
        old = read_metrics(metrics_path)
        if old is not None:
            rows = old[old["step"] <= int(ckpt["step"])].to_dict("records")
        else:  # the rows up to the checkpoint are lost: start again, which reproduces them
            warn(
                f"{metrics_path} is missing or unreadable next to the checkpoint of step "
                f"{int(ckpt['step'])}; restarting run {h} from step 0"
            )
            ckpt = None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, batch_in_epoch = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch"])
        train_time, wall_offset = float(ckpt["train_time"]), float(ckpt["wall_time"])
        warmup_time = float(ckpt.get("warmup_time", 0.0))
        epoch_state = ckpt["epoch_rng"]
        gen.set_state(epoch_state)
        torch.set_rng_state(ckpt["torch_rng"])
    else:
        with contextlib.suppress(FileNotFoundError):
            ckpt_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            metrics_path.unlink()

    tb = _tensorboard_writer(rdir) if spec.tensorboard else None
    tb_last: tuple[int, set[str]] = (-1, set())
    ev = spec.eval
    wall_start = time.perf_counter() - wall_offset
    status, stop_reason = "running", None
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def now_wall() -> float:
        return time.perf_counter() - wall_start

    def do_eval(splits: list[str]) -> dict[str, float]:
        res = _evaluate(task, model, splits)
        sync()
        return res

    def checkpoint() -> None:
        write_parquet_atomic(pd.DataFrame(rows), metrics_path)
        save_checkpoint(
            ckpt_path,
            {
                "hash": h,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "epoch": epoch,
                "batch": batch_in_epoch,
                "epoch_rng": epoch_state,
                "torch_rng": torch.get_rng_state(),
                "train_time": train_time,
                "warmup_time": warmup_time,
                "wall_time": now_wall(),
            },
        )

    def report(metrics: Mapping[str, float], batch_losses: list[float]) -> bool:
        if reporter is None:
            return False
        m = dict(metrics)
        if batch_losses:
            m["batch_loss"] = sum(batch_losses) / len(batch_losses)
        return bool(reporter(step, train_time, m))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=max_steps,
            initial=step,
            position=position,
            leave=False,
            desc=str((labels or {}).get("variant", spec.name))[:24],
            unit="step",
            dynamic_ncols=True,
        )

    recent: list[float] = []
    batches: Iterator[Any] | None = None
    last_eval_time = train_time  # training seconds at the last evaluation (eval.every_seconds)
    try:
        with _StopFlag() as term:
            if step == 0 and ev.at_start and not rows:
                res = do_eval(ev.splits)
                rows.append({"step": 0, "epoch": 0.0, "time": 0.0, "wall_time": now_wall(), **res})
                if tb is not None:
                    _tensorboard_log(tb, rows[-1])
                if any(not finite(v) for k, v in res.items() if k.endswith("loss")):
                    status, stop_reason = "diverged", "nonfinite_eval"
                elif report(res, []):
                    status, stop_reason = "pruned", "pruned"
            while status == "running":
                if max_steps is not None and step >= max_steps:
                    stop_reason = "steps"
                    break
                if max_seconds is not None:
                    used = now_wall() if spec.budget.count_eval_time else train_time
                    if _any_worker(used >= max_seconds, world):
                        stop_reason = "seconds"
                        break
                t0 = time.perf_counter()
                if batches is None:
                    epoch_state = gen.get_state()
                    batches = iter(task.train_batches(batch_size, gen))
                    for _ in range(batch_in_epoch):
                        next(batches)
                try:
                    batch = next(batches)
                except StopIteration:
                    batches = None
                    epoch += 1
                    batch_in_epoch = 0
                    continue
                model.train()
                if world > 1:
                    batch = local_share(batch, world)
                info = optimizer.step(batch)
                sync()
                dt = time.perf_counter() - t0
                train_time += dt
                if first_in_process:
                    warmup_time += dt
                    first_in_process = False
                step += 1
                batch_in_epoch += 1
                d = _info_dict(info)
                row: dict[str, Any] = {"step": step, "epoch": step / steps_per_epoch}
                row.update({k: d.get(k) for k in _STEP_FIELDS})
                row["status"] = d.get("status", "ok")
                if finite(d.get("new_loss")) and finite(d.get("loss")):
                    row["actual_change"] = float(d["new_loss"]) - float(d["loss"])
                else:
                    row["actual_change"] = None
                for k, v in d.items():
                    if k not in row and isinstance(v, (int, float)):
                        row[k] = v
                row["time"] = train_time
                row["warmup_time"] = warmup_time
                loss = d.get("loss")
                # why the run stops, if it does: the optimiser's own status says which quantity
                # was non-finite (loss, gradient or step size α); a finite loss with a refused
                # step is not a "non-finite loss"
                why = str(row["status"]) if str(row["status"]).startswith("nonfinite") else None
                if why is None and not finite(loss):
                    why = "nonfinite_loss"
                nonfinite = why is not None
                evaluated = False
                if not nonfinite:
                    recent.append(float(loss))
                    due = ev.every is not None and step % ev.every == 0
                    if ev.every_seconds is not None:
                        late = train_time - last_eval_time >= ev.every_seconds
                        due = _any_worker(due or late, world)
                    if due:
                        last_eval_time = train_time
                        res = do_eval(ev.splits)
                        row.update(res)
                        evaluated = True
                        if any(not finite(v) for k, v in res.items() if k.endswith("loss")):
                            nonfinite, why = True, "nonfinite_eval"
                row["wall_time"] = now_wall()
                if nonfinite or evaluated or step % spec.log_every == 0:
                    rows.append(row)
                    if tb is not None:
                        tb_last = (step, _tensorboard_log(tb, row))
                if bar is not None:
                    bar.update(1)
                    if step % 20 == 0 or nonfinite:
                        bar.set_postfix(loss=f"{float(loss):.4g}" if finite(loss) else str(loss))
                if nonfinite:
                    status, stop_reason = "diverged", why
                    break
                if evaluated:
                    if report(row, recent):
                        status, stop_reason = "pruned", "pruned"
                        break
                    recent = []
                if spec.checkpoint_every and step % spec.checkpoint_every == 0:
                    checkpoint()
                if term.raised or (stop_after is not None and step >= stop_after):
                    checkpoint()
                    why = f" ({term.signal_name})" if term.raised else ""
                    raise RunInterrupted(
                        f"run {h} interrupted at step {step}{why}; checkpoint written"
                    )
            if status == "running":
                status = "completed"
                if ev.at_end:
                    res = do_eval(ev.final_splits)
                    if rows and rows[-1]["step"] == step:
                        rows[-1].update(res)
                    else:
                        rows.append(
                            {
                                "step": step,
                                "epoch": step / steps_per_epoch,
                                "time": train_time,
                                "wall_time": now_wall(),
                                **res,
                            }
                        )
                    if any(not finite(v) for k, v in res.items() if k.endswith("loss")):
                        status, stop_reason = "diverged", "nonfinite_eval"
                    elif reporter is not None:
                        report(res, recent)
    finally:
        if bar is not None:
            bar.close()
        if tb is not None:
            if rows and rows[-1]["step"] == step:  # the final evaluation, not logged yet
                _tensorboard_log(tb, rows[-1], skip=tb_last[1] if tb_last[0] == step else ())
            tb.close()

    df = pd.DataFrame(rows)
    write_parquet_atomic(df, metrics_path)
    summary = summarise(
        df,
        status=status,
        stop_reason=stop_reason,
        run_hash=h,
        labels=labels,
        steps=step,
        train_time=train_time,
        warmup_time=warmup_time,
        wall_time=now_wall(),
        steps_per_epoch=steps_per_epoch,
        batch_size=batch_size,
        classification=bool(getattr(task, "classification", False)),
    )
    atomic_write_json(summary_path, summary)
    with contextlib.suppress(FileNotFoundError):
        ckpt_path.unlink()
    return RunResult(hash=h, status=status, summary=summary)


def _tensorboard_writer(rdir: Any) -> Any:
    """A ``SummaryWriter`` in ``rdir/tensorboard``.

    Raises:
        SpecError: TensorBoard is not installed.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch raises ImportError when tensorboard is missing
        raise SpecError(
            f"tensorboard: true needs the tensorboard package ({exc})",
            field="tensorboard",
            fix="pip install 'qlrlab[tensorboard]', or set tensorboard: false",
        ) from exc
    return SummaryWriter(log_dir=str(rdir / "tensorboard"))


def _tensorboard_log(writer: Any, row: Mapping[str, Any], skip: Any = ()) -> set[str]:
    """Write the numeric entries of one metrics row (but ``skip``) as scalars at its step;
    returns the keys written."""
    step = int(row["step"])
    written: set[str] = set()
    for key, value in row.items():
        if key in skip:
            continue
        if (
            key in ("step", "epoch")
            or isinstance(value, bool)
            or not isinstance(value, (int, float))
        ):
            continue
        if value == value and abs(value) != float("inf"):
            writer.add_scalar(key, float(value), global_step=step)
            written.add(key)
    return written


def _world_size() -> int:
    from qlrlab.distributed import is_distributed

    return torch.distributed.get_world_size() if is_distributed() else 1


def _any_worker(flag: bool, world: int) -> bool:
    """``flag`` OR-ed over the workers, so that every worker stops at the same step."""
    if world <= 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def local_share(batch: Any, world: int) -> Any:
    """This worker's equal, contiguous share of a global batch (data parallelism).

    Every tensor of ``(inputs, targets)`` is split along its first dimension into ``world``
    equal chunks. Tensors whose first dimension is a multiple of the batch size (PTB's flattened
    ``[B·L]`` targets) split consistently with the ``[B, L]`` inputs. A batch that does not
    divide evenly is trimmed to the largest multiple of ``world`` (at most ``world − 1``
    examples dropped), because the average of unequal per-worker means is not the batch mean.

    Raises:
        SpecError: the batch is smaller than the number of workers.
    """
    from qlrlab.distributed import shard

    inputs, targets = batch
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    n = int(first.shape[0])
    keep = (n // world) * world
    if keep == 0:
        raise SpecError(
            f"a batch of {n} cannot be split over {world} workers",
            field="batch_size",
            fix=f"use batch_size >= {world} (the number of torchrun processes)",
        )
    if keep != n:

        def trim(t: Any) -> Any:
            if isinstance(t, (tuple, list)):
                return type(t)(trim(u) for u in t)
            per = int(t.shape[0]) // n
            return t[: keep * per]

        inputs, targets = trim(inputs), trim(targets)
    return shard((inputs, targets))


def _last_finite(df: pd.DataFrame, col: str) -> float | None:
    if col not in df:
        return None
    s = pd.to_numeric(df[col], errors="coerce")
    s = s[s.map(finite)]
    return float(s.iloc[-1]) if len(s) else None


def summarise(
    df: pd.DataFrame,
    *,
    status: str,
    stop_reason: str | None,
    run_hash: str,
    labels: Mapping[str, Any] | None,
    steps: int,
    train_time: float,
    wall_time: float,
    steps_per_epoch: int,
    batch_size: int,
    classification: bool,
    warmup_time: float = 0.0,
) -> dict[str, Any]:
    """Build a run's summary row from its metrics (last finite values, so a diverged run keeps
    its last good numbers)."""
    out: dict[str, Any] = {
        "hash": run_hash,
        "status": status,
        "stop_reason": stop_reason,
        "labels": dict(labels or {}),
        "steps": steps,
        "epochs": steps / steps_per_epoch,
        "batch_size": batch_size,
        "train_time": train_time,
        "warmup_time": warmup_time,
        "wall_time": wall_time,
        "classification": classification,
        "final_batch_loss": _last_finite(df, "loss"),
    }
    for split in ("train", "val", "test"):
        out[f"final_{split}_loss"] = _last_finite(df, f"{split}_loss")
        out[f"final_{split}_accuracy"] = _last_finite(df, f"{split}_accuracy")
    if out["final_train_loss"] is None:
        out["final_train_loss"] = out["final_batch_loss"]
    if "val_loss" in df:
        v = pd.to_numeric(df["val_loss"], errors="coerce")
        v = v[v.map(finite)]
        out["best_val_loss"] = float(v.min()) if len(v) else None
    if status == "diverged" and len(df):
        out["diverged_at_step"] = int(df["step"].iloc[-1])
    return out


def run_safely(
    spec: RunSpec,
    store: RunStore,
    *,
    labels: Mapping[str, Any] | None = None,
    reporter: Reporter | None = None,
    progress: bool = False,
    position: int = 0,
) -> RunResult:
    """:func:`execute_run`, but an exception inside the run is recorded as status ``failed``
    (with the traceback in ``summary.json``) instead of propagating. ``KeyboardInterrupt``,
    :class:`RunInterrupted` and :class:`SpecError` still propagate."""
    try:
        return execute_run(
            spec, store, labels=labels, reporter=reporter, progress=progress, position=position
        )
    except (KeyboardInterrupt, RunInterrupted, SpecError):
        raise
    except Exception as exc:
        h = run_hash(spec)
        summary = {
            "hash": h,
            "status": "failed",
            "labels": dict(labels or {}),
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(),
        }
        atomic_write_json(store.run_dir(h) / "summary.json", summary)
        return RunResult(hash=h, status="failed", summary=summary)
