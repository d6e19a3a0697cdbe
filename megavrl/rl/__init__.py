"""GRPO: group advantages, the policy loss with KL, variance-aware data selection (pure functions)."""
from megavrl.rl.advantages import ZERO_VARIANCE_ATOL, group_advantages
from megavrl.rl.config import GRPOConfig, SelectionConfig
from megavrl.rl.policy_loss import aggregate_loss, batch_normalisers, kl_penalty, policy_loss
from megavrl.rl.selection import (FilterResult, SampleRewardStats, SelectionResult, ZeroVarianceFilter,
                                  reward_statistics, select_by_reward_variance)

__all__ = [
    "FilterResult", "GRPOConfig", "SampleRewardStats", "SelectionConfig", "SelectionResult",
    "ZERO_VARIANCE_ATOL", "ZeroVarianceFilter", "aggregate_loss", "batch_normalisers", "group_advantages",
    "kl_penalty", "policy_loss", "reward_statistics", "select_by_reward_variance",
]
