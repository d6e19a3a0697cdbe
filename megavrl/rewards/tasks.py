"""The task rewards: temporal grounding (IoU), multiple choice (accuracy), grounded QA (both).

Each task's total is ``format_weight * format + sum(weight_c * component_c)`` with the weights
of ``RewardConfig``; ``components`` holds the unweighted values. A response whose answer cannot
be parsed gets 0 on the task components and ``parse_ok=False``; its format component is 0 too
(``RewardConfig.format_needs_answer``, default), or, with that off, the template alone is scored. A row whose ground truth is unusable scores 0 everywhere with
``invalid_sample=True`` (so its whole group has zero advantage).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from megavrl.rewards.config import TIMESTAMP_UNITS, RewardConfig
from megavrl.rewards.format_reward import format_reward
from megavrl.rewards.iou import temporal_iou
from megavrl.rewards.parsing import (Span, as_text, extract_answer, normalize_text, parse_choice,
                                     parse_letter_answer, parse_span)
from megavrl.rewards.registry import RewardResult, register_reward, sample_field
from megavrl.rewards.temporal_r1 import (TEMPORAL_R1_WEIGHTS, temporal_r1_format_reward, temporal_r1_iou,
                                         temporal_r1_span)


class InvalidSampleError(ValueError):
    """A row's ground truth cannot be used (``score`` reports it in the result instead of raising)."""


# ---------------------------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------------------------
def ground_truth_duration(sample: Any) -> Optional[float]:
    """The row's ``duration`` in seconds, or None when absent. Raises ValueError if not a positive number."""
    value = sample_field(sample, "duration")
    if value is None:
        return None
    try:
        duration = float(value)
    except (TypeError, ValueError):
        raise InvalidSampleError(f"duration={value!r} is not a number") from None
    if not math.isfinite(duration) or duration <= 0:
        raise InvalidSampleError(f"duration={value!r} is not a positive number of seconds")
    return duration


def _segment(value: Any, what: str) -> Span:
    if value is None or isinstance(value, (str, bytes)):
        raise InvalidSampleError(f"{what}={value!r} is not a [start, end] pair in seconds")
    try:
        start, end = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidSampleError(f"{what}={value!r} is not a [start, end] pair in seconds") from None
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end < start:
        raise InvalidSampleError(f"{what}={value!r} must satisfy 0 <= start <= end")
    return start, end


def _is_pair_list(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and bool(value)
            and all(isinstance(v, (list, tuple)) for v in value))


def ground_truth_segments(sample: Any) -> list[Span]:
    """Every ground-truth segment of the row, as (start, end) seconds, in order.

    Read from ``meta["spans"]`` when the row has it (the NExT-GQA reader puts every annotated
    segment there), else from ``timestamps``, which may be one pair ``[s, e]`` or a list of pairs.
    Raises InvalidSampleError when missing or when a segment is not 0 <= start <= end.
    """
    meta = sample_field(sample, "meta")
    spans = meta.get("spans") if isinstance(meta, dict) else None
    if spans is not None:
        if not _is_pair_list(spans):
            raise InvalidSampleError(f"meta.spans={spans!r} is not a list of [start, end] pairs in seconds")
        return [_segment(span, "meta.spans segment") for span in spans]
    value = sample_field(sample, "timestamps")
    if _is_pair_list(value):
        return [_segment(span, "timestamps segment") for span in value]
    return [_segment(value, "timestamps")]


def ground_truth_span(sample: Any) -> Span:
    """The row's first ground-truth segment as (start, end) seconds (see ``ground_truth_segments``)."""
    return ground_truth_segments(sample)[0]


def _timestamp_unit(sample: Any, config: RewardConfig) -> str:
    unit = sample_field(sample, "timestamp_unit") or config.timestamp_unit
    if unit not in TIMESTAMP_UNITS:
        raise InvalidSampleError(f"timestamp_unit={unit!r} is not one of {', '.join(TIMESTAMP_UNITS)}")
    return unit


def _options(sample: Any) -> Optional[list]:
    options = sample_field(sample, "options")
    if options is None:
        return None
    if isinstance(options, (str, bytes)) or not hasattr(options, "__len__"):
        raise InvalidSampleError(f"options={options!r} is not a list of strings")
    return list(options) or None


def _reference_answer(sample: Any, options: Optional[list]) -> tuple[Optional[str], str]:
    """(the answer's option letter or None for a free-text answer, the answer text)."""
    answer = sample_field(sample, "answer")
    text = as_text(answer).strip()
    if not text:
        raise InvalidSampleError("the row has no answer")
    letter = parse_letter_answer(text, options)
    if letter is None and options:
        raise InvalidSampleError(f"answer={text!r} is neither an option letter nor one of the {len(options)} options")
    return letter, text


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------
@dataclass
class _Truth:
    """A row's ground truth, validated once before the response is looked at."""

    options: Optional[list] = None
    letter: Optional[str] = None  # the answer's option letter; None for a free-text answer
    reference: str = ""  # the answer text
    span: Optional[Span] = None  # the first segment
    segments: Optional[list] = None  # every segment; the prediction is scored against the best-overlapping one
    duration: Optional[float] = None
    unit: str = "seconds"


def _ground_truth(names: tuple[str, ...], sample: Any, config: RewardConfig) -> _Truth:
    truth = _Truth()
    if "choice" in names:
        truth.options = _options(sample)
        truth.letter, truth.reference = _reference_answer(sample, truth.options)
    if "iou" in names:
        truth.segments = ground_truth_segments(sample)
        truth.span = truth.segments[0]
        truth.duration = ground_truth_duration(sample)
        truth.unit = _timestamp_unit(sample, config)
        if truth.unit == "fraction" and truth.duration is None:
            raise InvalidSampleError("timestamp_unit='fraction' needs the row's duration")
    return truth


def _same_free_answer(pred: str, reference: str) -> bool:
    """Free-text answers match when equal after ``normalize_text``, or numerically equal."""
    try:
        a, b = float(pred.strip()), float(reference.strip())
        if math.isfinite(a) and math.isfinite(b):
            return a == b
    except ValueError:
        pass
    return bool(normalize_text(pred)) and normalize_text(pred) == normalize_text(reference)


def _choice_score(answer: str, truth: _Truth, parsed: dict) -> tuple[float, Optional[str]]:
    """(accuracy 0/1, parse error or None) of an answer text against the row's answer."""
    if truth.letter is None:
        parsed["choice"] = answer
        return float(_same_free_answer(answer, truth.reference)), (None if answer else "empty answer")
    choice = parse_choice(answer, truth.options)
    parsed["choice"] = choice
    if choice is None:
        return 0.0, "no option letter in the answer"
    return float(choice == truth.letter), None


def _iou_score(answer: str, truth: _Truth, parsed: dict) -> tuple[float, Optional[str]]:
    """(temporal IoU, parse error or None) of the span in an answer text against the row's segments:
    the IoU with the best-overlapping segment (NExT-GQA's rule; one segment for tvg)."""
    span = parse_span(answer, truth.duration, truth.unit)
    parsed["span"] = span
    if span is None:
        return 0.0, "no time span in the answer"
    return max(temporal_iou(span, segment, truth.duration) for segment in truth.segments), None


def _reward(names: tuple[str, ...], weights: dict[str, float], response: str, sample: Any,
            config: RewardConfig) -> RewardResult:
    try:
        truth = _ground_truth(names, sample, config)
    except InvalidSampleError as exc:
        return RewardResult(total=0.0, components={name: 0.0 for name in names}, parsed={}, parse_ok=False,
                            error=f"invalid sample {sample_field(sample, 'id')!r}: {exc}", invalid_sample=True)
    components = {name: 0.0 for name in names}
    components["format"] = format_reward(response, config.format_mode)
    answer = extract_answer(response, config.answer_position)
    parsed: dict[str, Any] = {"answer": answer}
    errors: list[str] = []
    if answer is None:
        errors.append("no <answer>...</answer> block")
    else:
        if "choice" in names:
            components["choice"], error = _choice_score(answer, truth, parsed)
            errors += [error] if error else []
        if "iou" in names:
            components["iou"], error = _iou_score(answer, truth, parsed)
            errors += [error] if error else []
    if errors and config.format_needs_answer:
        # A template around an unreadable answer ("<answer>1.1.1.1</answer>") is not the format the
        # task asks for. Rewarding it as such made GRPO reinforce malformed answers whenever no
        # sample of a group parsed (their format was the only reward that varied).
        components["format"] = 0.0
    total = sum(weights[name] * value for name, value in components.items())
    return RewardResult(total=float(total), components=components, parsed=parsed,
                        parse_ok=not errors, error="; ".join(errors) or None)


_TASK_COMPONENTS = {"tvg": ("format", "iou"), "mcq": ("format", "choice"), "gqa": ("format", "choice", "iou")}


def validate_sample(task: str, sample: Any, config: Optional[RewardConfig] = None) -> Optional[str]:
    """Why the row's ground truth cannot be scored for ``task``, or None when it can.

    For a data pipeline that reports and skips bad rows before training. Tasks registered
    outside this module are not checked (None).
    """
    names = _TASK_COMPONENTS.get(task)
    if names is None:
        return None
    try:
        _ground_truth(names, sample, config or RewardConfig())
    except InvalidSampleError as exc:
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------
# The registered tasks
# ---------------------------------------------------------------------------------------------
@register_reward("tvg")
def temporal_grounding_reward(response: str, sample: Any, config: RewardConfig) -> RewardResult:
    """Temporal video grounding: ``format_weight * format + iou_weight * IoU(pred span, timestamps)``.

    Components: ``format`` (0/1), ``iou`` (in [0, 1], seconds, clipped to the duration).
    With ``config.preset == "temporal_r1"``: Temporal-R1's reward (``_temporal_r1_reward``).
    """
    if config.preset == "temporal_r1":
        return _temporal_r1_reward(response, sample, config)
    return _reward(_TASK_COMPONENTS["tvg"], {"format": config.format_weight, "iou": config.iou_weight},
                   response, sample, config)


def _temporal_r1_reward(response: str, sample: Any, config: RewardConfig) -> RewardResult:
    """``0.5 * format + 0.5 * IoU`` as the public Temporal-R1 code computes them (``megavrl.rewards.temporal_r1``).

    The IoU is taken with the best-overlapping ground-truth segment (a tvg row has one).
    """
    try:
        segments = ground_truth_segments(sample)
    except InvalidSampleError as exc:
        return RewardResult(total=0.0, components={"format": 0.0, "iou": 0.0}, parsed={}, parse_ok=False,
                            error=f"invalid sample {sample_field(sample, 'id')!r}: {exc}", invalid_sample=True)
    fmt = temporal_r1_format_reward(response)
    span = temporal_r1_span(response)
    iou = max(temporal_r1_iou(span, segment) for segment in segments) if span is not None else 0.0
    components = {"format": fmt, "iou": iou}
    total = sum(TEMPORAL_R1_WEIGHTS[name] * value for name, value in components.items())
    error = None if span is not None else 'no {"start_time": .., "end_time": ..} JSON in the first <answer> block'
    return RewardResult(total=float(total), components=components, parsed={"span": span},
                        parse_ok=span is not None, error=error)


@register_reward("mcq")
def multiple_choice_reward(response: str, sample: Any, config: RewardConfig) -> RewardResult:
    """Multiple-choice QA: ``format_weight * format + choice_weight * [pred letter == answer letter]``.

    Components: ``format`` (0/1), ``choice`` (0/1). Without options, a free-text answer is
    compared after normalisation (or numerically).
    """
    return _reward(_TASK_COMPONENTS["mcq"], {"format": config.format_weight, "choice": config.choice_weight},
                   response, sample, config)


@register_reward("gqa")
def grounded_qa_reward(response: str, sample: Any, config: RewardConfig) -> RewardResult:
    """Grounded VideoQA: ``format_weight * format + gqa_choice_weight * choice + gqa_iou_weight * iou``.

    The answer block holds both the option and the grounding span, e.g.
    ``{"answer": "B", "start_time": 12.5, "end_time": 17.8}`` or ``(B) 12.5 to 17.8``.
    Components: ``format``, ``choice`` (0/1), ``iou`` (in [0, 1]).
    """
    weights = {"format": config.format_weight, "choice": config.gqa_choice_weight, "iou": config.gqa_iou_weight}
    return _reward(_TASK_COMPONENTS["gqa"], weights, response, sample, config)
