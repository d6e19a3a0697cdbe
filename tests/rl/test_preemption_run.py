"""A training run stops cleanly on SIGTERM (Slurm preemption): it finishes the step, saves a
checkpoint and exits with status 0; the launch script runs as-is on one CPU node."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def sft_overrides(tmp_path_factory, tiny_hf_dir):
    from megavrl.data.synth import SynthSettings, write_synthetic_dataset

    data = tmp_path_factory.mktemp("sftdata")
    write_synthetic_dataset(str(data), SynthSettings(n=6, seed=2, seconds=6.0), workers=1)
    return [f"model.hf_dir={tiny_hf_dir}", "algorithm.name=sft", "data.val=[]",
            f"data.train=[{{json_path: {data}/train.jsonl, data_folder: {data}}}]",
            "data.video.fps=1.0", "data.video.min_pixels=3136", "data.video.max_pixels=25088",
            "trainer.prompts_per_step=2", "trainer.micro_batch_size=2", "checkpoint.export_hf_at_end=false"]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, sft_overrides):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "megavrl.cli", "train", "--config", str(REPO / "examples/configs/tiny_cpu_tvg.yaml"),
           *sft_overrides, "trainer.total_steps=1000", f"trainer.output_dir={out}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "tensorboard" / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(1)
    # Like Slurm, signal every task: the workers are torchrun's children.
    torchrun = _children(proc.pid)
    workers = [w for t in torchrun for w in _children(t)]
    assert len(workers) == 2
    for w in workers:
        os.kill(w, signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log[-3000:]
    assert "saving a checkpoint" in log
    steps = sorted((out / "checkpoints").glob("step_*"))
    assert steps, log[-2000:]
    saved = json.loads((steps[-1] / "megavrl_checkpoint.json").read_text())
    assert 2 <= saved["step"] < 1000


def test_torchrun_launch_script_runs_on_one_cpu_node(tmp_path, sft_overrides):
    # torchrun from this environment's bin directory, as after `source .venv/bin/activate`
    env = {**os.environ, "NPROC_PER_NODE": "2", "MASTER_PORT": str(29500 + os.getpid() % 1000),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(REPO / "examples/torchrun/train_grpo.sh"), *sft_overrides,
                          "trainer.total_steps=1", f"trainer.output_dir={tmp_path / 'run'}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_00000001" / "megavrl_checkpoint.json").is_file()
