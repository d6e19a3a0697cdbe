"""Graceful stop on the signals clusters send (Slurm preemption, ``scancel``, torchrun, Ctrl-C).

How a stop reaches the trainer:
- Slurm/``scancel``: SIGTERM to every process of the job (near the time limit, what the sbatch
  script asks for with ``--signal``); SIGKILL after ``KillWait``.
- torchrun: SIGTERM (or the signal it got itself) to each worker's whole process group, which
  also holds the worker's children (vLLM's engine processes, checkpoint writers); SIGKILL after
  ``--shutdown-timeout`` seconds.
- ``megavrl train`` started by hand: the launcher forwards what it receives (Ctrl-C included) to
  torchrun, see :mod:`megavrl.parallel.launch`.

The handler only records the signal and the time; the trainer asks :meth:`should_stop` at step
boundaries and after the rollout of a step (collectively: every rank agrees), then saves a
checkpoint and exits. A step whose update has not started is abandoned and saved as it was
before it began (exact resume repeats it); one whose update has started is finished first.

Children are kept out of the way: checkpoint writers are forked with the stop signals blocked
(:func:`signals_blocked`), so the signal that reaches the whole process group cannot kill a save
half-way; the rollout engine may die from the group signal, which only abandons the step in
flight. A watchdog enforces ``trainer.preemption_grace_s``: a process still alive that long after
the first signal kills its children and exits, leaving the previous complete checkpoint. Later
signals are ignored (``scancel`` and torchrun each deliver a SIGTERM), except a second Ctrl-C,
which ends the process at once.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

import torch

from megavrl.log import get_logger
from megavrl.parallel.collectives import collective_device
# Which signals stop a run and its exit status are job-level facts that the launcher reports too.
from megavrl.parallel.launch import EXIT_INTERRUPTED, STOP_SIGNALS, exit_code_for  # noqa: F401 (re-exported)

log = get_logger(__name__)


class StopRequested(BaseException):
    """Raised in the main thread when a stop signal arrives inside :meth:`PreemptionHandler.interruptible`.

    A BaseException (like KeyboardInterrupt), so that library code catching ``Exception`` does not
    swallow it."""


class PreemptionHandler:
    """Context manager: records the first stop signal; enforces the grace period after it.

    grace_s: seconds from the first signal to a hard exit (children killed, status 1), or None
        for no watchdog (tests).
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS, grace_s: float | None = None):
        self.signals = signals
        self.grace_s = grace_s
        self.received: int | None = None
        self.received_at: float | None = None
        self._previous: dict[int, object] = {}
        self._watchdog: threading.Timer | None = None
        self._interruptible = False

    def __enter__(self):
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._watchdog is not None:
            self._watchdog.cancel()
        return False

    def _handle(self, signum, frame):
        if self.received is not None:
            if signum == signal.SIGINT == self.received:  # Ctrl-C twice: stop waiting for the step to end
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)
            return  # Slurm and torchrun may each deliver a SIGTERM: the first one counts
        self.received, self.received_at = signum, time.monotonic()
        log.warning("received %s: finishing or abandoning this step, then saving a checkpoint and exiting%s",
                    signal.Signals(signum).name,
                    f" (within trainer.preemption_grace_s={self.grace_s:g} s)" if self.grace_s else "")
        if self.grace_s:
            self._watchdog = threading.Timer(self.grace_s, self._grace_expired)
            self._watchdog.daemon = True
            self._watchdog.start()
        if self._interruptible:
            self._interruptible = False
            raise StopRequested(signal.Signals(signum).name)

    @contextmanager
    def interruptible(self):
        """A section that a stop signal ends at once with :class:`StopRequested` (work that can be
        thrown away, such as sampling the rollouts of a step that has not updated anything: the
        engine may have been killed by the same signal, and waiting for it would hang)."""
        if self.received is not None:
            raise StopRequested(signal.Signals(self.received).name)
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def _grace_expired(self) -> None:
        from megavrl.parallel.process_tree import kill_descendants

        log.error("no checkpoint within trainer.preemption_grace_s=%g s of the signal: exiting without one "
                  "(the previous complete checkpoint is kept; raise trainer.preemption_grace_s, and the "
                  "scheduler's grace, above one step plus one save)", self.grace_s)
        kill_descendants()
        os._exit(1)

    @property
    def seconds_since_signal(self) -> float | None:
        return None if self.received_at is None else time.monotonic() - self.received_at

    def should_stop(self) -> bool:
        """True on every rank if any rank received a signal (collective when distributed)."""
        device = collective_device()
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


@contextmanager
def signals_blocked(signals: tuple[int, ...] = STOP_SIGNALS):
    """Block ``signals`` in this thread for the duration; children forked meanwhile (Megatron's
    checkpoint writers) inherit the blocked mask and so survive a signal sent to the whole process
    group. A signal that arrives meanwhile is delivered when the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
