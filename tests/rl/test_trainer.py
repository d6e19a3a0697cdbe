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


# The trainer logs token_mult_prob_error = mean exp(|logp_trainer - logp_vllm|) over the sampled
# tokens; since exp(x) >= 1 + x, a value below 1 + 1e-3 means a mean |log-prob difference| below
# 1e-3, check-sync's threshold for fp32 on both sides. A wrong fps or M-RoPE convention gives ~1.01.
MAX_TOKEN_MULT_PROB_ERROR = 1.0 + 1e-3


def _same_logprobs_as_vllm(m):
    return 1.0 <= m["token_mult_prob_error"] < MAX_TOKEN_MULT_PROB_ERROR


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
    assert all(_same_logprobs_as_vllm(m) for m in metrics)
    assert report["A"]["weights_changed"]
    assert (workdir / "D" / "hf" / "model.safetensors.index.json").is_file()  # HF export at the end


def test_resume_repeats_every_later_step_exactly(tp2_report):
    # A's output directory as it was after step 2 (its step-2 checkpoint, its metrics of steps
    # 1-4), resumed: steps 3 and 4 repeat the uninterrupted run's bit for bit, every logged scalar
    # (loss, KL, entropy, grad norm, rewards, lr, ...): Adam's moments and step, the LR schedule,
    # the RNG streams and the data position all came back; steps 3 and 4 of the copied metrics
    # were dropped and logged again, once.
    report, _ = tp2_report
    a, b = report["A"], report["B"]
    assert b["resumed_at"] == 2
    assert [s["ids"] for s in b["steps"]] == [s["ids"] for s in a["steps"][2:]]  # same prompts
    assert [s["rand"] for s in b["steps"]] == [s["rand"] for s in a["steps"][2:]]  # same RNG state
    assert [s["tokens"] for s in b["steps"]] == [s["tokens"] for s in a["steps"][2:]]  # same rollouts
    assert [m["step"] for m in b["metrics"]] == [1, 2, 3, 4]  # each step once, none duplicated
    assert b["metrics"] == a["metrics"]  # every scalar of every step, exactly
    assert len(a["metrics"][3]) > 20
    assert b["optimizer"] == a["optimizer"] and a["optimizer"]["adam_step"] == 4
    assert b["weights_equal_A"]


def test_an_engine_with_other_log_probs_is_refused_on_every_rank(tp2_report):
    _, workdir = tp2_report
    for rank in (0, 1):  # rank 0 holds the engine, rank 1 none
        refusal = _report(workdir, "tp2", rank)["R"]
        assert refusal["refused"], rank
        assert "returns processed_logprobs, this run needs raw_logprobs" in refusal["message"], refusal


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


# DP=2 against DP=1 on the same rollouts, after one step from the same weights (fp32). Losses and
# metrics are sums over micro-batches and ranks in another order (and TP=2 splits the matmuls of
# the DP=1 run): they agree to 5e-5 relative (the grad norm differed by 3e-6 on 2026-11-30). The
# update is ~lr * g (adam_eps=1, no clipping, see the worker), so the weights agree to a few fp32
# ulps of the largest weight (the norms' 1.0: 1.2e-7); 1e-6 is 1% of the largest update (> 1e-4),
# so a gradient off by a factor (a rank-local normaliser, a missing DP reduction) fails.
DP_METRICS = {"grpo": ["loss", "pg_loss", "kl_loss", "entropy", "grad_norm", "clip_fraction", "ratio_mean",
                       "token_mult_prob_error", "num_tokens"],
              "sft": ["loss", "entropy", "grad_norm", "num_tokens"]}


@pytest.mark.parametrize("algo", ["grpo", "sft"])
def test_data_parallel_update_equals_a_single_rank_update(tp2_report, algo):
    runs = tp2_report[0]["DP"][algo]
    dp1, dp2 = runs["dp1"], runs["dp2"]
    assert [s["ids"] for s in dp2["steps"]] == [s["ids"] for s in dp1["steps"]]  # the same prompts
    assert [s.get("tokens") for s in dp2["steps"]] == [s.get("tokens") for s in dp1["steps"]]  # the same rollouts
    (m1,), (m2,) = dp1["metrics"], dp2["metrics"]
    assert _finite([m1, m2], DP_METRICS[algo])
    for key in DP_METRICS[algo]:
        assert m2[key] == pytest.approx(m1[key], rel=5e-5, abs=1e-7), key
    assert m1["grad_norm"] > 0 and runs["max_update"] > 1e-4, runs  # a real update
    assert runs["max_weight_diff"] <= 1e-6, runs


@pytest.fixture(scope="module")
def pp2_report(tmp_path_factory, tiny_tied_hf_dir, synth_data):
    workdir = tmp_path_factory.mktemp("pp2")
    run_torchrun([str(WORKER), "pp2", str(workdir), str(tiny_tied_hf_dir), str(synth_data)], nproc=2, timeout=1200)
    return [_report(workdir, "pp2", r) for r in (0, 1)]


def test_pp2_tied_grpo_steps_and_an_inf_gradient(pp2_report):
    reports = pp2_report
    assert all(r["weights_changed"] for r in reports)  # both pipeline stages were updated
    # the embedding (stage 0) and its tied output copy (stage 1) received the summed gradient
    assert all(r["tied_equal"] for r in reports)
    # step 2's infinite gradient (made on the last stage, reaching the first through the pipeline)
    # and step 3's NaN loss were refused on both stages: weights and Adam state untouched
    assert all(r["unchanged_after_inf"] and r["nonfinite_total"] == 2 for r in reports)
    metrics = reports[0]["metrics"]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert _finite(metrics[:1], ["loss", "kl_loss", "entropy", "grad_norm", "token_mult_prob_error"])
    assert _same_logprobs_as_vllm(metrics[0]) and metrics[0]["data/prompt_token_mismatch"] == 0
    assert math.isfinite(metrics[1]["loss"])
    assert [m["nonfinite/skipped_updates"] for m in metrics] == [0, 1, 1]


def _train_rows(f):
    return [m for m in f["metrics"] if "loss" in m]


def test_zero_variance_groups_are_dropped_and_refilled(pp2_report):
    # mcq rows always score 1 (zero variance); tvg/gqa rows score a hash of each response. Each step
    # takes 4 prompts plus up to 4 refills (selection.max_refills); it trains on the 4 prompts that
    # are not mcq, the first in order, refills from the extra prompts filling the dropped places.
    f = pp2_report[0]["F"]
    rows = _train_rows(f)
    assert len(f["taken"]) == len(f["trained"]) == len(rows) == 2
    for taken, trained, m in zip(f["taken"], f["trained"], rows):
        assert len(taken) == 8
        first, extra = taken[:4], taken[4:]
        dropped = [i for i in first if i.endswith("_mcq")]
        kept = [i for i in first if not i.endswith("_mcq")]
        refills = [i for i in extra if not i.endswith("_mcq")][:len(dropped)]
        assert trained == kept + refills
        assert m["filter/dropped_groups"] == len(dropped) and m["filter/refilled_groups"] == len(refills)
        assert m["filter/kept_groups"] == len(trained) and m["advantage/zero_variance_groups"] == 0
        assert m["data/prompt_token_mismatch"] == 0 and _same_logprobs_as_vllm(m)
    assert any(m["filter/dropped_groups"] > 0 for m in rows)  # the refill path ran


def test_ppo_epochs_and_mini_batches_recompute_old_logprobs(pp2_report):
    # 2 epochs x 2 mini-batches = 4 updates a step. The first update of a step is on-policy (the
    # old log-probs, recomputed before it, equal the current ones): ratio 1, nothing clipped. The
    # later ones see the weights the earlier ones moved: ratio and KL move, and the clip acts.
    f = pp2_report[0]["F"]
    assert len(f["updates"]) == 8 and all(u["applied"] for u in f["updates"])
    assert f["adam_step"] == 8
    for step in (f["updates"][:4], f["updates"][4:]):
        first, later = step[0], step[1:]
        assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and first["approx_kl"] < 1e-8
        assert first["clip_fraction"] == 0.0
        assert all(abs(u["ratio_mean"] - 1.0) > 1e-4 and u["approx_kl"] > 1e-6 for u in later)
        assert max(u["clip_fraction"] for u in later) > 0
    assert f["tied_equal"]


def test_eval_every_step(pp2_report):
    f = pp2_report[0]["F"]
    assert f["eval_dirs"] == ["after", "before", "step1"]
    eval_rows = [m for m in f["metrics"] if "eval/rows" in m]
    assert [m["step"] for m in eval_rows] == [0, 1, 2] and all(m["eval/rows"] == 3 for m in eval_rows)


@pytest.mark.parametrize("override,field", [("parallel.tp=3", "num_attention_heads=4 is not divisible"),
                                            ("algorithm.name=ppo", "algorithm.name='ppo'"),
                                            ("trainer.prompts_per_step=0", "trainer.prompts_per_step=0")])
def test_invalid_config_fails_before_any_process_starts(tiny_hf_dir, override, field):
    out = subprocess.run([sys.executable, "-m", "megavrl.cli", "train", f"model.hf_dir={tiny_hf_dir}", override],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert field in out.stderr and "configuration error" in out.stderr
    assert "launching" not in out.stderr  # refused before torchrun was started
