"""Run a multi-process command standalone: re-execute it under torchrun when needed.

A command such as ``megavrl check-parity --tp 2`` needs ``tp * pp`` processes. Typed in a shell
(no ``RANK`` in the environment), it calls ``ensure_launched(nproc, argv)``, which starts
``python -m torch.distributed.run --standalone --nproc-per-node nproc <argv>`` and returns the
exit code for the caller to return. Started by torchrun (``RANK`` set), or with ``nproc == 1``,
it returns None and the caller goes on in this process.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

from megavrl.log import get_logger

log = get_logger(__name__)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
"""The signals that stop a run after a checkpoint (Slurm, scancel, torchrun, Ctrl-C)."""

EXIT_INTERRUPTED = 75
"""Exit status of a run stopped by SIGTERM/SIGHUP/SIGUSR1 after saving a complete checkpoint
(EX_TEMPFAIL: "try again later"). Slurm sites can requeue on it with ``RequeueExit=75``. Ctrl-C
(SIGINT) gives the shell's usual 130."""


def exit_code_for(signum: int | None) -> int:
    """The exit status of a run interrupted by ``signum`` (after its checkpoint was written)."""
    return 130 if signum == signal.SIGINT else EXIT_INTERRUPTED


def interrupted_message(step: int, checkpoint: str | None) -> str:
    return (f"megavrl train: interrupted at step {step}; checkpoint {checkpoint} is complete. Run the same "
            f"command to resume (checkpoint.resume=auto).")


def cli_argv() -> list[str]:
    """The arguments that re-run the current ``megavrl`` command line: ``-m megavrl.cli ...``."""
    return ["-m", "megavrl.cli", *sys.argv[1:]]


def ensure_launched(nproc: int, argv: list[str] | None = None, *, grace_s: float | None = None,
                    status_file: str | os.PathLike | None = None) -> int | None:
    """Re-execute under torchrun with ``nproc`` processes unless already launched.

    argv: what follows ``python`` for one worker, e.g. ``["-m", "megavrl.cli", "check-parity",
        "--tp", "2"]`` or ``["script.py", "--flag"]``; default :func:`cli_argv`.
    grace_s: seconds torchrun gives its workers to stop after a signal (``--shutdown-timeout``).
    status_file: the ``run_status.json`` the job writes (training); an interrupted run then exits
        with :data:`megavrl.rl.preemption.EXIT_INTERRUPTED` (130 after Ctrl-C).
    Returns None when the caller should do the work in this process (under torchrun, or
    nproc == 1), else the exit code of the torchrun job (0 when every worker succeeded).
    """
    if "RANK" in os.environ or nproc <= 1:
        return None
    argv = cli_argv() if argv is None else list(argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    if grace_s is not None:
        cmd += ["--shutdown-timeout", str(max(1, math.ceil(grace_s)))]
    if argv and argv[0] == "-m":  # torchrun runs a module with --module, not python's -m
        cmd += ["--module", *argv[1:]]
    else:
        cmd += argv
    log.info("launching %d processes: %s", nproc, " ".join(cmd))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MEGAVRL_LAUNCHER"] = "1"
    return supervise(cmd, env, grace_s=grace_s, status_file=status_file)


def supervise(cmd: list[str], env: dict, *, grace_s: float | None = None,
              status_file: str | os.PathLike | None = None) -> int:
    """Run torchrun ``cmd`` and make sure that nothing outlives this process.

    - torchrun runs in its own session, with a parent-death signal: if this process is killed
      (even with -9), torchrun gets SIGTERM and stops its workers the graceful way.
    - SIGTERM, SIGINT (Ctrl-C), SIGHUP and SIGUSR1 received here are forwarded once, to the
      workers (see :func:`_forward`); they checkpoint and exit. A second Ctrl-C kills the job at once.
    - This process is a child subreaper: processes orphaned below it (a vLLM engine whose worker
      died) come back to it and are killed when torchrun has exited, or when it has not exited
      ``grace_s`` + 30 s after the signal.
    """
    import time

    from megavrl.parallel.process_tree import become_subreaper, kill_descendants, reap_children, set_parent_death_signal

    become_subreaper()
    launcher = os.getpid()
    started = time.time()
    received: list[int] = []

    def on_signal(signum, frame):
        if received and signum == signal.SIGINT == received[0]:
            log.warning("second Ctrl-C: killing the job without waiting for its checkpoint")
            kill_descendants()
            os._exit(130)
        if received:
            return
        received.append(signum)
        log.warning("received %s: asking the workers to save a checkpoint and stop (within %s s)",
                    signal.Signals(signum).name, f"{grace_s:g}" if grace_s else "torchrun's shutdown timeout")
        if proc is not None:
            _forward(proc, signum)

    proc = None
    previous = {sig: signal.signal(sig, on_signal) for sig in STOP_SIGNALS}
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                                preexec_fn=lambda: set_parent_death_signal(signal.SIGTERM, expected_parent=launcher))
        if received:  # a signal arrived while starting
            _forward(proc, received[0])
        deadline = None
        while True:
            try:
                rc = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                pass
            if received and deadline is None:
                deadline = time.monotonic() + (grace_s or 30) + 30
            if deadline is not None and time.monotonic() > deadline:
                log.error("the job did not stop within %.0f s of the signal: killing it", (grace_s or 30) + 30)
                kill_descendants()
        leftovers = kill_descendants()
        reap_children()
        if leftovers:
            log.info("ended %d helper process(es) left behind by the job", len(leftovers))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    status = _read_status(status_file, since=started)
    if status is not None and status.get("status") == "interrupted":
        print(interrupted_message(status.get("step"), status.get("checkpoint")), file=sys.stderr, flush=True)
        return exit_code_for(received[0] if received else status.get("signal"))
    if received and rc != 0:
        log.error("the job was stopped by %s before it could save a checkpoint", signal.Signals(received[0]).name)
    return rc


def _forward(torchrun: subprocess.Popen, signum: int) -> None:
    """Hand a stop signal to the workers themselves: they checkpoint and exit 0, and torchrun,
    whose workers all succeeded, exits 0 too. (Signalled itself, torchrun would end with a
    traceback and a failure status whatever the workers did.) Before the workers exist, torchrun
    gets it. SIGUSR1, which torchrun does not handle, is sent as SIGTERM."""
    import psutil

    if torchrun.poll() is not None:
        return
    try:
        targets = [w.pid for w in psutil.Process(torchrun.pid).children()]
    except psutil.Error:
        targets = []
    if not targets:
        targets, signum = [torchrun.pid], signal.SIGTERM if signum == signal.SIGUSR1 else signum
    for pid in targets:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _read_status(path, since: float) -> dict | None:
    import json

    if path is None:
        return None
    try:
        if os.path.getmtime(path) < since - 1:
            return None  # an earlier run's
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
