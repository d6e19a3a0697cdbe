"""The temporal-grounding reward of the public Temporal-R1 code (``reward.preset: temporal_r1``).

Written from the definitions in ``verl/utils/reward_score/tvg.py`` of appletea233/Temporal-R1 (the
repository of Li et al. 2025), not copied:

- format: the whole response is ``<think>...</think>`` then, after optional whitespace,
  ``<answer>{"start_time": "S", "end_time": "E"}</answer>`` where S and E are quoted strings of
  digits and dots (whitespace allowed around the braces, keys, colons and comma; ``.`` in the think
  block matches newlines). 1.0 or 0.0.
- accuracy: the first ``<answer>...</answer>`` block (case-sensitive tags, shortest match), stripped,
  read with ``json.loads``; its ``start_time`` and ``end_time`` go through Python's ``float`` (so
  numbers, numeric strings, "-1.4", "1e1", "nan" are all read as ``float`` reads them). The IoU
  with the ground truth is ``max(min(e_p, e_g) - max(s_p, s_g), 0) / (max(e_p, e_g) - min(s_p, s_g))``,
  then ``max(0, .)``, without clipping to the video; a reversed span therefore scores 0. Anything
  that fails (no block, bad JSON, missing key, a zero union) scores 0.
- total: ``0.5 * format + 0.5 * accuracy``. The public file's current revision weights them
  0.9/0.1 with a commented-out ``reward /= 2`` under ``reward = acc + format``, i.e. the equal
  weighting used here; ``TEMPORAL_R1_WEIGHTS`` names the weights in one place.

Temporal-R1 divides both spans by the video length before the IoU; the IoU is invariant to that
scaling, so here it is computed in seconds (equal up to the last floating-point bit).
"""
from __future__ import annotations

import json
import re
from typing import Optional, Sequence

from megavrl.rewards.parsing import Span, as_text

TEMPORAL_R1_WEIGHTS = {"format": 0.5, "iou": 0.5}
"""Weights of the format and IoU components in the Temporal-R1 total."""

_FORMAT = re.compile(r'<think>.*?</think>\s*<answer>\s*\{\s*"start_time"\s*:\s*"([\d.]+)"\s*,\s*'
                     r'"end_time"\s*:\s*"([\d.]+)"\s*\}\s*</answer>', re.DOTALL)
_FIRST_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def temporal_r1_format_reward(response: object) -> float:
    """1.0 if the whole response is ``<think>..</think> <answer>{"start_time": "S", "end_time": "E"}</answer>``."""
    return 1.0 if _FORMAT.fullmatch(as_text(response)) else 0.0


def temporal_r1_span(response: object) -> Optional[Span]:
    """(start, end) read from the JSON of the first answer block, as given (not swapped, not clipped).

    None when there is no answer block, its content is not JSON, or a key is missing or not
    convertible by ``float``.
    """
    match = _FIRST_ANSWER.search(as_text(response))
    if match is None:
        return None
    try:
        data = json.loads(match.group(1).strip())
        return float(data["start_time"]), float(data["end_time"])
    except Exception:  # anything Temporal-R1's try/except would swallow
        return None


def temporal_r1_iou(pred: Sequence[float], gt: Sequence[float]) -> float:
    """Temporal-R1's IoU of two (start, end) spans: no clipping, 0 for a reversed prediction or an empty union."""
    max0, min0 = max(pred[0], gt[0]), min(pred[0], gt[0])
    max1, min1 = max(pred[1], gt[1]), min(pred[1], gt[1])
    union = max1 - min0
    if union == 0:
        return 0.0  # Temporal-R1's ZeroDivisionError, caught
    return float(max(0, max(min1 - max0, 0) / union))
