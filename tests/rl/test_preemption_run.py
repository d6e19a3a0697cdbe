"""Long jobs through the real entry points: ``megavrl train`` (which supervises torchrun), SIGTERM
delivered the ways clusters deliver it, Ctrl-C, and kill -9 of the whole job at chosen moments.

Every case checks what a user relies on: a complete checkpoint, ``run_status.json``, the exit
status, no process of the job left alive, and (kill -9) that the resumed run logs exactly what an
uninterrupted run logs, step by step and scalar by scalar.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "examples/configs/tiny_cpu_tvg.yaml")
pytestmark = [pytest.mark.slow, pytest.mark.distributed]
GRACE_S = 60


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory, tiny_hf_dir):
    from megavrl.data.synth import SynthSettings, write_synthetic_dataset

    data = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(str(data), SynthSettings(n=8, seed=2, seconds=6.0), workers=1)
    return [f"model.hf_dir={tiny_hf_dir}", "data.val=[]",
            f"data.train=[{{json_path: {data}/train.jsonl, data_folder: {data}}}]",
            "data.video.fps=1.0", "data.video.min_pixels=3136", "data.video.max_pixels=25088",
            "trainer.prompts_per_step=2", "trainer.micro_batch_size=2", "checkpoint.export_hf_at_end=false",
            f"trainer.preemption_grace_s={GRACE_S}"]


SFT = ["algorithm.name=sft"]
GRPO = ["algorithm.name=grpo", "rollout.n=2", "rollout.max_new_tokens=16", "rollout.cpu_kv_cache_mb=128"]


class Job:
    """``megavrl train`` started the way a user starts it; its process tree is tracked."""

    def __init__(self, out: Path, overrides: list[str]):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.log_path = out.parent / f"{out.name}-{int(time.time() * 1000)}.log"
        self.log = open(self.log_path, "w")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "megavrl.cli", "train", "--config", CONFIG, *overrides,
                                      f"trainer.output_dir={out}"], stdout=self.log, stderr=subprocess.STDOUT,
                                     env=env, cwd=REPO)
        self.seen: set[int] = {self.proc.pid}

    def processes(self) -> list[psutil.Process]:
        """The launcher and everything below it (torchrun, workers, vLLM engines)."""
        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.Error:
            return []
        self.seen.update(p.pid for p in procs)
        return procs

    def role(self, name: str) -> list[psutil.Process]:
        out = []
        for p in self.processes():
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:
                continue
            if name == "torchrun" and "torch.distributed.run" in cmd:
                out.append(p)
            elif name == "worker" and "torch.distributed.run" not in cmd and "megavrl.cli" in cmd \
                    and p.pid != self.proc.pid and "--multiprocessing-fork" not in cmd:
                out.append(p)
        return out

    def metrics_lines(self) -> int:
        path = self.out / "tensorboard" / "metrics.jsonl"
        return path.read_text().count("\n") if path.is_file() else 0

    def wait_for(self, condition, timeout: float = 400, poll: float = 0.5):
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.processes()
            if condition():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(poll)
        raise AssertionError(f"timed out; log tail:\n{self.text()[-3000:]}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.log.flush()

    def text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def alive(self) -> list[int]:
        alive = []
        for pid in self.seen:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        return alive

    def kill_all(self) -> None:
        """kill -9 of every process of the job at once (a node failure, the OOM killer)."""
        for p in self.processes():
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait(timeout=60)


def status_of(out: Path) -> dict:
    return json.loads((out / "run_status.json").read_text())


def assert_stopped_with_checkpoint(job: Job, rc: int, expected_rc: int) -> dict:
    text = job.text()
    assert rc == expected_rc, text[-4000:]
    status = status_of(job.out)
    assert status["status"] == "interrupted" and status["step"] >= 1, status
    ckpt = Path(status["checkpoint"])
    marker = json.loads((ckpt / "megavrl_checkpoint.json").read_text())
    assert marker["step"] == status["step"] and (ckpt / "dist" / ".metadata").is_file()
    assert not list((job.out / "checkpoints").glob(".tmp-*"))
    assert f"interrupted at step {status['step']}; checkpoint {ckpt} is complete" in text
    time.sleep(1)
    assert job.alive() == [], "processes of the job still alive"
    return status


@pytest.mark.vllm
@pytest.mark.parametrize("delivery", ["launcher", "torchrun", "every-process"])
def test_sigterm_during_grpo_leaves_a_complete_checkpoint(tmp_path, data_overrides, delivery):
    """SIGTERM to the launcher (a user, a supervisor), to torchrun (what the torchrun scripts get
    from Slurm), or to every process of the job (scancel): the step in flight is finished or
    abandoned, a complete checkpoint is written, every process is gone, exit status 75."""
    job = Job(tmp_path / "run", data_overrides + GRPO + ["trainer.total_steps=1000", "checkpoint.save_every=0"])
    job.wait_for(lambda: job.metrics_lines() >= 1 and len(job.role("worker")) == 2)
    time.sleep(random.Random(delivery).uniform(0.0, 2.0))  # somewhere in the next step
    targets = {"launcher": [job.proc.pid], "torchrun": [p.pid for p in job.role("torchrun")],
               "every-process": [p.pid for p in job.processes()]}[delivery]
    assert targets
    for pid in targets:
        os.kill(pid, signal.SIGTERM)
    t0 = time.time()
    rc = job.wait(timeout=GRACE_S + 60)
    assert time.time() - t0 < GRACE_S
    assert_stopped_with_checkpoint(job, rc, expected_rc=75)
    if delivery != "every-process":  # the hardest case resumes; the others leave the same files
        return
    again = Job(tmp_path / "run", data_overrides + GRPO + ["trainer.total_steps=" + str(status_of(job.out)["step"] + 1)])
    assert again.wait(timeout=600) == 0, again.text()[-3000:]
    assert status_of(job.out)["status"] == "completed"


def test_ctrl_c_exits_cleanly_with_one_line(tmp_path, data_overrides):
    job = Job(tmp_path / "run", data_overrides + SFT + ["trainer.total_steps=1000"])
    job.wait_for(lambda: job.metrics_lines() >= 2)
    os.kill(job.proc.pid, signal.SIGINT)  # what the terminal sends to the foreground launcher
    rc = job.wait(timeout=GRACE_S + 60)
    assert_stopped_with_checkpoint(job, rc, expected_rc=130)
    text = job.text()
    assert "KeyboardInterrupt" not in text and "Traceback" not in text, text[-3000:]


def test_no_worker_outlives_a_killed_launcher(tmp_path, data_overrides):
    """kill -9 of the launcher: torchrun gets SIGTERM from the kernel (parent-death signal) and
    stops its workers the graceful way; nothing keeps training into the directory."""
    job = Job(tmp_path / "run", data_overrides + SFT + ["trainer.total_steps=1000"])
    job.wait_for(lambda: job.metrics_lines() >= 2 and len(job.role("worker")) == 2)
    job.processes()
    os.kill(job.proc.pid, signal.SIGKILL)
    deadline = time.time() + GRACE_S
    while job.alive() and time.time() < deadline:
        time.sleep(0.5)
    assert job.alive() == [], "workers outlived their launcher"
    status = status_of(job.out)
    assert status["status"] == "interrupted"
    steps_then = job.metrics_lines()
    time.sleep(3)
    assert job.metrics_lines() == steps_then  # nobody trains any more


COMPUTED_SKIP = ("time",)
UNTIMED = ("time/", "throughput/", "memory/", "weight_sync/")  # measure the machine, not the computation


def computed_metrics(out: Path) -> list[dict]:
    from megavrl.run_metrics import read_metrics_jsonl

    rows = read_metrics_jsonl(out / "tensorboard" / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in COMPUTED_SKIP and not k.startswith(UNTIMED)} for r in rows]


def test_kill_9_of_the_whole_job_at_chosen_moments_then_resume_is_exact(tmp_path, data_overrides):
    """The whole job (launcher, torchrun, workers) killed with -9 five times: mid-step, while a
    checkpoint is being written, right after a checkpoint's rename, while a checkpoint is being
    loaded, and at a random moment; each time resumed with the same command. The final metrics
    equal an uninterrupted run's for every step and every logged scalar."""
    steps = 8
    overrides = data_overrides + SFT + [f"trainer.total_steps={steps}", "checkpoint.save_every=1",
                                        "checkpoint.keep_last=2", "optimizer.lr=1e-3"]
    reference = Job(tmp_path / "reference", overrides)
    assert reference.wait(timeout=600) == 0, reference.text()[-3000:]

    out = tmp_path / "killed"
    ckpts = out / "checkpoints"

    def complete_steps() -> set[int]:
        return {int(p.name[5:]) for p in ckpts.glob("step_*") if (p / "megavrl_checkpoint.json").is_file()}

    def loading(job: Job) -> bool:  # a worker has a file of a complete checkpoint open
        for w in job.role("worker"):
            try:
                if any("/checkpoints/step_" in f.path for f in w.open_files()):
                    return True
            except psutil.Error:
                pass
        return False

    moments = ["mid-step", "during checkpoint write", "right after rename", "during load", "random"]
    hit = []
    rng = random.Random(0)
    for moment in moments:
        job = Job(out, overrides)
        known = complete_steps()
        lines = job.metrics_lines()
        if moment == "mid-step":
            ok = job.wait_for(lambda: job.metrics_lines() > max(lines, 1), poll=0.05)
            time.sleep(rng.uniform(0.05, 0.5))
        elif moment == "during checkpoint write":
            ok = job.wait_for(lambda: any(ckpts.glob(".tmp-step_*")), poll=0.01)
        elif moment == "right after rename":
            ok = job.wait_for(lambda: complete_steps() - known, poll=0.01)
        elif moment == "during load":
            ok = job.wait_for(lambda: loading(job) or job.metrics_lines() > lines, poll=0.01)
            ok = ok and job.metrics_lines() <= lines
        else:
            ok = job.wait_for(lambda: job.metrics_lines() >= lines, poll=0.05)
            time.sleep(rng.uniform(0.0, 8.0))
        assert job.proc.poll() is None, f"the run ended before the kill ({moment}):\n{job.text()[-3000:]}"
        job.kill_all()
        hit.append((moment, bool(ok)))
        time.sleep(0.5)
        assert job.alive() == []
    assert sum(ok for _, ok in hit) >= 4, hit  # the moments were caught (a near miss still kills the job)

    final = Job(out, overrides)
    assert final.wait(timeout=600) == 0, final.text()[-3000:]
    assert status_of(out)["status"] == "completed"
    assert not list(ckpts.glob(".tmp-*"))
    got, want = computed_metrics(out), computed_metrics(tmp_path / "reference")
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # each step once: no duplicates
    assert got == want

    # Started again once complete (a requeue after the last step): it says so and touches nothing.
    def outputs() -> dict:
        return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
                if p.is_file() and p.name != "config.yaml"}
    before = outputs()
    again = Job(out, overrides)
    assert again.wait(timeout=600) == 0, again.text()[-3000:]
    assert "already holds the complete run (8 steps" in again.text() and "nothing to do" in again.text()
    assert outputs() == before


def test_torchrun_launch_script_runs_on_one_cpu_node(tmp_path, data_overrides):
    # torchrun from this environment's bin directory, as after `source .venv/bin/activate`
    env = {**os.environ, "NPROC_PER_NODE": "2", "MASTER_PORT": str(29500 + os.getpid() % 1000),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(REPO / "examples/torchrun/train_grpo.sh"), *data_overrides, *SFT,
                          "trainer.total_steps=1", f"trainer.output_dir={tmp_path / 'run'}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "step_00000001" / "megavrl_checkpoint.json").is_file()
    assert status_of(tmp_path / "run")["status"] == "completed"
