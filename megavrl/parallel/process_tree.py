"""No process outlives the job: parent-death signals, sub-reaping and killing what is left.

Linux only (``prctl``); elsewhere these are no-ops that return False.
- :func:`set_parent_death_signal`: this process gets ``sig`` when its parent dies (a worker whose
  torchrun was killed with -9 gets SIGTERM and checkpoints; a vLLM engine process whose trainer
  died gets SIGKILL).
- :func:`become_subreaper`: orphaned descendants are re-parented to this process instead of init,
  so the launcher can find and end them after its job.
- :func:`kill_descendants`: SIGKILL every process below this one.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

from megavrl.log import get_logger

log = get_logger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_parent_death_signal(sig: int = signal.SIGTERM, expected_parent: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits.

    expected_parent: the parent's pid as seen before; if the parent is already gone (we were
        re-parented before the call), ``sig`` is raised at once, closing the race.
    Safe in a ``preexec_fn`` (no allocation beyond ctypes' call).
    """
    ok = _prctl(_PR_SET_PDEATHSIG, int(sig))
    if ok and expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)
    return ok


def detach_from_job_signals() -> None:
    """For a helper process of a megavrl process (vLLM's engine): leave the process group, so that a
    signal sent to the job's group (torchrun's SIGTERM to each worker's group, Ctrl-C) reaches only
    the megavrl process, which then stops its helpers in order; and die with the parent."""
    set_parent_death_signal(signal.SIGKILL)
    try:
        os.setpgid(0, 0)
    except OSError:
        pass


def become_subreaper() -> bool:
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def descendants(pid: int | None = None) -> list[int]:
    """Pids of every process below ``pid`` (default: this process), children first."""
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid or os.getpid()).children(recursive=True)]
    except psutil.Error:
        return []


def kill_descendants(pid: int | None = None, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to every descendant of ``pid`` (default: this process); returns their pids."""
    killed = []
    for child in descendants(pid):
        try:
            os.kill(child, sig)
            killed.append(child)
        except ProcessLookupError:
            pass
    return killed


def reap_children() -> None:
    """Collect exited children (after :func:`kill_descendants`) so none stays a zombie."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
