"""Graceful stop on SIGTERM/SIGINT (Slurm preemption, ``scancel``, Ctrl-C).

The handler only records that a stop was asked for; the trainer checks :meth:`should_stop` at a
step boundary, where every rank agrees on the answer (an all-reduce of the flag), saves a
checkpoint and exits cleanly. A second signal of the same kind restores the default behaviour,
so a stuck run can still be killed.
"""
from __future__ import annotations

import signal

import torch

from megavrl.log import get_logger

log = get_logger(__name__)


class PreemptionHandler:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.received is not None:  # second signal: stop waiting for the step to end
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received = signum
        log.warning("received %s: finishing this step, saving a checkpoint and exiting",
                    signal.Signals(signum).name)

    def should_stop(self) -> bool:
        """True on every rank if any rank received a signal (collective when distributed)."""
        flag = torch.tensor([1 if self.received is not None else 0], dtype=torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
