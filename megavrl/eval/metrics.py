"""Evaluation metrics: temporal grounding, multiple choice and grounded QA, per benchmark and overall.

Every metric is a percentage in [0, 100], computed over all valid samples of a benchmark. A
response whose answer cannot be parsed is a sample like any other: it scores IoU 0, IoP 0 and
"wrong", and is counted in ``n_parse_failures``. A sample whose *ground truth* is unusable is
left out of every denominator and counted in ``n_invalid``. A benchmark with no valid sample
reports ``None`` for each metric (``null`` in JSON) and is left out of the overall score.

Definitions, with their sources:

Temporal video grounding (task "tvg"), as lmms-eval's Charades-STA evaluation
(``lmms_eval/tasks/charades_sta/eval_tvg.py``)::

    IoU_i    = max(min(p_e, g_e) - max(p_s, g_s), 0) / (max(p_e, g_e) - min(p_s, g_s))   [seconds]
    mIoU     = 100 * sum_i IoU_i / n
    R@t      = 100 * #{i : IoU_i >= t} / n          for t in (0.3, 0.5, 0.7)

  lmms-eval replaces an unparsable prediction by the span [g_e + 10, g_e + 20], which is disjoint
  from the ground truth: its IoU is 0 and it stays in n. So it does here. Spans are not clipped
  to the video duration (lmms-eval does not clip either; the training reward does). The union
  is computed as |p| + |g| - |p ∩ g| by ``megavrl.rewards.temporal_iou``, which equals the hull
  above whenever the spans overlap and gives 0 with it when they do not.

Multiple choice (task "mcq"), as lmms-eval's NExT-QA multiple choice (``exact_match``,
aggregation ``mean``, in percent here)::

    accuracy          = 100 * #{i : predicted letter_i == answer letter_i} / n
    accuracy_nonempty = 100 * #{correct} / #{i : response_i != ""}

  ``accuracy_nonempty`` is lmms-eval's MVBench aggregate (``mvbench_aggregate_results`` leaves
  literally empty responses out of the denominator); it is reported so that MVBench numbers can
  be compared, but ``accuracy`` (every sample counted) is the primary metric. lmms-eval's NExT-QA
  parser picks a random letter when it finds none; here such a response is wrong.

Grounded QA (task "gqa"), as NExT-GQA (Xiao et al., CVPR 2024, "Can I Trust Your Answer?
Visually Grounded Video Question Answering"; ``code/TempGQA/eval_ground.py`` of
doc-doc/NExT-GQA)::

    IoU_i    = max over the ground-truth segments of IoU(pred_i, segment)   (0 when disjoint)
    IoP_i    = max over the ground-truth segments of |pred_i ∩ segment| / |pred_i|
               (a zero-length prediction: 1 if it lies inside the segment, else 0)
    Acc@QA   = 100 * #{answer correct} / n
    mIoU, IoU@0.3, IoU@0.5 = 100 * mean IoU, 100 * #{IoU_i >= t} / n
    mIoP, IoP@0.3, IoP@0.5 = 100 * mean IoP, 100 * #{IoP_i >= t} / n
    Acc@GQA  = 100 * #{answer correct and IoP_i >= 0.5} / n

Overall: ``mean_primary`` is the unweighted mean, over the benchmarks with at least one valid
sample, of each benchmark's primary metric (``PRIMARY_METRIC``: mIoU for "tvg", accuracy for
"mcq", Acc@GQA for "gqa"). Every benchmark counts once, whatever its size.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

from megavrl.log import get_logger
from megavrl.rewards.iou import as_span, temporal_iou

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
    "mcq": ("accuracy", "accuracy_nonempty"),
    "gqa": ("Acc@QA", "Acc@GQA", "mIoU") + tuple(f"IoU@{t}" for t in GQA_THRESHOLDS)
           + ("mIoP",) + tuple(f"IoP@{t}" for t in GQA_THRESHOLDS),
}
"""The metrics reported for each task, in report order."""

PRIMARY_METRIC: dict[str, str] = {"tvg": "mIoU", "mcq": "accuracy", "gqa": "Acc@GQA"}
"""The metric of each task that enters the overall score."""

TASK_TITLES: dict[str, str] = {"tvg": "Temporal video grounding", "mcq": "Multiple-choice QA",
                               "gqa": "Grounded QA"}


# ---------------------------------------------------------------------------------------------
# Overlaps of two spans
# ---------------------------------------------------------------------------------------------
def temporal_iop(pred: object, gt: object) -> float:
    """Intersection over prediction of two (start, end) spans in seconds, as NExT-GQA defines it.

    Returns ``|pred ∩ gt| / |pred|`` in [0, 1]; for a zero-length prediction, 1.0 when the point
    lies inside ``gt`` (bounds included) and 0.0 otherwise. An invalid span gives 0.0.
    """
    p, g = as_span(pred), as_span(gt)
    if p is None or g is None:
        return 0.0
    if p[0] == p[1]:
        return 1.0 if g[0] <= p[0] <= g[1] else 0.0
    inter = min(p[1], g[1]) - max(p[0], g[0])
    return min(1.0, max(0.0, inter / (p[1] - p[0])))


def best_overlap(pred: object, segments: Sequence[Span]) -> tuple[float, float]:
    """(max IoU, max IoP) of ``pred`` over the ground-truth ``segments`` (each maximised apart).

    IoU is ``megavrl.rewards.temporal_iou`` without clipping to a duration. A missing or invalid
    prediction, or no segment, gives (0.0, 0.0).
    """
    span = as_span(pred)
    if span is None or not segments:
        return 0.0, 0.0
    return (max(temporal_iou(span, seg) for seg in segments),
            max(temporal_iop(span, seg) for seg in segments))


# ---------------------------------------------------------------------------------------------
# Per-task metrics over per-sample values
# ---------------------------------------------------------------------------------------------
def _percent(count: float, n: int) -> Optional[float]:
    return 100.0 * count / n if n else None


def temporal_grounding_metrics(ious: Sequence[float]) -> dict[str, Optional[float]]:
    """mIoU and R@{0.3,0.5,0.7} in percent from per-sample IoUs (parse failures included as 0).

    Returns ``None`` for every metric when ``ious`` is empty.
    """
    n = len(ious)
    metrics = {"mIoU": _percent(sum(ious), n)}
    for t in RECALL_THRESHOLDS:
        metrics[f"R@{t}"] = _percent(sum(1 for iou in ious if iou >= t), n)
    return metrics


def choice_accuracy_metrics(correct: Sequence[bool], nonempty: Optional[Sequence[bool]] = None
                            ) -> dict[str, Optional[float]]:
    """accuracy (all samples) and accuracy_nonempty (samples with a non-empty response) in percent.

    Args:
        correct: per sample, whether the predicted option is the answer.
        nonempty: per sample, whether the raw response was not the empty string; None = all were.
    """
    if nonempty is None:
        nonempty = [True] * len(correct)
    if len(nonempty) != len(correct):
        raise ValueError(f"{len(correct)} correctness flags but {len(nonempty)} non-empty flags")
    answered = sum(1 for flag in nonempty if flag)
    return {"accuracy": _percent(sum(1 for c in correct if c), len(correct)),
            "accuracy_nonempty": _percent(sum(1 for c, a in zip(correct, nonempty) if c and a), answered)}


def grounded_qa_metrics(correct: Sequence[bool], ious: Sequence[float], iops: Sequence[float]
                        ) -> dict[str, Optional[float]]:
    """NExT-GQA's Acc@QA, Acc@GQA, mIoU, IoU@{0.3,0.5}, mIoP, IoP@{0.3,0.5} in percent."""
    n = len(correct)
    if not (len(ious) == len(iops) == n):
        raise ValueError(f"per-sample lists differ in length: {n} correct, {len(ious)} IoU, {len(iops)} IoP")
    metrics = {
        "Acc@QA": _percent(sum(1 for c in correct if c), n),
        "Acc@GQA": _percent(sum(1 for c, iop in zip(correct, iops) if c and iop >= GQA_IOP_THRESHOLD), n),
        "mIoU": _percent(sum(ious), n),
    }
    for t in GQA_THRESHOLDS:
        metrics[f"IoU@{t}"] = _percent(sum(1 for iou in ious if iou >= t), n)
    metrics["mIoP"] = _percent(sum(iops), n)
    for t in GQA_THRESHOLDS:
        metrics[f"IoP@{t}"] = _percent(sum(1 for iop in iops if iop >= t), n)
    return metrics


def task_metrics(task: str, samples: Sequence[Mapping[str, Any]]) -> dict[str, Optional[float]]:
    """The metrics of ``task`` over valid scored samples (see ``megavrl.eval.predictions``)."""
    if task == "tvg":
        return temporal_grounding_metrics([float(s["iou"]) for s in samples])
    if task == "mcq":
        return choice_accuracy_metrics([bool(s["correct"]) for s in samples],
                                       [s.get("response") != "" for s in samples])
    if task == "gqa":
        return grounded_qa_metrics([bool(s["correct"]) for s in samples], [float(s["iou"]) for s in samples],
                                   [float(s["iop"]) for s in samples])
    raise ValueError(f"no metrics are defined for task {task!r}; known tasks: {', '.join(TASK_METRICS)}")


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
        "primary_metric", <the task's metrics>}}, "overall": {"mean_primary", "n_benchmarks",
        "n", "n_parse_failures", "n_invalid"}}``. Percentages in [0, 100]; ``format_rate`` is the
        percentage of responses that follow the answer template (None without raw responses).
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
        entry.update(task_metrics(task, samples))
        benchmarks[name] = entry
        if entry["n_parse_failures"] or entry["n_invalid"]:
            logger.warning("%s: %d of %d responses had no parsable answer (scored 0); %d invalid rows skipped",
                           name, entry["n_parse_failures"], entry["n"], entry["n_invalid"])

    primaries = [b[b["primary_metric"]] for b in benchmarks.values() if b["n"] and b["primary_metric"]]
    overall = {
        "mean_primary": sum(primaries) / len(primaries) if primaries else None,
        "n_benchmarks": len(primaries),
        "n": sum(b["n"] for b in benchmarks.values()),
        "n_parse_failures": sum(b["n_parse_failures"] for b in benchmarks.values()),
        "n_invalid": sum(b["n_invalid"] for b in benchmarks.values()),
    }
    return {"benchmarks": benchmarks, "overall": overall}


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "eval") -> dict[str, float]:
    """``{"<prefix>/<benchmark>/<metric>": value}`` plus ``<prefix>/overall/mean_primary``, for TensorBoard.

    Only numeric values are kept (``None`` metrics of empty benchmarks are left out).
    """
    flat: dict[str, float] = {}
    for name, entry in metrics.get("benchmarks", {}).items():
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"{prefix}/{name}/{key}"] = float(value)
    mean = metrics.get("overall", {}).get("mean_primary")
    if mean is not None:
        flat[f"{prefix}/overall/mean_primary"] = float(mean)
    return flat
