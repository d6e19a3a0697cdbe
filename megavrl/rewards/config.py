"""The reward section of the config: one dataclass, reused by ``megavrl.config`` (one source of truth)."""
from __future__ import annotations

from dataclasses import dataclass

from megavrl.config_base import check_choice, check_number

ANSWER_POSITIONS = ("last", "first")
FORMAT_MODES = ("strict", "lenient")
TIMESTAMP_UNITS = ("seconds", "fraction")
PRESETS = ("megavrl", "temporal_r1")


@dataclass
class RewardConfig:
    """How responses are parsed and how reward components are weighted.

    Fields:
        answer_position: which ``<answer>...</answer>`` block is scored when there are several:
            "last" (default) or "first".
        format_mode: "strict" = the response is exactly one ``<think>...</think>`` followed by one
            non-empty ``<answer>...</answer>`` (whitespace allowed around them); "lenient" = a
            non-empty answer block is present anywhere.
        format_needs_answer: the format component is 1 only when, besides the template, the answer
            block parses for the task (a span for tvg, an option for mcq, both for gqa), as
            Temporal-R1's format check parses its JSON answer. Default True: with False, a
            template around an unreadable answer scores as well-formed, and GRPO then reinforces
            malformed answers in groups where no sample parses (the demo's "1.1.1.1", issue 19).
        format_weight: weight of the format component (0 or 1) in every task's total.
        iou_weight: weight of the temporal IoU (in [0, 1]) for temporal video grounding ("tvg").
        choice_weight: weight of the multiple-choice accuracy (0 or 1) for "mcq".
        gqa_choice_weight, gqa_iou_weight: weights of answer accuracy and IoU of the grounding span
            for grounded VideoQA ("gqa").
        timestamp_unit: how bare numbers in a predicted span are read: "seconds" (default) or
            "fraction" of the video duration. Clock times ("01:05") and numbers with a unit
            ("12.5s") are always seconds. A row may override it with its own ``timestamp_unit``.
        preset: "megavrl" (default: the rewards above) or "temporal_r1": the tvg reward of the public
            Temporal-R1 code (``megavrl.rewards.temporal_r1``: a JSON span in the first answer block,
            its own format check, no clipping, reversed span = 0, 0.5 format + 0.5 IoU); the
            weights, ``format_mode``, ``answer_position`` and ``timestamp_unit`` above then do not
            apply to tvg. mcq and gqa keep megavrl's rewards (Temporal-R1 publishes none for them).
    """

    answer_position: str = "last"
    format_mode: str = "strict"
    format_needs_answer: bool = True
    format_weight: float = 1.0
    iou_weight: float = 1.0
    choice_weight: float = 1.0
    gqa_choice_weight: float = 1.0
    gqa_iou_weight: float = 1.0
    timestamp_unit: str = "seconds"
    preset: str = "megavrl"

    def __post_init__(self) -> None:
        check_choice("reward.answer_position", self.answer_position, ANSWER_POSITIONS)
        check_choice("reward.format_mode", self.format_mode, FORMAT_MODES)
        check_choice("reward.timestamp_unit", self.timestamp_unit, TIMESTAMP_UNITS)
        check_choice("reward.preset", self.preset, PRESETS)
        if not isinstance(self.format_needs_answer, bool):
            raise ValueError(f"reward.format_needs_answer={self.format_needs_answer!r} must be true or false")
        for name in ("format_weight", "iou_weight", "choice_weight", "gqa_choice_weight", "gqa_iou_weight"):
            check_number(f"reward.{name}", getattr(self, name))
