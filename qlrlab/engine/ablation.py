"""Run a set of planned runs: locally in-process, in spawned worker processes, or on Ray.

The executor is resumable and idempotent: runs are identified by the hash of their resolved spec,
finished runs (``summary.json`` with a done status) are skipped, unfinished ones are re-run (from
their checkpoint when there is one), and a run that fails or diverges never stops the others.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlrlab.engine.runner import RunResult, run_safely
from qlrlab.engine.specs import AblationSpec, PlannedRun, RunSpec, SpecError
from qlrlab.engine.storage import FolderLock, RunStore, confined

__all__ = ["AblationResult", "execute_planned", "preflight", "prepare_output", "run_ablation"]


@dataclass
class AblationResult:
    """Outcome of an ablation (or of any set of planned runs).

    Attributes:
        out_dir: the output directory.
        statuses: run hash → final status.
        skipped: hashes that were already done (``--resume``).
        errors: run hash → error message of failed runs.
    """

    out_dir: Path
    statuses: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        """Hashes of runs that failed (an exception, not a divergence)."""
        return [h for h, s in self.statuses.items() if s == "failed"]

    def counts(self) -> dict[str, int]:
        """Number of runs per status (``skipped`` included)."""
        out: dict[str, int] = {}
        for s in self.statuses.values():
            out[s] = out.get(s, 0) + 1
        if self.skipped:
            out["skipped"] = len(self.skipped)
        return out


def preflight(specs: Sequence[RunSpec]) -> None:
    """Check every distinct task's data before anything runs.

    Uses the task spec's ``check_data()`` when it has one, else builds the task once on the CPU
    (which also performs any download once, not in every worker).

    Raises:
        SpecError: a dataset file is missing or unreadable, naming the file and the fix; or
            ``tensorboard: true`` without the tensorboard package.
    """
    import json

    from qlrlab.data.download import ChecksumError

    if any(spec.tensorboard for spec in specs):
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise SpecError(
                "tensorboard: true needs the tensorboard package, which is not installed",
                field="tensorboard",
                fix="pip install 'qlrlab[tensorboard]', or set tensorboard: false",
            )
    seen: set[str] = set()
    for spec in specs:
        key = json.dumps(spec.task, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        task_spec = spec.task_spec()
        try:
            check = getattr(task_spec, "check_data", None)
            if callable(check):
                check()
            else:
                task_spec.build("cpu")
        except ChecksumError as exc:  # a damaged file on disk: the message says how to repair
            raise SpecError(
                str(exc), field=f"task ({spec.task.get('name')})", fix=exc.fix
            ) from None
        except OSError as exc:
            fname = getattr(exc, "filename", None)
            if spec.task.get("download", False):  # the download itself failed
                fix = (
                    "the download failed (see above): check the network or $QLRLAB_MIRROR, or "
                    "put the files in task.data_dir (or $QLRLAB_DATA) by hand"
                )
            else:
                fix = (
                    "put the files in task.data_dir (or $QLRLAB_DATA), or set task.download: "
                    "true to fetch them"
                )
            raise SpecError(
                f"missing or unreadable dataset file{f' {fname}' if fname else ''}: {exc}",
                field=f"task ({spec.task.get('name')})",
                fix=fix,
            ) from None


def prepare_output(out_dir: str | Path, *, resume: bool, overwrite: bool, kind: str) -> RunStore:
    """Create (or reuse) an output directory.

    Args:
        out_dir: the directory.
        resume: continue what is there.
        overwrite: delete previous results in it (``index.json``, ``runs/``, ``report/``,
            ``optuna.db``) first.
        kind: ``ablation``, ``run`` or ``tune`` (recorded in the index).

    The directory is locked (:class:`~qlrlab.engine.storage.FolderLock`) for this process
    until ``store.lock.release()`` (or until the store is garbage-collected, or the process
    ends), so a second qlrlab process cannot write into it at the same time.

    Raises:
        SpecError: it already holds results and neither ``resume`` nor ``overwrite`` is set;
            or another process is writing into it.
    """
    store = RunStore(out_dir)
    store.lock = FolderLock(store.root)
    store.lock.acquire()
    if store.index_path.exists() and not resume:
        if not overwrite:
            store.lock.release()
            raise SpecError(
                f"output directory {store.root} already holds results",
                fix="pass --resume to continue it, --overwrite to start again, or --out DIR",
            )
        for name in ("runs", "report", "ray"):
            p = confined(store.root, name)
            if p.is_dir():
                shutil.rmtree(p)
        for name in ("index.json", "optuna.db", "best.json"):
            p = confined(store.root, name)
            if p.exists():
                p.unlink()
    store.root.mkdir(parents=True, exist_ok=True)
    return store


#: Set while a worker process executes a run.
_IN_RUN = threading.Event()

#: Seconds a worker whose coordinator died may take to checkpoint its run before it exits.
_ORPHAN_GRACE_S = 8.0


def cpu_plan(
    workers: int, threads: int, available: Sequence[int]
) -> list[tuple[int, ...]] | None:
    """Disjoint CPU sets for ``workers`` processes of ``threads`` threads each, or ``None`` when
    they do not fit in ``available`` (then no worker is pinned).

    Pinning keeps each worker's threads on CPUs of their own: unpinned, the scheduler moves
    workers between CPUs and now and then puts two on one CPU for a while, and identical runs
    then differ in speed by up to 2× (``benchmarks/step_stability.py``).
    """
    cpus = sorted(set(available))
    if workers < 1 or threads < 1 or workers * threads > len(cpus):
        return None
    return [tuple(cpus[i * threads : (i + 1) * threads]) for i in range(workers)]


def _pin_from(cpu_sets: Any) -> None:
    """Take one CPU set from the coordinator's queue and pin this process to it."""
    import queue

    if cpu_sets is None or not hasattr(os, "sched_setaffinity"):
        return
    try:
        cpus = cpu_sets.get(timeout=5.0)
    except queue.Empty:
        return  # more worker processes than sets (never with ProcessPoolExecutor): unpinned
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, cpus)


def _available_cpus() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _init_worker(threads: int, coordinator: int, cpu_sets: Any = None) -> None:
    """Worker start-up: CPUs, threads, and a watch on the coordinator.

    :func:`qlrlab._lifeline.guard_worker` (run when the worker imported qlrlab) already asked
    for SIGTERM on the coordinator's death (Linux) and exits a worker whose coordinator died
    while it started; this thread is the portable fallback and bounds the time an orphan takes
    to checkpoint its run.
    """
    import signal
    import time

    import torch

    _pin_from(cpu_sets)  # before torch starts its threads: they inherit the affinity
    torch.set_num_threads(max(1, threads))
    if os.getppid() != coordinator:
        os._exit(143)

    def watch() -> None:
        while os.getppid() == coordinator:
            time.sleep(0.2)
        if _IN_RUN.is_set():
            os.kill(os.getpid(), signal.SIGTERM)  # the run loop checkpoints, then stops
            deadline = time.monotonic() + _ORPHAN_GRACE_S
            while _IN_RUN.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
        os._exit(143)

    threading.Thread(target=watch, daemon=True, name="qlrlab-parent-watch").start()


def _worker(spec_json: dict[str, Any], root: str, labels: dict[str, Any], threads: int) -> tuple:
    """Run one spec in a worker process; returns ``(hash, status, error)``.

    A worker whose coordinator is gone takes no run; a worker told to stop (SIGTERM) writes the
    checkpoint of its run and exits instead of taking the next one.
    """
    import torch

    from qlrlab._lifeline import coordinator_pid
    from qlrlab.engine.runner import RunInterrupted
    from qlrlab.plugins import load_plugins_from_env

    coordinator = coordinator_pid()
    load_plugins_from_env()  # the user's own components (--plugin) exist here too
    torch.set_num_threads(max(1, threads))
    spec = RunSpec.model_validate(spec_json)
    if coordinator is not None and os.getppid() != coordinator:
        os._exit(143)  # orphaned: write nothing
    _IN_RUN.set()
    try:
        res = run_safely(spec, RunStore(root), labels=labels)
    except RunInterrupted:
        os._exit(143)  # the checkpoint is written; take no further run
    finally:
        _IN_RUN.clear()
    return res.hash, res.status, res.summary.get("error")


class _Terminated(KeyboardInterrupt):
    """SIGTERM received by a coordinator (handled like Ctrl-C)."""


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """In the main thread: SIGTERM raises :class:`_Terminated` (a ``KeyboardInterrupt``), so a
    coordinator stops its workers and exits like on Ctrl-C instead of dying silently."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: Any) -> None:
        raise _Terminated("SIGTERM")

    old = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _stop_workers(pool: ProcessPoolExecutor, grace: float = 60.0) -> None:
    """Cancel the queued runs and ask every worker to checkpoint its run and exit (SIGTERM);
    kill those still there after ``grace`` seconds."""
    import time

    procs = [p for p in list((getattr(pool, "_processes", None) or {}).values()) if p.is_alive()]
    if procs:
        print(
            f"stopping {len(procs)} worker process(es): each writes a checkpoint of its run",
            file=sys.stderr,
        )
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def worker_pool(workers: int, threads: int, pin_cpus: bool = False) -> ProcessPoolExecutor:
    """The spawned worker processes of a local ablation: ``threads`` torch threads each, pinned
    to CPUs of their own when ``pin_cpus`` and they fit (:func:`cpu_plan`), each watching this
    process (its coordinator)."""
    ctx = mp.get_context("spawn")
    plan = cpu_plan(workers, threads, _available_cpus()) if pin_cpus else None
    cpu_sets = None
    if plan is not None:
        cpu_sets = ctx.Queue()
        for cpus in plan:
            cpu_sets.put(cpus)
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(threads, os.getpid(), cpu_sets),
    )


def _run_pool(
    todo: Sequence[PlannedRun],
    store: RunStore,
    workers: int,
    threads: int,
    record: Any,
    pin_cpus: bool = False,
) -> None:
    """Run ``todo`` in spawned worker processes (see :func:`qlrlab._lifeline.guard_worker`),
    each pinned to CPUs of its own when they fit (``pin_cpus``, see :func:`cpu_plan`).

    Raises:
        KeyboardInterrupt: Ctrl-C or SIGTERM (after stopping the workers).
        RunInterrupted: a worker process ended unexpectedly (after stopping the others).
    """
    from qlrlab._lifeline import ENV_VAR
    from qlrlab.engine.runner import RunInterrupted

    pool = worker_pool(min(workers, len(todo)), threads, pin_cpus)
    try:
        os.environ[ENV_VAR] = str(os.getpid())  # read (and dropped) by each spawned worker
        try:
            pending: set[Future] = {
                pool.submit(
                    _worker, p.spec.model_dump(mode="json"), str(store.root), p.labels, threads
                )
                for p in todo
            }
        finally:
            os.environ.pop(ENV_VAR, None)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                try:
                    h, status, error = fut.result()
                except BrokenProcessPool:
                    raise RunInterrupted(
                        "a worker process ended unexpectedly (killed?); finished runs are kept"
                    ) from None
                record(h, status, error)
    except BaseException:
        _stop_workers(pool)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def ensure_ray(address: str | None) -> bool:
    """Connect to (or start) Ray unless it is already initialised; returns whether it started
    it here (the caller then shuts it down).

    The job carries no runtime environment: each remote function receives the driver's settings
    (:func:`qlrlab.engine.cluster.job_environment`) as an argument and applies them itself, so
    that the cluster's pre-started worker processes can be used and a Ray session the caller
    initialised gets the same settings.

    Raises:
        SpecError: Ray is not installed.
    """
    try:
        import ray
    except ImportError as exc:
        raise SpecError(
            f"the ray back-end needs Ray: {exc}", fix="pip install 'qlrlab[ray]'"
        ) from None
    if ray.is_initialized():
        return False
    try:
        ray.init(
            address=address, include_dashboard=False, log_to_driver=False, logging_level="WARNING"  # type: ignore[arg-type]
        )
    except ConnectionError as exc:  # no cluster there, or its token is missing
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        raise SpecError(
            f"cannot connect to the Ray cluster at {address}: {lines[-1] if lines else exc}",
            field="--address",
            fix="start it with 'ray start --head', pass its HEAD_IP:PORT (or auto); if the "
            "cluster uses token authentication, set RAY_AUTH_MODE=token and make its token "
            "available (~/.ray/auth_token or RAY_AUTH_TOKEN)",
        ) from None
    return True


def _ray_worker(
    spec_json: dict[str, Any], root: str, labels: dict[str, Any], env: dict[str, str]
) -> tuple:
    """:func:`_worker` on a Ray node, with the driver's settings; a failure names the node."""
    from qlrlab.engine.cluster import apply_job_environment, node_label

    apply_job_environment(env)
    h, status, error = _worker(spec_json, root, labels, int(env.get("OMP_NUM_THREADS", "1")))
    if error:
        error = f"on node {node_label()}: {error}"
    return h, status, error


def _use_bars(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


def execute_planned(
    planned: Sequence[PlannedRun],
    store: RunStore,
    *,
    workers: int = 1,
    threads_per_worker: int = 1,
    pin_cpus: bool = False,
    quiet: bool = False,
    backend: str = "local",
    address: str | None = None,
    desc: str = "runs",
) -> AblationResult:
    """Run every planned run that is not done yet.

    Args:
        planned: the runs (duplicates by hash run once).
        store: where results go.
        workers: parallel processes (1: in this process).
        threads_per_worker: torch intra-op threads in each worker process (and in this
            process while it runs the runs itself); 1 is fastest for small models.
        pin_cpus: pin each local worker process to CPUs of its own when
            ``workers * threads_per_worker`` fit in the CPUs this process may use (Linux;
            makes identical runs equally fast, see :func:`cpu_plan`).
        quiet: no progress bars (they are also off when stderr is not a terminal).
        backend: ``local`` or ``ray``.
        address: the Ray cluster address (``None``: a local Ray instance).
        desc: progress bar label.

    Returns:
        The :class:`AblationResult`.
    """
    result = AblationResult(out_dir=store.root)
    unique: dict[str, PlannedRun] = {}
    for p in planned:
        unique.setdefault(p.hash, p)
    todo: list[PlannedRun] = []
    for h, p in unique.items():
        if store.is_done(h):
            result.skipped.append(h)
            result.statuses[h] = store.summary(h)["status"]  # type: ignore[index]
        else:
            todo.append(p)
    bars = _use_bars(quiet)
    from tqdm.auto import tqdm

    outer = tqdm(
        total=len(unique),
        initial=len(result.skipped),
        desc=desc,
        unit="run",
        disable=not bars,
        position=0,
        dynamic_ncols=True,
    )

    def record(h: str, status: str, error: str | None) -> None:
        result.statuses[h] = status
        if error:
            result.errors[h] = error
        outer.update(1)
        outer.set_postfix(result.counts())

    stack = contextlib.ExitStack()
    stack.enter_context(_sigterm_interrupts())  # SIGTERM: stop like Ctrl-C, with a message
    try:
        if backend == "ray":
            _run_ray(todo, store, threads_per_worker, address, record)
        elif workers <= 1 or len(todo) <= 1:
            import torch

            old_threads = torch.get_num_threads()
            torch.set_num_threads(max(1, threads_per_worker))
            try:
                for p in todo:
                    res: RunResult = run_safely(
                        p.spec, store, labels=p.labels, progress=bars, position=1
                    )
                    record(res.hash, res.status, res.summary.get("error"))
            finally:
                torch.set_num_threads(old_threads)
        else:
            _run_pool(todo, store, workers, threads_per_worker, record, pin_cpus)
    finally:
        stack.close()
        outer.close()
    return result


def _run_ray(
    todo: Sequence[PlannedRun],
    store: RunStore,
    threads: int,
    address: str | None,
    record: Any,
) -> None:
    import ray

    from qlrlab.engine.cluster import check_cluster, job_environment

    if not todo:
        return
    env = job_environment(threads)
    started = ensure_ray(address)
    try:
        check_cluster(env, [p.spec for p in todo], store.root)
        remote = ray.remote(num_cpus=threads)(_ray_worker)  # a lost node: retried, resumed
        refs = {
            remote.remote(p.spec.model_dump(mode="json"), str(store.root), p.labels, env): p
            for p in todo
        }
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                h, status, error = ray.get(done[0])
            except ray.exceptions.RayError as exc:  # the worker itself died, not the run
                lines = [ln for ln in str(exc).splitlines() if ln.strip()]
                h, status = refs[done[0]].hash, "failed"
                error = f"{type(exc).__name__}: {lines[-1] if lines else exc}"
            record(h, status, error)
    finally:
        if started:
            ray.shutdown()


def run_ablation(
    spec: AblationSpec,
    out_dir: str | Path,
    *,
    planned: Sequence[PlannedRun] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    quiet: bool = False,
    backend: str = "local",
    address: str | None = None,
    check_data: bool = True,
) -> AblationResult:
    """Plan (unless given), check and execute an ablation; results go to ``out_dir``.

    Args:
        spec: the ablation.
        out_dir: the output directory.
        planned: pre-planned runs (e.g. with ``--set`` overrides already applied).
        resume: skip finished runs of a previous invocation.
        overwrite: start again in a directory that holds results.
        workers: parallel worker processes (default: ``spec.workers``).
        quiet: no progress bars.
        backend: ``local`` or ``ray``.
        address: Ray cluster address.
        check_data: run :func:`preflight` first.

    Returns:
        The :class:`AblationResult`.

    Raises:
        SpecError: bad input, before any run starts.
    """
    from qlrlab.engine.specs import plan_ablation

    runs = list(planned) if planned is not None else plan_ablation(spec)
    if check_data:
        preflight([p.spec for p in runs])
    store = prepare_output(out_dir, resume=resume, overwrite=overwrite, kind="ablation")
    try:
        store.add_entries(
            [{"hash": p.hash, "labels": p.labels} for p in runs],
            replace=True,
            kind="ablation",
            name=spec.name,
            spec=spec.model_dump(mode="json"),
        )
        return execute_planned(
            runs,
            store,
            workers=workers or spec.workers,
            threads_per_worker=spec.threads_per_worker,
            pin_cpus=spec.pin_cpus,
            quiet=quiet,
            backend=backend,
            address=address,
            desc=spec.name,
        )
    finally:
        store.lock.release()
