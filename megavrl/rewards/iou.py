"""Temporal intersection-over-union of two spans, in seconds."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional, Sequence


def temporal_iou(pred: Optional[Sequence[float]], gt: Optional[Sequence[float]],
                 duration: Optional[float] = None) -> float:
    """IoU of two (start, end) spans in seconds, after clipping both to [0, duration].

    Args:
        pred: predicted (start, end), seconds; None, a wrong length, a non-number, a non-finite
            value or start > end give 0.0 (an invalid prediction). Never raises.
        gt: ground-truth (start, end), seconds; invalid in the same ways gives 0.0.
        duration: the video length in seconds; None (or not a positive finite number) clips
            to [0, +inf) only.
    Returns:
        |pred ∩ gt| / |pred ∪ gt| in [0, 1], where |pred ∪ gt| = |pred| + |gt| - |pred ∩ gt|;
        0.0 when the union is empty (both spans empty after clipping).
    """
    a, b = as_span(pred), as_span(gt)
    if a is None or b is None:
        return 0.0
    upper = math.inf
    try:
        if duration is not None and math.isfinite(float(duration)) and float(duration) > 0:
            upper = float(duration)
    except (TypeError, ValueError):
        pass
    a0, a1 = min(max(a[0], 0.0), upper), min(max(a[1], 0.0), upper)
    b0, b1 = min(max(b[0], 0.0), upper), min(max(b[1], 0.0), upper)
    inter = max(0.0, min(a1, b1) - max(a0, b0))
    union = (a1 - a0) + (b1 - b0) - inter
    if union <= 0.0:
        return 0.0
    return min(1.0, max(0.0, inter / union))


def as_span(value: object, swap_reversed: bool = False) -> Optional[tuple[float, float]]:
    """``value`` as a (start, end) pair of finite floats with start <= end, else None. Never raises.

    swap_reversed: a reversed pair is swapped instead of refused (as lmms-eval's ``extract_time``).
    Strings, bytes and mappings are not spans (iterating them would read characters or keys).
    """
    if value is None or isinstance(value, (str, bytes, Mapping)):
        return None
    try:
        start, end = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError, OverflowError):
        return None
    if not (math.isfinite(start) and math.isfinite(end)):
        return None
    if start > end:
        return (end, start) if swap_reversed else None
    return start, end
