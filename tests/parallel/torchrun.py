"""Run a script or module under torchrun from a test: ``run_torchrun(["-m", "tests.x.worker"], 2)``.

Workers run from the repository root with it on ``PYTHONPATH`` (so ``tests.*`` modules import),
one thread each (the CI machine has 2 cores), on a free local port. The result is the
``subprocess.CompletedProcess`` with text stdout/stderr; ``check=True`` (default) fails the test
with the tail of both streams when any worker exits non-zero.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(args: list[str], nproc: int = 2, timeout: float = 300, check: bool = True,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``torchrun --nproc-per-node nproc <args>``; args is ``["-m", "module", ...]`` or
    ``["path/to/script.py", ...]``. Raises AssertionError (check=True) on a non-zero exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    if args and args[0] == "-m":
        cmd += ["--module", *args[1:]]
    else:
        cmd += list(args)
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    full_env["OMP_NUM_THREADS"] = "1"
    full_env.setdefault("MEGAVRL_LOG_ALL_RANKS", "1")
    full_env.pop("RANK", None)
    full_env.update(env or {})
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} exited {proc.returncode}\n--- stdout ---\n"
                             f"{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-12000:]}")
    return proc
