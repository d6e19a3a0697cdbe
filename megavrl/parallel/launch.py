"""Run a multi-process command standalone: re-execute it under torchrun when needed.

A command such as ``megavrl check-parity --tp 2`` needs ``tp * pp`` processes. Typed in a shell
(no ``RANK`` in the environment), it calls ``ensure_launched(nproc, argv)``, which starts
``python -m torch.distributed.run --standalone --nproc-per-node nproc <argv>`` and returns the
exit code for the caller to return. Started by torchrun (``RANK`` set), or with ``nproc == 1``,
it returns None and the caller goes on in this process.
"""
from __future__ import annotations

import os
import subprocess
import sys

from megavrl.log import get_logger

log = get_logger(__name__)


def cli_argv() -> list[str]:
    """The arguments that re-run the current ``megavrl`` command line: ``-m megavrl.cli ...``."""
    return ["-m", "megavrl.cli", *sys.argv[1:]]


def ensure_launched(nproc: int, argv: list[str] | None = None) -> int | None:
    """Re-execute under torchrun with ``nproc`` processes unless already launched.

    argv: what follows ``python`` for one worker, e.g. ``["-m", "megavrl.cli", "check-parity",
        "--tp", "2"]`` or ``["script.py", "--flag"]``; default :func:`cli_argv`.
    Returns None when the caller should do the work in this process (under torchrun, or
    nproc == 1), else the exit code of the torchrun job (0 when every worker succeeded).
    """
    if "RANK" in os.environ or nproc <= 1:
        return None
    argv = cli_argv() if argv is None else list(argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    if argv and argv[0] == "-m":  # torchrun runs a module with --module, not python's -m
        cmd += ["--module", *argv[1:]]
    else:
        cmd += argv
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(cmd, env=env).returncode
