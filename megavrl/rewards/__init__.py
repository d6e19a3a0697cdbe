"""Rewards for video RL: answer parsing, format reward, temporal IoU, choice accuracy, grounded QA.

``score(task, response, sample, config)`` is the entry point; ``REWARDS`` maps a task name to
its reward function ("tvg", "mcq", "gqa" are built in; add one with ``@register_reward``).
"""
from megavrl.rewards.config import RewardConfig
from megavrl.rewards.format_reward import format_reward
from megavrl.rewards.iou import temporal_iou
from megavrl.rewards.parsing import (answer_blocks, extract_answer, normalize_text, parse_choice,
                                     parse_letter_answer, parse_span, parse_timestamp)
from megavrl.rewards.registry import REWARDS, RewardResult, register_reward, sample_field, score, score_batch
from megavrl.rewards.stats import RewardStats
from megavrl.rewards.tasks import (InvalidSampleError, grounded_qa_reward, ground_truth_duration, ground_truth_segments,
                                   ground_truth_span,
                                   multiple_choice_reward, temporal_grounding_reward, validate_sample)

__all__ = [
    "REWARDS", "InvalidSampleError", "RewardConfig", "RewardResult", "RewardStats", "answer_blocks",
    "extract_answer", "format_reward", "ground_truth_duration", "ground_truth_segments", "ground_truth_span", "grounded_qa_reward",
    "multiple_choice_reward", "normalize_text", "parse_choice", "parse_letter_answer", "parse_span",
    "parse_timestamp", "register_reward", "sample_field", "score", "score_batch", "temporal_grounding_reward",
    "temporal_iou", "validate_sample",
]
