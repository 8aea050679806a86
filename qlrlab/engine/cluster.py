"""What a Ray job carries to the cluster, and the check of every node before trials start.

A Ray worker runs with the environment its node was started with, not the driver's. Everything
the driver resolved that a run needs therefore travels *with the job*
(:func:`job_environment`): the data directory, the download mirror, the ``--plugin`` modules,
the torch thread count, and the driver's qlrlab and torch versions. Worker functions apply it
with :func:`apply_job_environment` before they build anything.

Before the first trial, :func:`check_cluster` runs :func:`probe_node` once on every alive node
and turns what it finds into one :class:`~qlrlab.engine.specs.SpecError` (exit code 2 from the
command line) that names the node (IP and host name) and the path or version at fault:

* a different qlrlab version or source (a different checkout), torch version or Python version;
* a dataset file the node cannot read under the data directory sent from the driver;
* a ``--plugin`` that does not import there;
* an output directory the node cannot see (results are written by the workers, so the output
  directory must be on a file system shared by every node, at the same path).
"""

from __future__ import annotations

import hashlib
import os
import platform
import socket
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qlrlab.engine.specs import RunSpec, SpecError

__all__ = [
    "JOB_KEYS",
    "apply_job_environment",
    "check_cluster",
    "compare_nodes",
    "job_environment",
    "node_label",
    "probe_node",
    "source_digest",
]

#: Environment variables that travel with a job (driver → every worker).
JOB_KEYS = (
    "QLRLAB_DATA",
    "QLRLAB_MIRROR",
    "QLRLAB_PLUGINS",
    "OMP_NUM_THREADS",
    "QLRLAB_DRIVER_VERSION",
    "QLRLAB_DRIVER_TORCH",
)

_DIGEST: str | None = None


def source_digest() -> str:
    """SHA-256 (first 12 hex digits) of the imported qlrlab package's ``.py`` files: two
    checkouts with the same version but different code differ here."""
    global _DIGEST
    if _DIGEST is None:
        import qlrlab

        root = Path(qlrlab.__file__).resolve().parent
        h = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
        _DIGEST = h.hexdigest()[:12]
    return _DIGEST


def job_environment(threads: int = 1) -> dict[str, str]:
    """The environment a Ray job carries, as resolved on the driver.

    Args:
        threads: torch intra-op threads per worker.

    Returns:
        ``QLRLAB_DATA`` (the driver's resolved data directory, whether it came from
        ``$QLRLAB_DATA``, :func:`qlrlab.data.set_default_data_dir` or the default cache),
        ``QLRLAB_MIRROR`` and ``QLRLAB_PLUGINS`` when set, ``OMP_NUM_THREADS``, and the
        driver's qlrlab and torch versions.
    """
    import torch

    import qlrlab
    from qlrlab.data.download import MIRROR_ENV_VAR
    from qlrlab.data.paths import get_data_dir
    from qlrlab.plugins import ENV_VAR as PLUGINS

    env = {
        "QLRLAB_DATA": str(get_data_dir()),
        "OMP_NUM_THREADS": str(max(1, int(threads))),
        "QLRLAB_DRIVER_VERSION": f"{qlrlab.__version__}+{source_digest()}",
        "QLRLAB_DRIVER_TORCH": str(torch.__version__),
    }
    for key in (MIRROR_ENV_VAR, PLUGINS):
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env


def apply_job_environment(env: Mapping[str, str]) -> None:
    """Make a worker process use the driver's settings (environment, torch threads, plugins).

    Variables the driver did not set are removed, so a worker never falls back on the value its
    node was started with.
    """
    import torch

    from qlrlab.plugins import load_plugins_from_env

    for key in JOB_KEYS:
        if key in env:
            os.environ[key] = str(env[key])
        else:
            os.environ.pop(key, None)
    torch.set_num_threads(max(1, int(env.get("OMP_NUM_THREADS", "1"))))
    load_plugins_from_env()


def node_label() -> str:
    """``IP (host name)`` of this process's node."""
    host = socket.gethostname()
    try:
        import ray

        ip = ray.util.get_node_ip_address()
    except Exception:  # outside Ray, or Ray cannot tell
        ip = "?"
    return f"{ip} ({host})"


def probe_node(
    env: Mapping[str, str], tasks: Sequence[Mapping[str, Any]], out_dir: str, token: str
) -> dict[str, Any]:
    """What this node has: versions, and whether it can read the data and see the output.

    Args:
        env: the job environment (:func:`job_environment`).
        tasks: the distinct ``task`` blocks of the runs to come.
        out_dir: the output directory.
        token: the name of a file the driver wrote in ``out_dir``.

    Returns:
        ``node``, ``qlrlab``, ``torch``, ``python`` and ``problems`` (messages naming the path
        and the fix).
    """
    import torch

    import qlrlab
    from qlrlab.data.paths import get_data_dir
    from qlrlab.tasks import TASKS

    problems: list[str] = []
    try:
        apply_job_environment(env)
    except ImportError as exc:  # a --plugin that does not import here
        problems.append(f"plugin: {exc}")
    data_dir = get_data_dir()
    for task in tasks:
        spec = TASKS.validate(dict(task))
        where = spec.data_dir or str(data_dir)
        try:
            check = getattr(spec, "check_data", None)
            if callable(check):
                check()
            else:
                spec.build("cpu")
        except OSError as exc:
            fname = getattr(exc, "filename", None)
            problems.append(
                f"task {task.get('name')}: cannot read "
                f"{fname or 'its data'} (data directory {where}): {type(exc).__name__}: {exc}"
            )
    if not (Path(out_dir) / token).is_file():
        problems.append(
            f"cannot see the output directory {out_dir} (results are written there by the "
            "workers): put it on a file system every node mounts at the same path"
        )
    return {
        "node": node_label(),
        "qlrlab": f"{qlrlab.__version__}+{source_digest()}",
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "problems": problems,
    }


def compare_nodes(driver: Mapping[str, str], reports: Sequence[Mapping[str, Any]]) -> list[str]:
    """The problems of every node: its own, and versions that differ from the driver's.

    Args:
        driver: ``qlrlab``, ``torch`` and ``python`` of the driver.
        reports: :func:`probe_node` results.

    Returns:
        One message per problem, each starting with the node's IP and host name.
    """
    out: list[str] = []
    for rep in reports:
        node = rep["node"]
        for key in ("qlrlab", "torch", "python"):
            if rep.get(key) != driver[key]:
                out.append(
                    f"node {node}: {key} {rep.get(key)} differs from the driver's {driver[key]}"
                )
        out.extend(f"node {node}: {p}" for p in rep.get("problems", []))
    return out


def check_cluster(
    env: Mapping[str, str], specs: Sequence[RunSpec], out_dir: str | Path, timeout: float = 300
) -> list[dict[str, Any]]:
    """Probe every alive node of the connected Ray cluster before any trial starts.

    Args:
        env: the job environment.
        specs: the runs to come (their distinct tasks are checked).
        out_dir: the output directory (every node must see it).
        timeout: seconds to wait for the probes.

    Returns:
        The probe reports.

    Raises:
        SpecError: a node differs from the driver or cannot reach the data or the output
            directory; the message names each node and what is wrong.
    """
    import json

    import ray
    import torch
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    import qlrlab

    tasks: dict[str, dict[str, Any]] = {}
    for s in specs:
        tasks.setdefault(json.dumps(s.task, sort_keys=True), dict(s.task))
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    token = f".node-check-{uuid.uuid4().hex}"
    (out / token).write_text("qlrlab\n", encoding="utf-8")
    try:
        remote = ray.remote(num_cpus=0, max_retries=0)(probe_node)
        refs = [
            remote.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(dict(env), list(tasks.values()), str(out), token)
            for node in ray.nodes()
            if node.get("Alive")
        ]
        try:
            reports = ray.get(refs, timeout=timeout)
        except ray.exceptions.RayError as exc:
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            raise SpecError(
                f"a cluster node could not run qlrlab's check: {lines[-1] if lines else exc}",
                fix="install qlrlab and torch on every node, in the Python the cluster runs",
            ) from None
    finally:
        (out / token).unlink(missing_ok=True)
    driver = {
        "qlrlab": f"{qlrlab.__version__}+{source_digest()}",
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }
    problems = compare_nodes(driver, reports)
    if problems:
        raise SpecError(
            "the Ray cluster cannot run these runs:\n  " + "\n  ".join(problems),
            fix="install the driver's qlrlab and torch versions on every node; put the data "
            "under the data directory named above on every node (or set task.data_dir); put "
            "the output directory on a shared file system",
        )
    return reports
