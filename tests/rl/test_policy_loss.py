"""Policy loss, KL estimators and loss aggregation against hand-computed values; split invariance."""
import math
from dataclasses import fields

import pytest
import torch

from megavrl.rl import GRPOConfig, aggregate_loss, batch_normalisers, kl_penalty, policy_loss

F64 = torch.float64
LN2 = math.log(2.0)

# ----------------------------------------------------------------------------------------------
# A hand-computed batch: 2 sequences, T = 4, the first has 3 response tokens (the 4th is padding
# holding NaN, which must not leak), the second has 4.
#   seq 0, A = +1, ratios [1.5, 0.5, 1.0]:
#       pg = max(-r, -clip(r, 0.8, 1.28)) = [-1.28 (clipped), -0.5, -1.0]             sum -2.78
#   seq 1, A = -2, ratios [1.1, 0.7, 4.0, 1.0]:
#       pg = max(2r, 2 clip(r)) = [2.2, 1.6 (clipped), 8 -> dual clip min(8, 2*3) = 6, 2.0]  sum 11.8
# ----------------------------------------------------------------------------------------------
RATIOS = [[1.5, 0.5, 1.0, 1.0], [1.1, 0.7, 4.0, 1.0]]
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
ADV = torch.tensor([1.0, -2.0], dtype=F64)
SEQ0, SEQ1, N_TOK = -2.78, 11.8, 7
VALID = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]


def hand_batch():
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.3, -1.2, -2.5, -0.7]], dtype=F64)
    logp = old + torch.log(torch.tensor(RATIOS, dtype=F64))
    logp[0, 3] = float("nan")  # garbage in the padding
    return logp.requires_grad_(True), old


def no_extras(**kwargs):
    return dict(dict(kl_coef=0.0, entropy_coef=0.0, clip_low=0.2, clip_high=0.28, dual_clip=3.0), **kwargs)


@pytest.mark.parametrize("mode, kwargs, expected", [
    ("token-mean", {}, (SEQ0 + SEQ1) / N_TOK),
    ("seq-mean-token-mean", {}, (SEQ0 / 3 + SEQ1 / 4) / 2),
    ("seq-mean-token-sum", {}, (SEQ0 + SEQ1) / 2),
    ("seq-mean-token-sum-norm", {}, (SEQ0 + SEQ1) / (2 * 4)),  # L defaults to T = 4
    ("seq-mean-token-sum-norm", {"max_response_len": 10}, (SEQ0 + SEQ1) / (2 * 10)),
    ("token-mean", {"global_num_tokens": 14}, (SEQ0 + SEQ1) / 14),
    ("seq-mean-token-sum", {"global_num_seqs": 4}, (SEQ0 + SEQ1) / 4),
])
def test_clipped_surrogate_with_dual_clip_each_aggregation(mode, kwargs, expected):
    logp, old = hand_batch()
    loss, metrics = policy_loss(logp, old, ADV, MASK, **no_extras(loss_agg=mode, **kwargs))
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["pg_loss"] == pytest.approx(expected, abs=1e-12)
    assert not torch.isnan(loss)


def test_metrics_hand_computed():
    logp, old = hand_batch()
    _, metrics = policy_loss(logp, old, ADV, MASK, **no_extras())
    valid_ratios = [RATIOS[i][t] for i, t in VALID]
    assert metrics["clip_fraction"] == pytest.approx(2 / 7)  # seq 0 token 0, seq 1 token 1
    assert metrics["dual_clip_fraction"] == pytest.approx(1 / 7)  # seq 1 token 2
    assert metrics["ratio_mean"] == pytest.approx(sum(valid_ratios) / 7)
    assert metrics["approx_kl"] == pytest.approx(sum(r - 1 - math.log(r) for r in valid_ratios) / 7)
    assert metrics["num_tokens"] == 7.0
    assert "kl_loss" not in metrics and "token_mult_prob_error" not in metrics


def test_gradient_hand_computed():
    # token-mean: d loss / d logp = -A r / 7 on unclipped tokens, 0 on clipped and padded ones
    logp, old = hand_batch()
    loss, _ = policy_loss(logp, old, ADV, MASK, **no_extras())
    loss.backward()
    expected = torch.tensor([[0.0, -0.5 / 7, -1.0 / 7, 0.0], [2.2 / 7, 0.0, 0.0, 2.0 / 7]], dtype=F64)
    torch.testing.assert_close(logp.grad, expected)


def test_without_dual_clip_the_large_ratio_is_not_capped():
    logp, old = hand_batch()
    loss, metrics = policy_loss(logp, old, ADV, MASK, **no_extras(dual_clip=None))
    assert loss.item() == pytest.approx((SEQ0 + SEQ1 + 2.0) / 7)  # 8 instead of 6
    assert "dual_clip_fraction" not in metrics


def test_symmetric_clip():
    logp, old = hand_batch()
    loss, _ = policy_loss(logp, old, ADV, MASK, **no_extras(clip_high=0.2))
    assert loss.item() == pytest.approx((SEQ0 + 1.28 - 1.2 + SEQ1) / 7)  # seq 0 token 0 clips at 1.2


def test_token_level_advantages():
    logp, old = hand_batch()
    loss, _ = policy_loss(logp, old, ADV[:, None].expand(2, 4).clone(), MASK, **no_extras())
    assert loss.item() == pytest.approx((SEQ0 + SEQ1) / 7)


def test_kl_term_and_entropy_bonus():
    logp, old = hand_batch()
    ref = (logp.detach() - LN2)  # d = log 2 on every token: k3 = 1/2 + log 2 - 1, k1 = log 2, k2 = (log 2)^2 / 2
    entropy = torch.full((2, 4), 0.5, dtype=F64)
    for estimator, per_token in (("k1", LN2), ("k2", 0.5 * LN2 ** 2), ("k3", 0.5 + LN2 - 1.0)):
        loss, metrics = policy_loss(logp, old, ADV, MASK, **no_extras(
            ref_logprobs=ref, kl_coef=0.1, kl_estimator=estimator, entropy=entropy, entropy_coef=0.01))
        assert metrics["kl_loss"] == pytest.approx(per_token)
        assert metrics["entropy"] == pytest.approx(0.5)
        assert loss.item() == pytest.approx((SEQ0 + SEQ1) / 7 + 0.1 * per_token - 0.01 * 0.5)


def test_truncated_importance_sampling_and_token_mult_prob_error():
    logp, old = hand_batch()
    rollout = old.clone()
    rollout[0] -= LN2  # seq 0: exp(old - rollout) = 2, capped at 1.5; seq 1: 1
    loss, metrics = policy_loss(logp, old, ADV, MASK, **no_extras(rollout_logprobs=rollout, tis_cap=1.5))
    assert loss.item() == pytest.approx((1.5 * SEQ0 + SEQ1) / 7)
    assert metrics["tis_weight_mean"] == pytest.approx((3 * 1.5 + 4 * 1.0) / 7)
    # NeMo-RL: mean over tokens of exp(|old - rollout|)
    assert metrics["token_mult_prob_error"] == pytest.approx((3 * 2.0 + 4 * 1.0) / 7)
    # without a cap, the metric is reported but the loss is unchanged
    loss, metrics = policy_loss(logp, old, ADV, MASK, **no_extras(rollout_logprobs=rollout))
    assert loss.item() == pytest.approx((SEQ0 + SEQ1) / 7)
    assert metrics["token_mult_prob_error"] == pytest.approx(10 / 7)


# ----------------------------------------------------------------------------------------------
# KL estimators and aggregation on their own
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator, d, expected", [
    ("k1", LN2, LN2), ("k1", -LN2, -LN2),
    ("k2", LN2, 0.5 * LN2 ** 2), ("k2", -LN2, 0.5 * LN2 ** 2),
    ("k3", LN2, 0.5 + LN2 - 1.0),  # exp(-d) + d - 1
    ("k3", -LN2, 2.0 - LN2 - 1.0),
    ("k3", 0.0, 0.0),
    ("k1", 15.0, 10.0), ("k1", -15.0, -10.0),  # output clamp at 10
    ("k2", 15.0, 10.0),
    ("k3", -30.0, 10.0),  # input clamp to 20 keeps exp finite, then the output clamp
])
def test_kl_estimators(estimator, d, expected):
    logp = torch.tensor([[math.log(0.5)]], dtype=F64)
    kl = kl_penalty(logp, logp - d, estimator, clamp=10.0)
    assert kl.item() == pytest.approx(expected, abs=1e-12)


def test_kl_without_clamp_and_bad_estimator():
    logp = torch.zeros(1, 1, dtype=F64)
    assert kl_penalty(logp, logp - 15.0, "k2", clamp=None).item() == pytest.approx(112.5)
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, logp, "k4")


def test_aggregate_loss_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])  # the third sequence is empty
    assert aggregate_loss(loss, mask, "token-mean").item() == pytest.approx(15 / 5)
    assert aggregate_loss(loss, mask, "seq-mean-token-mean").item() == pytest.approx((6 / 3 + 9 / 2) / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum").item() == pytest.approx(15 / 2)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(15 / (2 * 4))
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm", max_response_len=5).item() == pytest.approx(1.5)
    assert aggregate_loss(loss, mask, "token-mean", global_num_tokens=10).item() == pytest.approx(1.5)
    assert aggregate_loss(loss, torch.zeros_like(mask), "token-mean").item() == 0.0
    assert batch_normalisers(mask) == (5, 2)
    with pytest.raises(ValueError, match="seq-sum"):
        aggregate_loss(loss, mask, "seq-sum")


@pytest.mark.parametrize("kwargs, match", [
    (dict(kl_coef=0.1), "ref_logprobs"),
    (dict(tis_cap=2.0), "rollout_logprobs"),
    (dict(entropy_coef=0.1), "entropy"),
    (dict(dual_clip=1.0), "dual_clip"),
])
def test_missing_inputs_are_named(kwargs, match):
    logp, old = hand_batch()
    with pytest.raises(ValueError, match=match):
        policy_loss(logp, old, ADV, MASK, **dict(no_extras(), **kwargs))


def test_shape_mismatch_is_named():
    logp, old = hand_batch()
    with pytest.raises(ValueError, match="old_logprobs"):
        policy_loss(logp, old[:, :3], ADV, MASK)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, torch.zeros(3, dtype=F64), MASK)


# ----------------------------------------------------------------------------------------------
# Split invariance: one batch of 8 == sum over micro-batches (4 x 2 and 2 x 4)
# ----------------------------------------------------------------------------------------------
def make_batch(dtype, seed=0, b=8, t=12, v=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=dtype)
    tokens = torch.randint(0, v, (b, t), generator=g)
    lengths = torch.tensor([12, 3, 7, 1, 12, 9, 5, 10])
    mask = torch.arange(t)[None, :] < lengths[:, None]
    old = torch.log_softmax(logits + 0.3 * torch.randn(b, t, v, generator=g, dtype=dtype), -1).gather(
        -1, tokens[..., None])[..., 0]
    ref = torch.log_softmax(logits + 0.5 * torch.randn(b, t, v, generator=g, dtype=dtype), -1).gather(
        -1, tokens[..., None])[..., 0]
    rollout = old + 0.2 * torch.randn(b, t, generator=g, dtype=dtype)
    adv = torch.randn(b, generator=g, dtype=dtype) * 2
    return logits, tokens, mask, old, ref, rollout, adv


def loss_and_grad_by_micro_batches(dtype, config, micro, use_global=True):
    logits, tokens, mask, old, ref, rollout, adv = make_batch(dtype)
    logits.requires_grad_(True)
    num_tokens, num_seqs = batch_normalisers(mask)
    total, summed = 0.0, {}
    for start in range(0, logits.shape[0], micro):
        s = slice(start, start + micro)
        logp_all = torch.log_softmax(logits[s], -1)
        logp = logp_all.gather(-1, tokens[s][..., None])[..., 0]
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        normalisers = dict(global_num_tokens=num_tokens, global_num_seqs=num_seqs, max_response_len=16) \
            if use_global else {}
        loss, metrics = policy_loss(logp, old[s], adv[s], mask[s], ref_logprobs=ref[s], rollout_logprobs=rollout[s],
                                    entropy=entropy, **config.loss_kwargs(), **normalisers)
        loss.backward()  # gradients accumulate over micro-batches, as in the trainer
        total += loss.item()
        for key, value in metrics.items():
            summed[key] = summed.get(key, 0.0) + value
    return total, logits.grad.clone(), summed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])
def test_gradient_is_independent_of_the_micro_batch_split(loss_agg, dtype):
    config = GRPOConfig(loss_agg=loss_agg, kl_coef=0.05, kl_estimator="k3", entropy_coef=0.01, tis_cap=2.0,
                        clip_low=0.2, clip_high=0.28, dual_clip=3.0)
    full_loss, full_grad, full_metrics = loss_and_grad_by_micro_batches(dtype, config, micro=8)
    assert full_grad.abs().sum() > 0
    for micro in (2, 4):  # 4 micro-batches of 2, 2 micro-batches of 4
        loss, grad, metrics = loss_and_grad_by_micro_batches(dtype, config, micro=micro)
        assert loss == pytest.approx(full_loss, abs=1e-6)
        torch.testing.assert_close(grad, full_grad, atol=1e-6, rtol=0)
        for key in ("loss", "pg_loss", "kl_loss", "entropy", "clip_fraction", "approx_kl", "ratio_mean",
                    "token_mult_prob_error", "tis_weight_mean", "num_tokens"):
            assert metrics[key] == pytest.approx(full_metrics[key], abs=1e-6), key


def test_local_normalisers_do_depend_on_the_split():
    # why the global normalisers exist: per-micro-batch means weight tokens unequally
    config = GRPOConfig(loss_agg="token-mean")
    full, _, _ = loss_and_grad_by_micro_batches(torch.float64, config, micro=8, use_global=False)
    split, _, _ = loss_and_grad_by_micro_batches(torch.float64, config, micro=2, use_global=False)
    assert abs(split / 4 - full) > 1e-3


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def test_grpo_config_fields_and_defaults():
    assert [(f.name, f.default) for f in fields(GRPOConfig)] == [
        ("advantage", "grpo"), ("adv_epsilon", 1e-6), ("adv_std", "unbiased"), ("clip_low", 0.2),
        ("clip_high", 0.28), ("dual_clip", 3.0), ("kl_coef", 0.01), ("kl_estimator", "k3"), ("kl_clamp", 10.0),
        ("entropy_coef", 0.0), ("loss_agg", "token-mean"), ("tis_cap", None)]
    config = GRPOConfig()
    assert config.advantage_kwargs() == {"mode": "grpo", "eps": 1e-6, "std": "unbiased"}
    assert set(config.loss_kwargs()) == {f.name for f in fields(GRPOConfig)} - {"advantage", "adv_epsilon", "adv_std"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(advantage="ppo"), "advantage"), (dict(adv_std="sample"), "adv_std"),
    (dict(kl_estimator="k4"), "kl_estimator"),
    (dict(loss_agg="sum"), "loss_agg"), (dict(clip_low=1.0), "clip_low"), (dict(dual_clip=0.5), "dual_clip"),
    (dict(tis_cap=0.0), "tis_cap"), (dict(kl_coef=-1.0), "kl_coef"), (dict(adv_epsilon=float("nan")), "adv_epsilon"),
])
def test_grpo_config_validation_names_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GRPOConfig(**kwargs)


def test_bfloat16_inputs_give_a_finite_loss_and_gradient():
    logits, tokens, mask, old, ref, rollout, adv = make_batch(torch.float32)
    logits = logits.to(torch.bfloat16).requires_grad_(True)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None])[..., 0].to(torch.bfloat16)
    loss, metrics = policy_loss(logp, old.to(torch.bfloat16), adv, mask, ref_logprobs=ref.to(torch.bfloat16),
                                rollout_logprobs=rollout.to(torch.bfloat16), **GRPOConfig(tis_cap=2.0).loss_kwargs())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert all(math.isfinite(v) for v in metrics.values())
