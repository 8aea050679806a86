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
from collections.abc import Callable, Iterator, Mapping, Sequence
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


def _evaluate(task: Any, model: torch.nn.Module, splits: Sequence[str]) -> dict[str, float]:
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


@dataclass
class _Counters:
    """Where a run stands: what a checkpoint saves and a resumed run starts from."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches drawn in the current epoch
    train_time: float = 0.0
    wall_offset: float = 0.0
    # one-off warm-up: the first optimiser step of each process (allocation, kernel selection:
    # 0.3-0.5 s against 1 ms later); logged so that reports can leave it out of time axes
    warmup_time: float = 0.0
    epoch_rng: Any = None  # the data-order generator's state at the start of the epoch
    first_in_process: bool = True  # not saved: each process warms up once


@dataclass
class _Setup:
    """What a run trains: the task, model, optimiser and budget (built from the spec)."""

    task: Any
    model: torch.nn.Module
    optimizer: Any
    device: torch.device
    world: int
    batch_size: int
    steps_per_epoch: int
    max_steps: int | None
    max_seconds: float | None


def _setup(spec: RunSpec) -> _Setup:
    import qlrlab

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
    max_steps, max_seconds = _budget_steps(spec, task, batch_size)
    return _Setup(
        task=task,
        model=model,
        optimizer=optimizer,
        device=device,
        world=world,
        batch_size=batch_size,
        steps_per_epoch=task.steps_per_epoch(batch_size),
        max_steps=max_steps,
        max_seconds=max_seconds,
    )


class _Clock:
    """Wall-clock seconds of a run (continuing a resumed run's), after the device's queue."""

    def __init__(self, device: torch.device, wall_offset: float) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.start = time.perf_counter() - wall_offset

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def wall(self) -> float:
        return time.perf_counter() - self.start


class _MetricLog:
    """The run's metric rows (``metrics.parquet``) and, optionally, their TensorBoard copy."""

    def __init__(self, path: Any) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.tb: Any = None
        self._tb_last: tuple[int, set[str]] = (-1, set())

    def open_tensorboard(self, rdir: Any) -> None:
        self.tb = _tensorboard_writer(rdir)

    def append(self, row: dict[str, Any], *, step: int | None = None) -> None:
        """Add a row; ``step``: a training step's row (its TensorBoard tags are remembered, so
        that the final evaluation merged into it is not logged twice)."""
        self.rows.append(row)
        if self.tb is not None:
            tags = _tensorboard_log(self.tb, row)
            if step is not None:
                self._tb_last = (step, tags)

    def write(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows)
        write_parquet_atomic(df, self.path)
        return df

    def close(self, step: int) -> None:
        if self.tb is not None:
            if self.rows and self.rows[-1]["step"] == step:  # the final evaluation, not logged yet
                last_step, tags = self._tb_last
                _tensorboard_log(self.tb, self.rows[-1], skip=tags if last_step == step else ())
            self.tb.close()


class _Checkpoints:
    """``checkpoint.pt``: model, optimiser, data-order and torch RNG, counters; with the metric
    rows up to it (a checkpoint whose rows are lost is not used: the run starts again)."""

    def __init__(self, rdir: Any, run_hash: str, run: _Setup, log: _MetricLog) -> None:
        self.path = rdir / "checkpoint.pt"
        self.hash, self.run, self.log = run_hash, run, log

    def restore(self, c: _Counters, gen: torch.Generator, *, resume: bool) -> None:
        """Continue from the checkpoint when there is a usable one; else start clean."""
        ckpt = load_checkpoint(self.path) if resume else None
        if ckpt is not None and ckpt.get("hash") != self.hash:
            ckpt = None
        if ckpt is not None:
            old = read_metrics(self.log.path)
            if old is not None:
                self.log.rows = old[old["step"] <= int(ckpt["step"])].to_dict("records")
            else:  # the rows up to the checkpoint are lost: start again, which reproduces them
                warn(
                    f"{self.log.path} is missing or unreadable next to the checkpoint of step "
                    f"{int(ckpt['step'])}; restarting run {self.hash} from step 0"
                )
                ckpt = None
        if ckpt is None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            with contextlib.suppress(FileNotFoundError):
                self.log.path.unlink()
            return
        self.run.model.load_state_dict(ckpt["model"])
        self.run.optimizer.load_state_dict(ckpt["optimizer"])
        c.step, c.epoch, c.batch = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch"])
        c.train_time, c.wall_offset = float(ckpt["train_time"]), float(ckpt["wall_time"])
        c.warmup_time = float(ckpt.get("warmup_time", 0.0))
        c.epoch_rng = ckpt["epoch_rng"]
        gen.set_state(c.epoch_rng)
        torch.set_rng_state(ckpt["torch_rng"])

    def save(self, c: _Counters, clock: _Clock) -> None:
        self.log.write()
        save_checkpoint(
            self.path,
            {
                "hash": self.hash,
                "model": self.run.model.state_dict(),
                "optimizer": self.run.optimizer.state_dict(),
                "step": c.step,
                "epoch": c.epoch,
                "batch": c.batch,
                "epoch_rng": c.epoch_rng,
                "torch_rng": torch.get_rng_state(),
                "train_time": c.train_time,
                "warmup_time": c.warmup_time,
                "wall_time": clock.wall(),
            },
        )

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class _Evaluation:
    """When to evaluate (``eval.every`` steps, ``eval.every_seconds`` of training, decided by all
    workers together), the evaluation itself, and the tuner's reporter."""

    def __init__(
        self, spec: RunSpec, run: _Setup, clock: _Clock, reporter: Reporter | None, c: _Counters
    ) -> None:
        self.ev, self.run, self.clock, self.reporter = spec.eval, run, clock, reporter
        self.last_time = c.train_time  # training seconds at the last evaluation

    def __call__(self, splits: Sequence[str]) -> dict[str, float]:
        res = _evaluate(self.run.task, self.run.model, splits)
        self.clock.sync()
        return res

    def due(self, c: _Counters) -> bool:
        ev = self.ev
        due = ev.every is not None and c.step % ev.every == 0
        if ev.every_seconds is not None:
            late = c.train_time - self.last_time >= ev.every_seconds
            due = _any_worker(due or late, self.run.world)
        if due:
            self.last_time = c.train_time
        return due

    def after_step(
        self, row: dict[str, Any], c: _Counters, recent: list[float], why: str | None
    ) -> tuple[bool, str | None]:
        """After a step (``why``: its divergence, if any): count its batch loss in ``recent`` and
        evaluate when due, merging the metrics into ``row``; ``(evaluated, why)``."""
        if why is not None:
            return False, why
        recent.append(float(row["loss"]))
        if not self.due(c):
            return False, None
        res = self(self.ev.splits)
        row.update(res)
        return True, ("nonfinite_eval" if _nonfinite_loss(res) else None)

    def report(self, c: _Counters, metrics: Mapping[str, float], batch_losses: list[float]) -> bool:
        """Tell the reporter; ``True``: prune the run."""
        if self.reporter is None:
            return False
        m = dict(metrics)
        if batch_losses:
            m["batch_loss"] = sum(batch_losses) / len(batch_losses)
        return bool(self.reporter(c.step, c.train_time, m))


def _nonfinite_loss(metrics: Mapping[str, Any]) -> bool:
    return any(not finite(v) for k, v in metrics.items() if k.endswith("loss"))


class _ProgressBar:
    """A tqdm bar for the run (a no-op without ``progress``)."""

    def __init__(self, enabled: bool, run: _Setup, c: _Counters, position: int, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=run.max_steps,
                initial=c.step,
                position=position,
                leave=False,
                desc=desc[:24],
                unit="step",
                dynamic_ncols=True,
            )

    def update(self, step: int, loss: Any, nonfinite: bool) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if step % 20 == 0 or nonfinite:
                self.bar.set_postfix(loss=f"{float(loss):.4g}" if finite(loss) else str(loss))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Batches:
    """The training batches, epoch after epoch, in the order of the data-order generator."""

    def __init__(self, run: _Setup, gen: torch.Generator) -> None:
        self.run, self.gen = run, gen
        self.it: Iterator[Any] | None = None

    def next(self, c: _Counters) -> Any:
        """The next batch; ``None`` at the end of an epoch (the counters move to the next)."""
        if self.it is None:
            c.epoch_rng = self.gen.get_state()
            self.it = iter(self.run.task.train_batches(self.run.batch_size, self.gen))
            for _ in range(c.batch):  # a resumed run skips the epoch's batches already seen
                next(self.it)
        try:
            return next(self.it)
        except StopIteration:
            self.it = None
            c.epoch += 1
            c.batch = 0
            return None


def _budget_spent(spec: RunSpec, run: _Setup, c: _Counters, clock: _Clock) -> str | None:
    """``"steps"`` or ``"seconds"`` once that budget is spent (seconds: as any worker says)."""
    if run.max_steps is not None and c.step >= run.max_steps:
        return "steps"
    if run.max_seconds is not None:
        used = clock.wall() if spec.budget.count_eval_time else c.train_time
        if _any_worker(used >= run.max_seconds, run.world):
            return "seconds"
    return None


def _train_step(run: _Setup, batch: Any, c: _Counters, clock: _Clock, t0: float) -> dict[str, Any]:
    """One optimiser step (timed from ``t0``, batch loading included); returns its metrics row."""
    run.model.train()
    if run.world > 1:
        batch = local_share(batch, run.world)
    info = run.optimizer.step(batch)
    clock.sync()
    dt = time.perf_counter() - t0
    c.train_time += dt
    if c.first_in_process:
        c.warmup_time += dt
        c.first_in_process = False
    c.step += 1
    c.batch += 1
    d = _info_dict(info)
    row: dict[str, Any] = {"step": c.step, "epoch": c.step / run.steps_per_epoch}
    row.update({k: d.get(k) for k in _STEP_FIELDS})
    row["status"] = d.get("status", "ok")
    if finite(d.get("new_loss")) and finite(d.get("loss")):
        row["actual_change"] = float(d["new_loss"]) - float(d["loss"])
    else:
        row["actual_change"] = None
    for k, v in d.items():
        if k not in row and isinstance(v, (int, float)):
            row[k] = v
    row["time"] = c.train_time
    row["warmup_time"] = c.warmup_time
    return row


def _divergence(row: Mapping[str, Any]) -> str | None:
    """Why the run stops after this step, if it does: the optimiser's own status says which
    quantity was non-finite (loss, gradient or step size α); a finite loss with a refused step is
    not a "non-finite loss"."""
    if str(row["status"]).startswith("nonfinite"):
        return str(row["status"])
    return None if finite(row["loss"]) else "nonfinite_loss"


def _open_run_dir(rdir: Any, h: str, spec: RunSpec, labels: Mapping[str, Any] | None) -> None:
    """Create the run's folder and write its ``spec.json`` (and drop a stale summary)."""
    rdir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (rdir / "summary.json").unlink()
    atomic_write_json(
        rdir / "spec.json",
        {
            "hash": h,
            "spec": spec.model_dump(mode="json"),
            "seed": spec.seed,
            "labels": dict(labels or {}),
            "threads": torch.get_num_threads(),
            **environment_info(),
        },
    )


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
    h = run_hash(spec)
    rdir = store.run_dir(h)
    _open_run_dir(rdir, h, spec, labels)
    run = _setup(spec)
    gen = torch.Generator().manual_seed(spec.seed)
    c = _Counters(epoch_rng=gen.get_state())
    log = _MetricLog(rdir / "metrics.parquet")
    checkpoints = _Checkpoints(rdir, h, run, log)
    checkpoints.restore(c, gen, resume=resume)
    if spec.tensorboard:
        log.open_tensorboard(rdir)
    ev = spec.eval
    clock = _Clock(run.device, c.wall_offset)
    evaluate = _Evaluation(spec, run, clock, reporter, c)
    bar = _ProgressBar(progress, run, c, position, str((labels or {}).get("variant", spec.name)))
    batches = _Batches(run, gen)
    status, stop_reason = "running", None
    recent: list[float] = []  # batch losses since the last evaluation
    try:
        with _StopFlag() as term:
            if c.step == 0 and ev.at_start and not log.rows:
                status, stop_reason = _start_evaluation(evaluate, log, c, clock)
            while status == "running":
                stop_reason = _budget_spent(spec, run, c, clock)
                if stop_reason is not None:
                    break
                t0 = time.perf_counter()
                batch = batches.next(c)
                if batch is None:
                    continue
                row = _train_step(run, batch, c, clock, t0)
                evaluated, why = evaluate.after_step(row, c, recent, _divergence(row))
                row["wall_time"] = clock.wall()
                if why is not None or evaluated or c.step % spec.log_every == 0:
                    log.append(row, step=c.step)
                bar.update(c.step, row["loss"], why is not None)
                if why is not None:
                    status, stop_reason = "diverged", why
                    break
                if evaluated:
                    if evaluate.report(c, row, recent):
                        status, stop_reason = "pruned", "pruned"
                        break
                    recent = []
                if spec.checkpoint_every and c.step % spec.checkpoint_every == 0:
                    checkpoints.save(c, clock)
                if term.raised or (stop_after is not None and c.step >= stop_after):
                    checkpoints.save(c, clock)
                    raise _interrupted(h, c, term)
            if status == "running":
                status = "completed"
                if ev.at_end and not _final_evaluation(ev, evaluate, log, c, run, clock, recent):
                    status, stop_reason = "diverged", "nonfinite_eval"
    finally:
        bar.close()
        log.close(c.step)

    summary = _summary(log.write(), status, stop_reason, h, labels, c, clock, run)
    atomic_write_json(rdir / "summary.json", summary)
    checkpoints.remove()
    return RunResult(hash=h, status=status, summary=summary)


def _start_evaluation(
    evaluate: _Evaluation, log: _MetricLog, c: _Counters, clock: _Clock
) -> tuple[str, str | None]:
    """Evaluate the initial model (step 0); the run's status after it."""
    res = evaluate(evaluate.ev.splits)
    log.append({"step": 0, "epoch": 0.0, "time": 0.0, "wall_time": clock.wall(), **res})
    if _nonfinite_loss(res):
        return "diverged", "nonfinite_eval"
    if evaluate.report(c, res, []):
        return "pruned", "pruned"
    return "running", None


def _interrupted(h: str, c: _Counters, term: _StopFlag) -> RunInterrupted:
    sig = f" ({term.signal_name})" if term.raised else ""
    return RunInterrupted(f"run {h} interrupted at step {c.step}{sig}; checkpoint written")


def _summary(
    df: pd.DataFrame,
    status: str,
    stop_reason: str | None,
    h: str,
    labels: Mapping[str, Any] | None,
    c: _Counters,
    clock: _Clock,
    run: _Setup,
) -> dict[str, Any]:
    return summarise(
        df,
        status=status,
        stop_reason=stop_reason,
        run_hash=h,
        labels=labels,
        steps=c.step,
        train_time=c.train_time,
        warmup_time=c.warmup_time,
        wall_time=clock.wall(),
        steps_per_epoch=run.steps_per_epoch,
        batch_size=run.batch_size,
        classification=bool(getattr(run.task, "classification", False)),
    )


def _final_evaluation(
    ev: Any,
    evaluate: _Evaluation,
    log: _MetricLog,
    c: _Counters,
    run: _Setup,
    clock: _Clock,
    recent: list[float],
) -> bool:
    """A completed run's last evaluation (merged into the last step's row); ``False`` when a
    loss is non-finite."""
    res = evaluate(ev.final_splits)
    if log.rows and log.rows[-1]["step"] == c.step:
        log.rows[-1].update(res)
    else:
        log.rows.append(
            {
                "step": c.step,
                "epoch": c.step / run.steps_per_epoch,
                "time": c.train_time,
                "wall_time": clock.wall(),
                **res,
            }
        )
    if _nonfinite_loss(res):
        return False
    if evaluate.reporter is not None:
        evaluate.report(c, res, recent)
    return True


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
