"""Tie a spawned ablation worker's life to its coordinator (standard library only).

The coordinator of a local ablation sets :data:`ENV_VAR` to its pid while it spawns its worker
processes. :func:`guard_worker` runs first thing when such a worker imports qlrlab, before the
slow imports (torch; this module is the first that ``qlrlab/__init__.py`` imports, and calls it
when imported): on Linux it asks the kernel to send the worker SIGTERM when the
coordinator dies (``PR_SET_PDEATHSIG``), then checks that the coordinator is still its parent,
and exits at once if it is not (a coordinator SIGKILLed while its workers were starting). The
worker leaves Ctrl-C (SIGINT) to the coordinator, which stops the workers itself.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["ENV_VAR", "coordinator_pid", "guard_worker"]

#: Environment variable holding the coordinator's pid in the workers it spawns.
ENV_VAR = "QLRLAB_COORDINATOR_PID"

_PR_SET_PDEATHSIG = 1
_coordinator: int | None = None


def coordinator_pid() -> int | None:
    """The pid of this worker's coordinator (``None`` outside ablation workers)."""
    return _coordinator


def _set_parent_death_signal(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def guard_worker() -> None:
    """Called when qlrlab is imported: a no-op unless this process is an ablation worker."""
    global _coordinator
    pid = os.environ.pop(ENV_VAR, None)  # not inherited by the worker's own children
    if not pid or not pid.isdigit():
        return
    _coordinator = int(pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != _coordinator:  # the coordinator died before this line
        os._exit(143)


guard_worker()
