"""Group advantages (GRPO, Dr. GRPO, RLOO) against hand-computed values."""
import math

import pytest
import torch

from megavrl.rl import group_advantages

# Group 0: [1, 0, 0, 0]: mean 0.25, unbiased std 0.5, biased std sqrt(0.1875).
# Group 1: all equal -> zero variance.
# Group 2: [0.5, 0.1, 0.3, 0.9]: mean 0.45, deviations [0.05, -0.35, -0.15, 0.45], sum of squares 0.35.
REWARDS = [[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0], [0.5, 0.1, 0.3, 0.9]]
DEV2 = [0.05, -0.35, -0.15, 0.45]


def test_grpo_unbiased_std():
    adv, zero = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), mode="grpo", eps=0.0)
    s2 = math.sqrt(0.35 / 3)
    expected = [[1.5, -0.5, -0.5, -0.5], [0.0] * 4, [d / s2 for d in DEV2]]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    assert zero.tolist() == [False, True, False]


def test_grpo_biased_std_and_epsilon():
    adv, _ = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), mode="grpo", eps=0.1, std="biased")
    s0, s2 = math.sqrt(0.1875), math.sqrt(0.35 / 4)
    expected = [[0.75 / (s0 + 0.1)] + [-0.25 / (s0 + 0.1)] * 3, [0.0] * 4, [d / (s2 + 0.1) for d in DEV2]]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))


def test_drgrpo_is_mean_centred_without_std():
    adv, zero = group_advantages(REWARDS, mode="drgrpo")
    expected = [[0.75, -0.25, -0.25, -0.25], [0.0] * 4, DEV2]
    torch.testing.assert_close(adv, torch.tensor(expected))
    assert zero.tolist() == [False, True, False]


def test_rloo_leave_one_out_baseline():
    adv, _ = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), mode="rloo")
    # r_i - mean of the other three
    expected = [[1.0, -1 / 3, -1 / 3, -1 / 3], [0.0] * 4,
                [0.5 - 1.3 / 3, 0.1 - 1.7 / 3, 0.3 - 1.5 / 3, 0.9 - 0.9 / 3]]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["grpo", "drgrpo", "rloo"])
def test_flat_input_matches_grouped_input(mode):
    grouped, zero_grouped = group_advantages(REWARDS, mode=mode)
    flat, zero_flat = group_advantages(torch.tensor(REWARDS).flatten(), group_size=4, mode=mode)
    assert flat.shape == (12,)
    torch.testing.assert_close(flat.view(3, 4), grouped)
    assert zero_flat.tolist() == zero_grouped.tolist()


@pytest.mark.parametrize("mode", ["grpo", "drgrpo", "rloo"])
def test_zero_variance_groups_get_exactly_zero(mode):
    # 0.1 + 0.2 style float noise must not leak a tiny advantage through the std division
    rewards = torch.tensor([[0.3, 0.1 + 0.2, 0.3], [1.0, 1.0, 1.0]], dtype=torch.float64)
    adv, zero = group_advantages(rewards, mode=mode)
    assert zero.tolist() == [True, True]
    assert torch.count_nonzero(adv) == 0


@pytest.mark.parametrize("mode", ["grpo", "drgrpo", "rloo"])
@pytest.mark.parametrize("std", ["unbiased", "biased"])
def test_group_of_one_is_zero_variance(mode, std):
    adv, zero = group_advantages([[3.0], [1.0]], mode=mode, std=std)
    assert adv.tolist() == [[0.0], [0.0]] and zero.tolist() == [True, True]


def test_advantages_sum_to_zero_per_group():
    rewards = torch.rand(5, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for mode in ("grpo", "drgrpo", "rloo"):
        adv, _ = group_advantages(rewards, mode=mode)
        torch.testing.assert_close(adv.sum(dim=-1), torch.zeros(5, dtype=torch.float64))


def test_integer_rewards_and_empty_input():
    adv, _ = group_advantages([[1, 0], [0, 0]], mode="drgrpo")
    assert adv.dtype == torch.float32 and adv.tolist() == [[0.5, -0.5], [0.0, 0.0]]
    adv, zero = group_advantages(torch.zeros(0, 4))
    assert adv.shape == (0, 4) and zero.shape == (0,)


@pytest.mark.parametrize("kwargs, match", [
    (dict(rewards=[1.0, 2.0, 3.0]), "group_size"),
    (dict(rewards=[1.0, 2.0, 3.0], group_size=2), "group_size"),
    (dict(rewards=[[1.0, 2.0]], group_size=3), "group_size"),
    (dict(rewards=torch.zeros(2, 2, 2)), "shape"),
    (dict(rewards=[[1.0, float("nan")]]), "not finite"),
    (dict(rewards=[[1.0, 2.0]], mode="ppo"), "ppo"),
    (dict(rewards=[[1.0, 2.0]], std="sample"), "sample"),
])
def test_bad_arguments_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(**kwargs)
