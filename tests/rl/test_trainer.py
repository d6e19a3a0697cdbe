"""The GRPO/SFT trainer end to end on CPU: 2 processes (Megatron TP=2 or PP=2 on gloo), vLLM on CPU."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.parallel.torchrun import run_torchrun

WORKER = Path(__file__).with_name("trainer_worker.py")
pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.vllm]


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    from megavrl.data.synth import SynthSettings, write_synthetic_dataset

    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(str(out), SynthSettings(n=8, seed=0, seconds=6.0), workers=1)
    return out


def _report(workdir, scenario, rank=0):
    return json.loads((workdir / f"report_{scenario}_rank{rank}.json").read_text())


def _finite(rows, keys):
    return all(isinstance(r[k], (int, float)) and math.isfinite(r[k]) for r in rows for k in keys if k in r)


@pytest.fixture(scope="module")
def tp2_report(tmp_path_factory, tiny_hf_dir, synth_data):
    workdir = tmp_path_factory.mktemp("tp2")
    run_torchrun([str(WORKER), "tp2", str(workdir), str(tiny_hf_dir), str(synth_data)], nproc=2, timeout=1200)
    return _report(workdir, "tp2"), workdir


def test_tp2_grpo_steps_are_finite_and_change_weights(tp2_report):
    report, workdir = tp2_report
    metrics = report["A"]["metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert _finite(metrics, ["loss", "kl_loss", "entropy", "grad_norm", "reward/total", "token_mult_prob_error"])
    assert all(m["reward/std"] > 0 for m in metrics)  # the reward has variance: a real gradient
    # trainer and vLLM score the sampled tokens alike (fp32 both sides)
    assert all(1.0 <= m["token_mult_prob_error"] < 1.05 for m in metrics)
    assert report["A"]["weights_changed"]
    assert (workdir / "D" / "hf" / "model.safetensors.index.json").is_file()  # HF export at the end


def test_resume_repeats_the_uninterrupted_step_exactly(tp2_report):
    report, _ = tp2_report
    a3 = report["A"]["steps"][2]
    b3 = report["B"]["steps"][0]  # the first step after resuming at step 2
    assert b3["ids"] == a3["ids"]  # same prompts
    assert b3["rand"] == a3["rand"]  # same RNG state
    assert b3["tokens"] == a3["tokens"]  # same rollouts (same weights, same per-step sampling seed)
    a_loss = report["A"]["metrics"][2]["loss"]
    b_loss = [m for m in report["B"]["metrics"] if m["step"] == 3][0]["loss"]
    assert b_loss == pytest.approx(a_loss, rel=1e-5, abs=1e-7)


def test_nan_loss_is_skipped_and_counted(tp2_report):
    report, _ = tp2_report
    assert report["C"]["poisoned_calls"] >= 1
    assert report["C"]["nonfinite_total"] == 1
    assert report["C"]["unchanged_after_nan"]


def test_policy_learns_what_the_reward_prefers(tp2_report):
    # 6 GRPO steps with a reward for responses starting with a lowercase letter raise the
    # probability mass of such first tokens, measured by transformers on the exported model.
    learning = tp2_report[0]["learning"]
    assert learning["after"] > learning["before"] + 0.05, learning


def test_pp2_grpo_steps(tmp_path, tiny_hf_dir, synth_data):
    run_torchrun([str(WORKER), "pp2", str(tmp_path), str(tiny_hf_dir), str(synth_data)], nproc=2, timeout=900)
    reports = [_report(tmp_path, "pp2", r) for r in (0, 1)]
    assert all(r["weights_changed"] for r in reports)  # both pipeline stages were updated
    metrics = reports[0]["metrics"]
    assert [m["step"] for m in metrics] == [1, 2]
    assert _finite(metrics, ["loss", "kl_loss", "entropy", "grad_norm", "token_mult_prob_error"])


@pytest.mark.parametrize("override,field", [("parallel.tp=3", "num_attention_heads=4 is not divisible"),
                                            ("algorithm.name=ppo", "algorithm.name='ppo'"),
                                            ("trainer.prompts_per_step=0", "trainer.prompts_per_step=0")])
def test_invalid_config_fails_before_any_process_starts(tiny_hf_dir, override, field):
    out = subprocess.run([sys.executable, "-m", "megavrl.cli", "train", f"model.hf_dir={tiny_hf_dir}", override],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert field in out.stderr and "configuration error" in out.stderr
    assert "launching" not in out.stderr  # refused before torchrun was started
