"""Evaluation metrics: temporal grounding, multiple choice and grounded QA, per benchmark and overall.

Every metric is a percentage in [0, 100]. A sample whose *ground truth* is unusable is left out of
every denominator and counted in ``n_invalid``; a response whose answer cannot be parsed is counted
in ``n_parse_failures``. A benchmark with no valid sample reports ``None`` for each metric (``null``
in JSON) and is left out of the overall score. Each metric follows one public script, with its
arithmetic (operation order included), so that a value on a threshold falls on the same side:

Temporal video grounding (task "tvg"): lmms-eval, ``lmms_eval/tasks/charades_sta/eval_tvg.py``
(also used for ActivityNet Captions)::

    IoU_i = max(min(p_e, g_e) - max(p_s, g_s), 0) / (max(p_e, g_e) - min(p_s, g_s))     [seconds]
    mIoU  = sum_i IoU_i * 100 / n,   R@t = #{i : IoU_i >= t} * 100 / n,   t in (0.3, 0.5, 0.7)

  A reversed predicted pair is swapped first (lmms-eval's ``extract_time`` does). An unparsable
  prediction is replaced by lmms-eval with [g_e + 10, g_e + 20], disjoint from the truth: IoU 0,
  still in n; so here. No clipping to the video (lmms-eval does not clip; the training reward does).

Multiple choice (task "mcq"): lmms-eval, ``lmms_eval/tasks/mvbench/utils.py`` (``mcq_acc``,
``mvbench_aggregate_results``)::

    accuracy          = 100 * #{process(pred_i) == process(answer letter_i)} / n     (primary)
    accuracy_nonempty = 100 * #{correct and response_i != ""} / #{response_i != ""}  (lmms-eval's aggregate)
    accuracy_lenient  = 100 * #{megavrl's parse_choice gives the answer letter} / n  (secondary)

  ``process`` is lmms-eval's answer extraction (``lmms_eval_choice``): a leading "B. ..." gives B,
  else punctuation is stripped, the text lower-cased, and the first stand-alone letter A-E (any
  case, so the article "a" reads as A) is the answer, else the whole processed text. "A or B"
  thus reads A. ``pred`` is the content of the answer block (``reward.answer_position``), or the
  whole response when it has none (lmms-eval's Qwen2.5-VL wrapper hands it the whole response;
  on an R1-style response that would read the first stray letter of the reasoning).
  ``accuracy_lenient`` is megavrl's own reading (also credits an answer that gives only the
  option's text); it is what the training reward uses.

Grounded QA (task "gqa"): NExT-GQA, ``code/TempGQA/eval_ground.py`` of doc-doc/NExT-GQA
(Xiao et al., CVPR 2024)::

    per segment (loc) and prediction (span): point span -> (0, 1 if loc_s <= span_s <= loc_e else 0);
      inter = min(loc_e, span_e) - max(loc_s, span_s), IoU = inter / (max(ends) - min(starts)),
      IoP = inter / (span_e - span_s)
    IoU_i, IoP_i = max(0, max over the segments)        (the best-overlapping segment)
    over the m questions WITH a predicted span (the official script skips the others):
      mIoU = sum IoU_i / m * 100,  IoU@t = #{IoU_i >= t} / m * 100,  the same for IoP,
      Acc@GQA = #{IoP_i >= 0.5 and answer correct} / m * 100
    Acc@QA = #{answer correct} / n * 100 over all n questions (NExT-QA's accuracy)

  ``n_no_span`` counts the questions left out of the grounding denominators. No clipping
  (the official script clips neither end); reversed predicted pairs are swapped, as for tvg.

Overall: ``mean_primary`` is the unweighted mean, over the benchmarks with at least one valid
sample, of each benchmark's primary metric (``PRIMARY_METRIC``: mIoU for "tvg", accuracy for
"mcq", Acc@GQA for "gqa"). Every benchmark counts once, whatever its size. A gqa benchmark where no
question got a predicted span reports Acc@GQA and the grounding metrics as None (the official
denominator is 0) and counts 0 in the overall mean.

Standard errors (``stderr``): lmms-eval's for a mean (``lmms_eval/api/metrics.py``,
``mean_stderr``)::

    stderr = sample_stddev(x) / sqrt(m),   sample_stddev(x) = sqrt(sum_i (x_i - mean(x))^2 / (m - 1))

  over the m rows of the metric's own denominator, x_i being the row's own value in percent (its
  IoU x 100, 100 or 0 for correct or not). Every metric above is such a mean; ``metric_stderr``
  checks it (a metric that is not would raise, not be given a wrong error). It is the row-sampling
  error of one evaluation; the change between two evaluations of the same rows has the paired
  interval of ``megavrl.eval.paired``, which is narrower (the rows' difficulty cancels).
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping, Optional, Sequence

from megavrl.log import get_logger
from megavrl.rewards.iou import as_span

logger = get_logger(__name__)

Span = tuple[float, float]

RECALL_THRESHOLDS = (0.3, 0.5, 0.7)
"""IoU thresholds of R@t for temporal grounding (lmms-eval's Charades-STA)."""
GQA_THRESHOLDS = (0.3, 0.5)
"""IoU and IoP thresholds reported for grounded QA (NExT-GQA)."""
GQA_IOP_THRESHOLD = 0.5
"""IoP a correct answer needs to count in Acc@GQA (NExT-GQA)."""

TASK_METRICS: dict[str, tuple[str, ...]] = {
    "tvg": ("mIoU",) + tuple(f"R@{t}" for t in RECALL_THRESHOLDS),
    "mcq": ("accuracy", "accuracy_nonempty", "accuracy_lenient"),
    "gqa": ("Acc@QA", "Acc@GQA", "mIoU") + tuple(f"IoU@{t}" for t in GQA_THRESHOLDS)
           + ("mIoP",) + tuple(f"IoP@{t}" for t in GQA_THRESHOLDS),
}
"""The metrics reported for each task, in report order."""

TASK_COUNTS: dict[str, tuple[str, ...]] = {"gqa": ("n_no_span",)}
"""Counts reported for a task besides n, n_parse_failures and n_invalid."""

PRIMARY_METRIC: dict[str, str] = {"tvg": "mIoU", "mcq": "accuracy", "gqa": "Acc@GQA"}
"""The metric of each task that enters the overall score."""

BLIND_KEY = "blind"
"""Flat metric keys ``<benchmark>/blind/<metric>`` hold the blind baseline of ``<benchmark>/<metric>``."""

STDERR_KEY = "stderr"
"""Flat metric keys ``<benchmark>/stderr/<metric>`` hold the standard error of ``<benchmark>/<metric>``."""

TASK_TITLES: dict[str, str] = {"tvg": "Temporal video grounding", "mcq": "Multiple-choice QA",
                               "gqa": "Grounded QA"}


# ---------------------------------------------------------------------------------------------
# Overlaps of two spans
# ---------------------------------------------------------------------------------------------
def ordered_span(value: object) -> Optional[Span]:
    """A predicted (start, end) pair of finite seconds with a reversed pair swapped, else None.

    Every evaluation path (a raw response, an already parsed prediction) goes through it, as
    lmms-eval's ``extract_time`` swaps a reversed pair.
    """
    return as_span(value, swap_reversed=True)


def lmms_eval_iou(pred: Sequence[float], gt: Sequence[float]) -> float:
    """IoU of two ordered (start, end) spans in lmms-eval's arithmetic (``eval_tvg.py``'s ``iou``).

    ``max(min(p_e, g_e) - max(p_s, g_s), 0) / (max(p_e, g_e) - min(p_s, g_s))``, no clipping; 0.0 for
    an empty union (lmms-eval would divide by zero; it cannot happen with a non-empty ground truth).
    """
    union = max(pred[1], gt[1]) - min(pred[0], gt[0])
    if union <= 0:
        return 0.0
    return max(min(pred[1], gt[1]) - max(pred[0], gt[0]), 0) / union


def next_gqa_overlap(pred: Sequence[float], segment: Sequence[float]) -> tuple[float, float]:
    """(IoU, IoP) of an ordered prediction with one ground-truth segment, as NExT-GQA's ``get_tIoU``.

    May be negative for disjoint spans (the official maximum starts at 0, see ``best_overlap``).
    """
    if pred[0] == pred[1]:
        return 0.0, (1.0 if segment[0] <= pred[0] <= segment[1] else 0.0)
    inter = min(segment[1], pred[1]) - max(segment[0], pred[0])
    hull = max(segment[1], pred[1]) - min(segment[0], pred[0])
    iou = inter / hull if hull > 0 else 0.0
    iop = inter / (pred[1] - pred[0]) if pred[1] > pred[0] else 0.0
    return iou, iop


def temporal_iop(pred: object, gt: object) -> float:
    """Intersection over prediction of two (start, end) spans in seconds, as NExT-GQA defines it.

    Returns ``|pred ∩ gt| / |pred|`` in [0, 1]; for a zero-length prediction, 1.0 when the point
    lies inside ``gt`` (bounds included) and 0.0 otherwise. An invalid span gives 0.0; a reversed
    prediction is swapped.
    """
    p, g = ordered_span(pred), as_span(gt)
    if p is None or g is None:
        return 0.0
    return max(0.0, next_gqa_overlap(p, g)[1])


def best_overlap(pred: object, segments: Sequence[Span]) -> tuple[float, float]:
    """(max IoU, max IoP) of ``pred`` over the ground-truth ``segments``, NExT-GQA's ``eval_ground``.

    Each is maximised apart, starting from 0 (a disjoint segment contributes 0). Not clipped. A
    missing or invalid prediction, or no segment, gives (0.0, 0.0); a reversed one is swapped.
    """
    span = ordered_span(pred)
    best_iou, best_iop = 0.0, 0.0
    if span is None:
        return best_iou, best_iop
    for segment in segments:
        iou, iop = next_gqa_overlap(span, segment)
        if iou > best_iou:
            best_iou = iou
        if iop > best_iop:
            best_iop = iop
    return best_iou, best_iop


def best_lmms_eval_iou(pred: object, segments: Sequence[Span]) -> float:
    """lmms-eval's IoU of ``pred`` with the best of ``segments`` (a tvg row has one); 0.0 without a span."""
    span = ordered_span(pred)
    if span is None or not segments:
        return 0.0
    return max(lmms_eval_iou(span, segment) for segment in segments)


# ---------------------------------------------------------------------------------------------
# lmms-eval's multiple-choice answer extraction (lmms_eval/tasks/mvbench/utils.py, mcq_acc)
# ---------------------------------------------------------------------------------------------
_LMMS_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                     ",", "?", "!")
_LMMS_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a look-ahead for "<=" + digit, as published
_LMMS_DIGIT_COMMA = re.compile(r"(\d)(\,)(\d)")
_LMMS_LEADING_OPTION = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE)
_LMMS_LETTER = re.compile(r"\b([A-E])\b", re.IGNORECASE)


def _lmms_strip_punctuation(text: str) -> str:
    out = text
    glued = _LMMS_DIGIT_COMMA.search(text) is not None
    for mark in _LMMS_PUNCTUATION:
        # Decided on the original text, applied to the running one, as published.
        out = out.replace(mark, "" if (mark + " " in text or " " + mark in text or glued) else " ")
    # lmms-eval passes re.UNICODE (= 32) as the positional ``count``: at most 32 periods go.
    return _LMMS_PERIOD.sub("", out, count=int(re.UNICODE))


def lmms_eval_choice(text: object) -> str:
    """lmms-eval's MVBench answer extraction (``mcq_acc``'s ``process``): a letter "A".."E" or the processed text."""
    answer = "" if text is None else str(text)
    leading = _LMMS_LEADING_OPTION.match(answer.strip())
    if leading:
        return leading.group(1).upper()
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    answer = _lmms_strip_punctuation(answer)
    answer = answer.strip("'").strip('"').strip(")").strip("(").strip().lower()
    letter = _LMMS_LETTER.search(answer)
    return letter.group(1).upper() if letter else answer


def lmms_eval_choice_correct(prediction: object, answer_letter: str) -> bool:
    """lmms-eval's ``mcq_acc``: both sides through ``lmms_eval_choice``, then equal."""
    return lmms_eval_choice(prediction) == lmms_eval_choice(answer_letter)


# ---------------------------------------------------------------------------------------------
# Per-task metrics over per-sample values
# ---------------------------------------------------------------------------------------------
def _percent(count: float, n: int) -> Optional[float]:
    """``count * 100 / n``: lmms-eval's order of operations (equal to ``100 * count / n``)."""
    return count * 100 / n if n else None


def _fraction_percent(count: float, n: int) -> Optional[float]:
    """``count / n * 100``: NExT-GQA's order of operations (not always equal to ``count * 100 / n``)."""
    return count / n * 100 if n else None


def temporal_grounding_metrics(ious: Sequence[float]) -> dict[str, Optional[float]]:
    """mIoU and R@{0.3,0.5,0.7} in percent from per-sample IoUs (parse failures included as 0).

    Returns ``None`` for every metric when ``ious`` is empty.
    """
    n = len(ious)
    metrics = {"mIoU": _percent(sum(ious), n)}
    for t in RECALL_THRESHOLDS:
        metrics[f"R@{t}"] = _percent(sum(1 for iou in ious if iou >= t), n)
    return metrics


def choice_accuracy_metrics(correct: Sequence[bool], nonempty: Optional[Sequence[bool]] = None,
                            correct_lenient: Optional[Sequence[bool]] = None) -> dict[str, Optional[float]]:
    """accuracy, accuracy_nonempty (samples with a non-empty response) and accuracy_lenient, in percent.

    Args:
        correct: per sample, whether lmms-eval's extraction gives the answer letter.
        nonempty: per sample, whether the raw response was not the empty string; None = all were.
        correct_lenient: per sample, whether megavrl's parser gives the answer letter; None = ``correct``.
    """
    if nonempty is None:
        nonempty = [True] * len(correct)
    if correct_lenient is None:
        correct_lenient = correct
    if not (len(nonempty) == len(correct_lenient) == len(correct)):
        raise ValueError(f"{len(correct)} correctness flags but {len(nonempty)} non-empty flags and "
                         f"{len(correct_lenient)} lenient flags")
    answered = sum(1 for flag in nonempty if flag)
    return {"accuracy": _percent(sum(1 for c in correct if c), len(correct)),
            "accuracy_nonempty": _percent(sum(1 for c, a in zip(correct, nonempty) if c and a), answered),
            "accuracy_lenient": _percent(sum(1 for c in correct_lenient if c), len(correct_lenient))}


def grounded_qa_metrics(correct: Sequence[bool], ious: Sequence[float], iops: Sequence[float],
                        has_span: Optional[Sequence[bool]] = None) -> dict[str, Optional[float]]:
    """NExT-GQA's Acc@QA, Acc@GQA, mIoU, IoU@{0.3,0.5}, mIoP, IoP@{0.3,0.5} in percent, and n_no_span.

    Args:
        correct, ious, iops: per question (IoU/IoP already maximised over the segments).
        has_span: per question, whether a span was predicted; None = all were. Questions without one
            count in Acc@QA only (the official ``eval_ground`` skips them).
    """
    n = len(correct)
    if has_span is None:
        has_span = [True] * n
    if not (len(ious) == len(iops) == len(has_span) == n):
        raise ValueError(f"per-sample lists differ in length: {n} correct, {len(ious)} IoU, {len(iops)} IoP, "
                         f"{len(has_span)} has_span")
    grounded = [(c, iou, iop) for c, iou, iop, h in zip(correct, ious, iops, has_span) if h]
    m = len(grounded)
    total_iou = total_iop = 0.0
    for _, iou, iop in grounded:  # summed in record order, as the official loop sums
        total_iou += iou
        total_iop += iop
    metrics: dict[str, Optional[float]] = {
        "Acc@QA": _fraction_percent(sum(1 for c in correct if c), n),
        "Acc@GQA": _fraction_percent(sum(1 for c, _, iop in grounded if c and iop >= GQA_IOP_THRESHOLD), m),
        "mIoU": _fraction_percent(total_iou, m),
    }
    for t in GQA_THRESHOLDS:
        metrics[f"IoU@{t}"] = _fraction_percent(sum(1 for _, iou, _ in grounded if iou >= t), m)
    metrics["mIoP"] = _fraction_percent(total_iop, m)
    for t in GQA_THRESHOLDS:
        metrics[f"IoP@{t}"] = _fraction_percent(sum(1 for _, _, iop in grounded if iop >= t), m)
    metrics["n_no_span"] = n - m
    return metrics


def _has_span(record: Mapping[str, Any]) -> bool:
    prediction = record.get("prediction")
    return isinstance(prediction, Mapping) and prediction.get("span") is not None


def task_metrics(task: str, samples: Sequence[Mapping[str, Any]]) -> dict[str, Optional[float]]:
    """The metrics of ``task`` over valid scored samples (see ``megavrl.eval.predictions``)."""
    if task == "tvg":
        return temporal_grounding_metrics([float(s["iou"]) for s in samples])
    if task == "mcq":
        return choice_accuracy_metrics([bool(s["correct"]) for s in samples],
                                       [s.get("response") != "" for s in samples],
                                       [bool(s.get("correct_lenient", s["correct"])) for s in samples])
    if task == "gqa":
        return grounded_qa_metrics([bool(s["correct"]) for s in samples], [float(s["iou"]) for s in samples],
                                   [float(s["iop"]) for s in samples], [_has_span(s) for s in samples])
    raise ValueError(f"no metrics are defined for task {task!r}; known tasks: {', '.join(TASK_METRICS)}")


def metric_stderr(task: str, samples: Sequence[Mapping[str, Any]],
                  totals: Optional[Mapping[str, Optional[float]]] = None) -> dict[str, Optional[float]]:
    """lmms-eval's standard error (``mean_stderr``) of each metric of ``task`` over valid scored samples.

    ``totals``: ``task_metrics(task, samples)`` when the caller has it already (computed here otherwise).

    Each metric is the mean, over the rows of its denominator, of the rows' own values (``task_metrics``
    of one row; None for a row outside the denominator, as a gqa question without a span is for its
    grounding metrics). The error is their sample standard deviation over the square root of their
    count; None with fewer than 2 rows.

    Raises:
        ArithmeticError: a metric is not the mean of its rows' values (it would be given a wrong error).
    """
    rows = [task_metrics(task, [sample]) for sample in samples]
    whole = totals if totals is not None else task_metrics(task, samples)
    out: dict[str, Optional[float]] = {}
    for metric in TASK_METRICS[task]:
        values = [row[metric] for row in rows if row[metric] is not None]
        if len(values) < 2:
            out[metric] = None
            continue
        mean = sum(values) / len(values)
        if whole[metric] is None or not math.isclose(mean, whole[metric], rel_tol=1e-9, abs_tol=1e-9):
            raise ArithmeticError(f"{task} {metric}: {whole[metric]} is not the mean {mean} of its rows' values")
        out[metric] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) / math.sqrt(len(values))
    return out


# ---------------------------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------------------------
def aggregate_metrics(scored: Iterable[Mapping[str, Any]], expected: Optional[Mapping[str, str]] = None
                      ) -> dict[str, Any]:
    """Metrics per benchmark and overall from scored prediction records.

    Args:
        scored: records from ``megavrl.eval.predictions.score_predictions``: each has
            ``benchmark``, ``task``, ``invalid`` and ``parse_ok`` and, when valid, ``iou``,
            ``iop``, ``correct`` and ``format`` as its task needs.
        expected: benchmark name -> task of benchmarks to report even with no sample (they then
            show ``n = 0`` and ``None`` metrics), in the order to report them.
    Returns:
        ``{"benchmarks": {name: {"task", "n", "n_parse_failures", "n_invalid", "format_rate",
        "primary_metric", <the task's metrics>, "stderr": {<metric>: value}, "blind_baseline":
        {<metric>: value}, "blind_answer", "blind_exact"}}, "overall": {"mean_primary", "n_benchmarks", "n", "n_parse_failures",
        "n_invalid"}}``. Percentages in [0, 100]; ``format_rate`` is the percentage of responses
        that follow the answer template (None without raw responses); ``stderr`` holds each metric's
        standard error (``metric_stderr``, lmms-eval's; None below 2 rows); ``blind_baseline`` holds what
        the best constant answer scores on each metric (``megavrl.eval.blind``; absent for an empty
        benchmark).
    Raises:
        ValueError: a benchmark mixes tasks, or a task has no metrics (a configuration error).
    """
    groups: dict[str, dict[str, Any]] = {}
    for name, task in (expected or {}).items():
        groups[name] = {"task": task, "samples": [], "n_invalid": 0}
    for record in scored:
        task = record.get("task")
        name = record.get("benchmark") or task
        group = groups.setdefault(name, {"task": task, "samples": [], "n_invalid": 0})
        if record.get("invalid"):
            group["n_invalid"] += 1
            continue
        if group["task"] != task:
            raise ValueError(f"benchmark {name!r} mixes tasks {group['task']!r} and {task!r} (record "
                             f"{record.get('id')!r}): give each task its own benchmark name")
        group["samples"].append(record)

    from megavrl.eval.blind import blind_baseline

    benchmarks: dict[str, dict[str, Any]] = {}
    for name, group in groups.items():
        task, samples = group["task"], group["samples"]
        if task not in TASK_METRICS:
            if samples:
                raise ValueError(f"benchmark {name!r}: no metrics are defined for task {task!r}; "
                                 f"known tasks: {', '.join(TASK_METRICS)}")
            benchmarks[name] = {"task": task, "n": 0, "n_parse_failures": 0, "n_invalid": group["n_invalid"],
                                "format_rate": None, "primary_metric": None}
            logger.warning("%s: %d rows skipped: no metrics are defined for task %r", name, group["n_invalid"], task)
            continue
        formats = [float(s["format"]) for s in samples if s.get("format") is not None]
        entry: dict[str, Any] = {
            "task": task,
            "n": len(samples),
            "n_parse_failures": sum(1 for s in samples if not s.get("parse_ok", False)),
            "n_invalid": group["n_invalid"],
            "format_rate": _percent(sum(formats), len(formats)),
            "primary_metric": PRIMARY_METRIC[task],
        }
        totals = task_metrics(task, samples)
        entry.update(totals)
        entry["stderr"] = metric_stderr(task, samples, totals)
        entry.update(blind_baseline(task, samples))
        benchmarks[name] = entry
        if entry["n_parse_failures"] or entry["n_invalid"]:
            logger.warning("%s: %d of %d responses had no parsable answer (scored 0); %d invalid rows skipped",
                           name, entry["n_parse_failures"], entry["n"], entry["n_invalid"])

    # A benchmark with samples but an undefined primary metric (gqa where no question got a span:
    # NExT-GQA's denominator is 0) counts 0 in the overall mean, so that losing every span never helps.
    primaries = [b[b["primary_metric"]] if b[b["primary_metric"]] is not None else 0.0
                 for b in benchmarks.values() if b["n"] and b["primary_metric"]]
    overall = {
        "mean_primary": sum(primaries) / len(primaries) if primaries else None,
        "n_benchmarks": len(primaries),
        "n": sum(b["n"] for b in benchmarks.values()),
        "n_parse_failures": sum(b["n_parse_failures"] for b in benchmarks.values()),
        "n_invalid": sum(b["n_invalid"] for b in benchmarks.values()),
    }
    return {"benchmarks": benchmarks, "overall": overall}


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``{"<prefix>/<benchmark>/<metric>": value}`` plus ``<prefix>/overall/mean_primary``, for TensorBoard;
    each blind baseline as ``<prefix>/<benchmark>/blind/<metric>``, each standard error as
    ``<prefix>/<benchmark>/stderr/<metric>``.

    Only numeric values are kept (``None`` metrics of empty benchmarks are left out).
    """
    flat: dict[str, float] = {}
    for name, entry in metrics.get("benchmarks", {}).items():
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{prefix}/{name}/{key}"] = float(value)
        for group, head in (("blind_baseline", BLIND_KEY), ("stderr", STDERR_KEY)):
            for key, value in (entry.get(group) or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    flat[f"{prefix}/{name}/{head}/{key}"] = float(value)
    mean = metrics.get("overall", {}).get("mean_primary")
    if mean is not None:
        flat[f"{prefix}/overall/mean_primary"] = float(mean)
    return flat
