"""A warning, once, when GRPO starts from a model that gives it nothing to learn from.

GRPO learns from differences between the rewards of a prompt's n responses. A model that never
writes a parsable answer (a random model, a base model without the answer format) scores 0 on
every response: every group has zero variance, every advantage is 0, the gradient is 0, and the
run "trains" for its whole budget without changing a weight. That is measured, not guessed: on the
first step's rollouts, ``reward/parse_fail_rate`` is 1 (no response of any prompt had an answer).
"""
from __future__ import annotations

from typing import Mapping

from megavrl.log import get_logger

log = get_logger(__name__)


def no_learning_signal_message(metrics: Mapping[str, float], hf_dir: str | None) -> str | None:
    """The warning for a step's metrics, or None when some response had a parsable answer."""
    rate = metrics.get("reward/parse_fail_rate")
    if rate is None or float(rate) < 1.0:
        return None
    return (f"no response of this step had a parsable answer (reward/parse_fail_rate=1): every reward "
            f"is 0, so GRPO's advantages and gradient are 0 and training cannot move the model "
            f"(model.hf_dir={hf_dir}). Start GRPO from a model that answers in the expected format: "
            f"a warm start with algorithm.name=sft first (`make demo` writes one to runs/demo/sft/hf).")


class LearningSignalCheck:
    """``check(step, metrics)`` after each GRPO step; warns at most once per run, on the first step."""

    def __init__(self, hf_dir: str | None):
        self.hf_dir = hf_dir
        self.done = False

    def check(self, step: int, metrics: Mapping[str, float]) -> None:
        if self.done:
            return
        self.done = True  # the first step this process trains decides; later steps may recover
        message = no_learning_signal_message(metrics, self.hf_dir)
        if message is not None:
            log.warning("step %d: %s", step, message)
