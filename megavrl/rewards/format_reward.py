"""The format reward: did the response follow the ``<think>...</think><answer>...</answer>`` template?"""
from __future__ import annotations

import re

from megavrl.rewards.parsing import answer_blocks, as_text

# Exactly one think block, then exactly one answer block, nothing else but whitespace. The tag
# counts are checked first, so the lazy groups below cannot backtrack over a second tag.
_STRICT = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_reward(response: object, mode: str = "strict") -> float:
    """1.0 if ``response`` follows the answer template, else 0.0.

    Args:
        response: the decoded response (any object; non-strings are converted, never raises).
        mode: "strict": the whole response is ``<think>T</think><answer>A</answer>`` with
            whitespace allowed around and between the blocks, each tag exactly once, lower-case,
            and a non-empty (after stripping) answer A; T may be empty. "lenient": at least one
            closed ``<answer>`` block with non-empty content, anywhere, tags in any case.
    """
    if mode not in ("strict", "lenient"):
        raise ValueError(f"format mode {mode!r} is not one of 'strict', 'lenient'")
    text = as_text(response)
    if mode == "lenient":
        return 1.0 if any(block.strip() for block in answer_blocks(text)) else 0.0
    if any(text.count(tag) != 1 for tag in _TAGS):
        return 0.0
    match = _STRICT.fullmatch(text)
    return 1.0 if match is not None and match.group(2).strip() else 0.0
