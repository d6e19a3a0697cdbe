"""init_distributed under torchrun (TP=2, PP=2), single-process, refusals and the launcher."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.parallel.torchrun import REPO_ROOT, run_torchrun


@pytest.mark.distributed
def test_tp2_all_reduce_and_pp2_send_recv():
    """2 processes: an all-reduce over the TP group sums 1 + 2 = 3, Megatron's TP reduce and RNG
    tracker work (TP ranks draw different model-parallel streams); then, re-laid out as PP=2,
    a send/recv between stages and Megatron's P2PCommunicator deliver the exact tensors."""
    proc = run_torchrun(["-m", "tests.parallel.dist_worker", "tp2", "pp2"], nproc=2, timeout=240)
    out = proc.stdout
    assert out.count("OK tp2") == 2 and out.count("OK pp2") == 2, out
    assert "sum=3.0" in out
    assert "CPU mode" in proc.stderr  # the one log line of the CPU redirections


def test_single_process_without_torchrun():
    """No RANK in the environment: a world of one, then torn down twice without error."""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-m", "tests.parallel.dist_worker", "single"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK single" in proc.stdout


def test_refuses_world_not_divisible_by_tp_times_pp():
    import torch.distributed as dist

    from megavrl.parallel import check_parallel_sizes, init_distributed

    assert check_parallel_sizes(8, 2, 2) == 2
    with pytest.raises(ValueError, match=r"world_size=3 is not divisible by tensor_model_parallel_size=2 x "
                                         r"pipeline_model_parallel_size=1 = 2"):
        check_parallel_sizes(3, 2, 1)
    # A single process asked for TP=2 is refused before anything is initialised.
    with pytest.raises(ValueError, match="world_size=1 is not divisible"):
        init_distributed(tp=2, pp=1)
    assert not dist.is_initialized()


def test_ensure_launched(monkeypatch):
    from megavrl.parallel import launch

    calls = []
    monkeypatch.setattr(launch, "supervise", lambda cmd, env, **kw: calls.append((cmd, env, kw)) or 0)
    monkeypatch.setenv("RANK", "0")
    assert launch.ensure_launched(2, ["-m", "megavrl.cli", "check-parity"]) is None  # under torchrun
    monkeypatch.delenv("RANK")
    assert launch.ensure_launched(1, ["-m", "megavrl.cli", "check-parity"]) is None  # one process
    assert launch.ensure_launched(4, ["-m", "megavrl.cli", "check-parity", "--tp", "2"]) == 0
    assert launch.ensure_launched(2, ["-m", "megavrl.cli", "train"], grace_s=89.5, status_file="s.json") == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    assert [c[0] for c in calls] == [torchrun + ["4", "--module", "megavrl.cli", "check-parity", "--tp", "2"],
                                     torchrun + ["2", "--shutdown-timeout", "90", "--module", "megavrl.cli", "train"]]
    assert calls[1][1]["MEGAVRL_LAUNCHER"] == "1" and calls[1][2] == {"grace_s": 89.5, "status_file": "s.json"}
