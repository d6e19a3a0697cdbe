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
    """Every row has every key, as a finite number (a missing key fails)."""
    return all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for r in rows for k in keys)


@pytest.fixture(scope="module")
def tp2_report(tmp_path_factory, tiny_hf_dir, synth_data):
    workdir = tmp_path_factory.mktemp("tp2")
    run_torchrun([str(WORKER), "tp2", str(workdir), str(tiny_hf_dir), str(synth_data)], nproc=2, timeout=1500)
    return _report(workdir, "tp2"), workdir


def test_tp2_grpo_steps_are_finite_and_change_weights(tp2_report):
    report, workdir = tp2_report
    metrics = report["A"]["metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert _finite(metrics, ["loss", "kl_loss", "entropy", "grad_norm", "reward/total", "token_mult_prob_error"])
    assert all(m["reward/std"] > 0 for m in metrics)  # the reward has variance: a real gradient
    assert all(m["data/prompt_token_mismatch"] == 0 for m in metrics)
    # trainer and vLLM score the sampled tokens alike (fp32 both sides)
    assert all(1.0 <= m["token_mult_prob_error"] < 1.05 for m in metrics)
    assert report["A"]["weights_changed"]
    assert (workdir / "D" / "hf" / "model.safetensors.index.json").is_file()  # HF export at the end


def test_resume_repeats_every_later_step_exactly(tp2_report):
    # Stopped after step 2 and resumed: steps 3 and 4 repeat the uninterrupted run's bit for bit,
    # every logged scalar (loss, KL, entropy, grad norm, rewards, lr, ...): Adam's moments and step,
    # the LR schedule, the RNG streams and the data position all came back.
    report, _ = tp2_report
    a, b = report["A"], report["B"]
    assert [s["ids"] for s in b["steps"]] == [s["ids"] for s in a["steps"][2:]]  # same prompts
    assert [s["rand"] for s in b["steps"]] == [s["rand"] for s in a["steps"][2:]]  # same RNG state
    assert [s["tokens"] for s in b["steps"]] == [s["tokens"] for s in a["steps"][2:]]  # same rollouts
    assert [m["step"] for m in b["metrics"]] == [1, 2, 3, 4]  # each step once, none duplicated
    assert b["metrics"] == a["metrics"]  # every scalar of every step, exactly
    assert len(a["metrics"][3]) > 20
    assert b["optimizer"] == a["optimizer"] and a["optimizer"]["adam_step"] == 4
    assert b["weights_equal_A"]


def test_inf_gradient_or_nan_loss_changes_nothing(tp2_report):
    # step 2: finite loss, infinite gradient; step 3: NaN loss. Both skipped and counted, and the
    # weights and Adam state after step 3 are bit-identical to those before step 2.
    c = tp2_report[0]["C"]
    assert c["poisoned_calls"] >= 1 and math.isfinite(c["metrics"][1]["loss"]) and c["metrics"][2]["loss"] == "nan"
    assert [m["nonfinite/skipped_updates"] for m in c["metrics"]] == [0, 1, 1]
    assert c["nonfinite_total"] == 2
    assert c["unchanged_after_inf_and_nan"]


def test_run_stops_after_max_consecutive_nonfinite_steps_with_a_checkpoint(tp2_report):
    c2 = tp2_report[0]["C2"]
    assert c2["stopped"] and c2["step"] == 2 and "trainer.max_consecutive_nonfinite=2" in c2["message"]
    assert c2["checkpoints"] == ["step_00000002"]
    assert c2["status"]["status"] == "stopped_nonfinite"


@pytest.mark.parametrize("layout", ["E_pp2", "E_tp1"])
def test_training_checkpoint_resumes_at_another_layout(tp2_report, layout):
    # TP=2 -> PP=2 and TP=2 -> TP=1 (DP=2): the same weights and Adam state (sums of the moments
    # agree to fp32 reduction-order rounding), then training goes on at the new layout.
    report = tp2_report[0]
    e, a = report[layout], report["A"]["optimizer"]
    assert e["step"] == 4 and e["weights_equal_A"] and e["trained"]
    assert e["optimizer"]["adam_step"] == a["adam_step"] == 4
    assert e["optimizer"]["sums"] == pytest.approx(a["sums"], rel=1e-6, abs=1e-12)
    assert [m["step"] for m in e["metrics"]] == [5]
    assert _finite(e["metrics"], ["loss", "grad_norm", "reward/total"])


def test_policy_learns_what_the_reward_prefers(tp2_report):
    # 6 GRPO steps with a reward for responses starting with a lowercase letter raise the
    # probability mass of such first tokens, measured by transformers on the exported model.
    learning = tp2_report[0]["learning"]
    assert learning["after"] > learning["before"] + 0.05, learning


def test_pp2_grpo_steps_and_an_inf_gradient(tmp_path, tiny_hf_dir, synth_data):
    run_torchrun([str(WORKER), "pp2", str(tmp_path), str(tiny_hf_dir), str(synth_data)], nproc=2, timeout=900)
    reports = [_report(tmp_path, "pp2", r) for r in (0, 1)]
    assert all(r["weights_changed"] for r in reports)  # both pipeline stages were updated
    # step 2's infinite gradient (made on the last stage, reaching the first through the pipeline)
    # and step 3's NaN loss were refused on both stages: weights and Adam state untouched
    assert all(r["unchanged_after_inf"] and r["nonfinite_total"] == 2 for r in reports)
    metrics = reports[0]["metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert _finite(metrics[:1], ["loss", "kl_loss", "entropy", "grad_norm", "token_mult_prob_error"])
    assert math.isfinite(metrics[1]["loss"])
    assert [m["nonfinite/skipped_updates"] for m in metrics] == [0, 1, 1]


@pytest.mark.parametrize("override,field", [("parallel.tp=3", "num_attention_heads=4 is not divisible"),
                                            ("algorithm.name=ppo", "algorithm.name='ppo'"),
                                            ("trainer.prompts_per_step=0", "trainer.prompts_per_step=0")])
def test_invalid_config_fails_before_any_process_starts(tiny_hf_dir, override, field):
    out = subprocess.run([sys.executable, "-m", "megavrl.cli", "train", f"model.hf_dir={tiny_hf_dir}", override],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert field in out.stderr and "configuration error" in out.stderr
    assert "launching" not in out.stderr  # refused before torchrun was started
