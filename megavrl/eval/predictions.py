"""Prediction records: one model answer per evaluation sample, scored against its ground truth.

A prediction record is a dict::

    {
      "id": "charades/3MSZA#0",            # the row id
      "task": "tvg" | "mcq" | "gqa",       # which metrics apply
      "benchmark": "charades_sta",         # optional: the group it is reported under (default: task)
      "response": "<think>..</think><answer>12.5 to 17.8</answer>",   # the raw model output, or
      "prediction": {"span": [12.5, 17.8], "choice": "B"},             # an already parsed answer
      "ground_truth": {"timestamps": [12.0, 18.0], "duration": 30.0,   # seconds; gqa may give a
                       "answer": "B", "options": ["...", "..."],       # list of [start, end] pairs,
                       "meta": {"spans": [[12.0, 18.0], [20.0, 25.0]]}},  # or every segment here
    }

A raw ``response`` is parsed exactly as the training reward parses it (``megavrl.rewards.score``:
the last ``<answer>`` block, then a span and/or an option letter), so evaluation and reward never
disagree on what the model answered. With ``response`` absent, ``prediction`` is used as is. In
both paths a reversed span is swapped (``megavrl.eval.metrics.ordered_span``), and the ground
truth's segments are the reward's (``megavrl.rewards.ground_truth_segments``: ``meta.spans``, as
the NExT-GQA reader writes them, else ``timestamps``). Multiple-choice answers are judged twice:
``correct`` by lmms-eval's extraction (the primary accuracy), ``correct_lenient`` by megavrl's.
``score_prediction`` returns the record with its per-sample values added; ``megavrl.eval.metrics``
aggregates them.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

from megavrl.eval.metrics import (TASK_METRICS, Span, best_lmms_eval_iou, best_overlap, lmms_eval_choice_correct,
                                  ordered_span)

_NEEDS_SPAN = ("tvg", "gqa")
_NEEDS_CHOICE = ("mcq", "gqa")


class InvalidRecord(ValueError):
    """A record that cannot be scored (bad ground truth, unknown task): counted, never raised to callers."""


def ground_truth_segments(ground_truth: Mapping[str, Any]) -> list[Span]:
    """Every ground-truth segment as (start, end) seconds: ``meta["spans"]`` when present, else
    ``timestamps`` (one pair ``[s, e]`` or a list of pairs; NExT-GQA gives several segments for some
    questions). The reward's reading (``megavrl.rewards.ground_truth_segments``); raises
    InvalidRecord unless every segment has 0 <= start <= end.
    """
    from megavrl.rewards import InvalidSampleError
    from megavrl.rewards import ground_truth_segments as reward_segments

    try:
        return reward_segments(ground_truth)
    except InvalidSampleError as exc:
        raise InvalidRecord(str(exc)) from None


def _answer_letter(ground_truth: Mapping[str, Any]) -> Optional[str]:
    from megavrl.rewards import parse_letter_answer

    options = ground_truth.get("options") or None
    answer = ground_truth.get("answer")
    if answer is None or not str(answer).strip():
        raise InvalidRecord("the ground truth has no answer")
    letter = parse_letter_answer(answer, options)
    if letter is None and options:
        raise InvalidRecord(f"answer={answer!r} is neither an option letter nor one of the {len(options)} options")
    return letter


def _lmms_eval_correct(text: object, ground_truth: Mapping[str, Any]) -> bool:
    """lmms-eval's MVBench judgement of ``text``; a free-text answer (no letter) falls back to megavrl's."""
    letter = _answer_letter(ground_truth)
    if letter is None:
        return _choice_is_correct(text, ground_truth)
    return text is not None and lmms_eval_choice_correct(text, letter)


def _choice_is_correct(choice: object, ground_truth: Mapping[str, Any]) -> bool:
    """Whether an already parsed choice (a letter or an option's text) matches the answer."""
    from megavrl.rewards import normalize_text, parse_letter_answer

    options = ground_truth.get("options") or None
    answer = ground_truth.get("answer")
    if answer is None or not str(answer).strip():
        raise InvalidRecord("the ground truth has no answer")
    answer_letter = parse_letter_answer(answer, options)
    if answer_letter is None and options:
        raise InvalidRecord(f"answer={answer!r} is neither an option letter nor one of the {len(options)} options")
    if choice is None:
        return False
    if answer_letter is not None:
        return parse_letter_answer(choice, options) == answer_letter
    return bool(normalize_text(choice)) and normalize_text(choice) == normalize_text(answer)


def _score_response(task: str, response: object, ground_truth: Mapping[str, Any], reward_config: Any
                    ) -> dict[str, Any]:
    from megavrl.rewards import score

    text = "" if response is None else response
    result = score(task, text, dict(ground_truth), reward_config)
    if result.invalid_sample:
        raise InvalidRecord(result.error or "invalid ground truth")
    span = ordered_span(result.parsed.get("span"))
    answer = result.parsed.get("answer")
    correct = correct_lenient = None
    if task in _NEEDS_CHOICE:
        correct_lenient = result.components.get("choice", 0.0) == 1.0
        correct = correct_lenient
        if task == "mcq":  # lmms-eval reads the answer block's content, or the whole response without one
            correct = _lmms_eval_correct(answer if answer is not None else text, ground_truth)
    return {
        "prediction": {"answer": answer,
                       "span": list(span) if span is not None else None,
                       "choice": result.parsed.get("choice")},
        "correct": correct,
        "correct_lenient": correct_lenient,
        "format": result.components.get("format", 0.0),
        "parse_ok": result.parse_ok,
        "error": result.error,
    }


def _score_parsed(task: str, prediction: object, ground_truth: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(prediction, Mapping):
        raise InvalidRecord(f"prediction={prediction!r} is not a mapping such as {{'span': [s, e], 'choice': 'B'}}")
    errors = []
    span = ordered_span(prediction.get("span"))
    if task in _NEEDS_SPAN and span is None:
        errors.append(f"span={prediction.get('span')!r} is not a [start, end] pair in seconds")
    choice = prediction.get("choice")
    correct = correct_lenient = None
    if task in _NEEDS_CHOICE:
        correct = correct_lenient = _choice_is_correct(choice, ground_truth)
        if task == "mcq":
            correct = _lmms_eval_correct(choice, ground_truth)
        if choice is None:
            errors.append("no choice")
    return {
        "prediction": {"span": list(span) if span is not None else None, "choice": choice},
        "correct": correct,
        "correct_lenient": correct_lenient,
        "format": None,
        "parse_ok": not errors,
        "error": "; ".join(errors) or None,
    }


def prediction_record(row: Any, response: object, benchmark: Optional[str] = None) -> dict[str, Any]:
    """A prediction record for a dataset row and the model's response.

    Args:
        row: a dataset row: a mapping with the row schema of ``megavrl.data.schema`` or an object
            with ``to_row()`` (a ``Sample``); the whole row becomes the ``ground_truth``.
        response: the decoded model response.
        benchmark: the group to report it under; default: the row's ``dataset``, else its task.
    """
    fields = row.to_row() if hasattr(row, "to_row") else dict(row)
    dataset = getattr(row, "dataset", None) or fields.get("dataset")
    return {"id": fields.get("id"), "task": fields.get("task"), "benchmark": benchmark or dataset or fields.get("task"),
            "response": response, "ground_truth": fields}


def score_prediction(record: Mapping[str, Any], reward_config: Any = None) -> dict[str, Any]:
    """Score one prediction record; never raises on a bad record (it comes back ``invalid``).

    Args:
        record: see the module docstring.
        reward_config: a ``megavrl.rewards.RewardConfig`` (or a mapping of its fields) deciding how
            responses are parsed (answer block position, timestamp unit); None = the defaults.
    Returns:
        a new dict: ``id``, ``task``, ``benchmark``, ``response`` (when given), ``ground_truth``,
        ``prediction`` (what was read: ``span``, ``choice``, ``answer``), ``iou`` and ``iop``
        (tvg: lmms-eval's IoU; gqa: NExT-GQA's IoU and IoP with the best-overlapping segment; in
        [0, 1]; 0 when no span was parsed), ``correct`` (mcq: lmms-eval's extraction; gqa),
        ``correct_lenient`` (mcq/gqa: megavrl's parser), ``format`` (1.0
        when the response follows the answer template; None for a parsed prediction),
        ``parse_ok``, ``error`` and ``invalid`` (True: the ground truth or the record is unusable;
        the sample is left out of the metrics and counted).
    """
    task = record.get("task")
    out: dict[str, Any] = {"id": record.get("id"), "task": task, "benchmark": record.get("benchmark") or task}
    if "response" in record:
        out["response"] = record["response"]
    ground_truth = record.get("ground_truth")
    out["ground_truth"] = ground_truth
    try:
        if task not in TASK_METRICS:
            raise InvalidRecord(f"task {task!r} has no metrics; known tasks: {', '.join(TASK_METRICS)}")
        if not isinstance(ground_truth, Mapping):
            raise InvalidRecord(f"ground_truth={ground_truth!r} is not a mapping")
        segments = ground_truth_segments(ground_truth) if task in _NEEDS_SPAN else None
        if "response" in record:
            values = _score_response(task, record["response"], ground_truth, reward_config)
        elif "prediction" in record:
            values = _score_parsed(task, record["prediction"], ground_truth)
        else:
            raise InvalidRecord("the record has neither a response nor a prediction")
    except InvalidRecord as exc:
        out.update(prediction=None, iou=None, iop=None, correct=None, correct_lenient=None, format=None,
                   parse_ok=False, error=f"invalid record {record.get('id')!r}: {exc}", invalid=True)
        return out
    span = values["prediction"]["span"]
    if task == "tvg":
        values["iou"], values["iop"] = best_lmms_eval_iou(span, segments), None
    elif task == "gqa":
        values["iou"], values["iop"] = best_overlap(span, segments)
    else:
        values["iou"] = values["iop"] = None
    out.update(prediction=values["prediction"], iou=values["iou"], iop=values["iop"], correct=values["correct"],
               correct_lenient=values["correct_lenient"], format=values["format"], parse_ok=values["parse_ok"],
               error=values["error"], invalid=False)
    return out


def score_predictions(records: Iterable[Mapping[str, Any]], reward_config: Any = None) -> list[dict[str, Any]]:
    """``score_prediction`` for each record, in order."""
    return [score_prediction(record, reward_config) for record in records]


def evaluate_predictions(records: Iterable[Mapping[str, Any]], reward_config: Any = None,
                         expected: Optional[Mapping[str, str]] = None
                         ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score ``records`` and aggregate them: returns (scored records, metrics dict).

    ``expected`` (benchmark -> task) lists benchmarks to report even when they have no sample.
    See ``megavrl.eval.metrics.aggregate_metrics`` for the metrics dict.
    """
    from megavrl.eval.metrics import aggregate_metrics

    scored = score_predictions(records, reward_config)
    return scored, aggregate_metrics(scored, expected)

