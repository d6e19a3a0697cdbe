"""The blind baseline: the best score a constant answer gets on a split, from its ground truth.

A model that answers every question the same way, without looking at the video, scores this
much; a metric at or below its blind baseline shows nothing learned from the video. For each
metric of a task, the baseline is the best value of that metric over constant answers (each
metric maximised on its own, so the best answers may differ between metrics):

- mcq: one letter for every question: the share of the most frequent answer letter (for all
  three accuracies: a constant answer is never empty).
- tvg: one span ``[a, b]`` for every video, scored with lmms-eval's IoU (``lmms_eval_iou``, best
  segment). The candidates are every span between two ground-truth boundaries (starts and ends of
  every segment). For mIoU this is exact: with ``a`` fixed, each sample's IoU is, between two
  consecutive boundaries, linear (``b`` inside its segment) or convex (``c / (b - k)``, beyond it)
  in ``b``, and so is the maximum over a sample's segments; their mean is convex there, so its
  maximum lies on a boundary; the same holds for ``a``. For R@t the same candidates give a lower
  bound of the best constant span (a threshold count can peak between boundaries).
- gqa (NExT-GQA's metrics): Acc@QA as mcq; mIoU and IoU@t as tvg with NExT-GQA's IoU; mIoP,
  IoP@0.5 and Acc@GQA are maximised by a point span (IoP 1 inside a segment): any span with
  IoP >= 0.5 on a set of segments has its midpoint in all of them, so the best constant for
  Acc@GQA is a letter and a point, searched over every (letter, boundary) pair: exact. IoP@0.3:
  spans and points, a lower bound.

So the primary metrics (mIoU, accuracy, Acc@GQA) and mIoU/mIoP are exact; the other threshold
metrics (R@t, IoU@t, IoP@0.3) are the best over the same candidates, lower bounds that
``tests/eval/test_blind.py`` compares with a brute-force grid. With more than ``MAX_BOUNDARIES``
distinct boundaries (large real benchmarks), the candidates are that many quantiles of the
boundaries, and the span baselines all become lower bounds (``blind_exact`` is then False).
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from megavrl.eval.metrics import GQA_IOP_THRESHOLD, GQA_THRESHOLDS, RECALL_THRESHOLDS

MAX_BOUNDARIES = 256
"""Distinct boundaries searched exactly; beyond it, this many quantiles (cost ~ MAX^2 * n / 2)."""


def _segments(sample: Mapping[str, Any]) -> list[tuple[float, float]]:
    from megavrl.eval.predictions import ground_truth_segments

    return ground_truth_segments(sample["ground_truth"])


def _letter(sample: Mapping[str, Any]) -> Optional[str]:
    from megavrl.eval.predictions import _answer_letter

    truth = sample["ground_truth"]
    letter = _answer_letter(truth)
    return letter if letter is not None else str(truth.get("answer")).strip().lower()


def _candidates(segments: Sequence[Sequence[tuple[float, float]]]) -> tuple[np.ndarray, bool]:
    """Sorted distinct boundaries, or MAX_BOUNDARIES quantiles of them; and whether all were kept."""
    values = np.unique(np.array([x for segs in segments for seg in segs for x in seg], dtype=np.float64))
    if len(values) <= MAX_BOUNDARIES:
        return values, True
    return np.unique(np.quantile(values, np.linspace(0.0, 1.0, MAX_BOUNDARIES))), False


def _padded(segments: Sequence[Sequence[tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Starts, ends [n, k] and a validity mask of each sample's segments (k = most segments of one)."""
    k = max(len(s) for s in segments)
    starts, ends = np.zeros((len(segments), k)), np.zeros((len(segments), k))
    valid = np.zeros((len(segments), k), dtype=bool)
    for i, segs in enumerate(segments):
        for j, (s, e) in enumerate(segs):
            starts[i, j], ends[i, j], valid[i, j] = s, e, True
    return starts, ends, valid


def _span_overlaps(a: float, b: np.ndarray, starts: np.ndarray, ends: np.ndarray, valid: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lmms-eval IoU, NExT-GQA IoU, NExT-GQA IoP), each [len(b), n], best over each sample's segments.

    Spans ``[a, b_c]`` with ``b_c > a``, as ``lmms_eval_iou`` and ``next_gqa_overlap`` compute them.
    """
    bb = b[:, None, None]
    inter = np.minimum(bb, ends) - np.maximum(a, starts)
    hull = np.maximum(bb, ends) - np.minimum(a, starts)
    with np.errstate(divide="ignore", invalid="ignore"):
        lmms = np.where(hull > 0, np.maximum(inter, 0.0) / hull, 0.0)
        gqa_iou = np.where(hull > 0, inter / hull, 0.0)
    iop = inter / (bb - a)
    best = lambda x: np.where(valid, x, 0.0).max(axis=-1).clip(min=0.0)  # noqa: E731  (official max starts at 0)
    return best(lmms), best(gqa_iou), best(iop)


class _Best:
    """Running maxima of per-candidate scores, with the candidate that reached each."""

    def __init__(self) -> None:
        self.value: dict[str, float] = {}
        self.answer: dict[str, Any] = {}

    def offer(self, name: str, scores: np.ndarray, answers: Sequence[Any]) -> None:
        if not len(scores):
            return
        c = int(np.argmax(scores))
        if name not in self.value or scores[c] > self.value[name]:
            self.value[name], self.answer[name] = float(scores[c]), answers[c]


def _search(segments, letters: Optional[Sequence[str]], best: _Best) -> bool:
    """Offer every candidate constant span (and, with ``letters``, point spans and letter+span
    answers) to ``best``, keyed by score name. Scores are counts or sums over the samples.
    Returns whether the candidates were every boundary (exact)."""
    grid, exact = _candidates(segments)
    starts, ends, valid = _padded(segments)
    groups = {x: np.array([y == x for y in letters]) for x in sorted(set(letters))} if letters is not None else {}

    def offer(lmms, iou, iop, spans):
        best.offer("lmms_iou_sum", lmms.sum(axis=1), spans)
        for t in RECALL_THRESHOLDS:
            best.offer(f"lmms_iou>={t}", (lmms >= t).sum(axis=1), spans)
        if letters is None:
            return
        best.offer("iou_sum", iou.sum(axis=1), spans)
        best.offer("iop_sum", iop.sum(axis=1), spans)
        for t in GQA_THRESHOLDS:
            best.offer(f"iou>={t}", (iou >= t).sum(axis=1), spans)
            best.offer(f"iop>={t}", (iop >= t).sum(axis=1), spans)
        hit = iop >= GQA_IOP_THRESHOLD
        for letter, mask in groups.items():
            best.offer("gqa_hits", hit[:, mask].sum(axis=1), [(letter, span) for span in spans])

    for i, a in enumerate(grid[:-1]):
        b = grid[i + 1:]
        offer(*_span_overlaps(float(a), b, starts, ends, valid), [(float(a), float(x)) for x in b])
    if letters is not None:  # point spans: IoU 0, IoP 1 inside a segment (bounds included), as NExT-GQA
        inside = ((starts[None] <= grid[:, None, None]) & (grid[:, None, None] <= ends[None]) & valid[None]).any(-1)
        zeros = np.zeros(inside.shape)
        offer(zeros, zeros, inside.astype(np.float64), [(float(p), float(p)) for p in grid])
    return exact


def _span_text(span: tuple[float, float]) -> str:
    return f"{span[0]:g} to {span[1]:g}"


def blind_baseline(task: str, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The blind baseline of ``task`` on valid scored samples (their ``ground_truth`` is used).

    Returns ``{"blind_baseline": {metric: percent}, "blind_answer": str, "blind_exact": bool}``:
    the best constant answer's value for each of the task's metrics (see the module docstring),
    the constant answer that reaches the primary metric's baseline (e.g. "1.5 to 3" or "B"), and
    whether every value is exact (False: a lower bound from a quantile grid). Empty for no sample
    or for a task without metrics.
    """
    n = len(samples)
    if not n or task not in ("mcq", "tvg", "gqa"):
        return {}
    if task == "mcq":
        letter, count = _most_common([_letter(s) for s in samples])
        value = count * 100 / n
        return {"blind_baseline": {"accuracy": value, "accuracy_nonempty": value, "accuracy_lenient": value},
                "blind_answer": letter, "blind_exact": True}
    segments = [_segments(s) for s in samples]
    letters = [_letter(s) for s in samples] if task == "gqa" else None
    best = _Best()
    exact = _search(segments, letters, best)
    if task == "tvg":
        if "lmms_iou_sum" not in best.value:  # every segment is one and the same point
            return {}
        values = {"mIoU": best.value["lmms_iou_sum"] * 100 / n}
        for t in RECALL_THRESHOLDS:
            values[f"R@{t}"] = best.value[f"lmms_iou>={t}"] * 100 / n
        return {"blind_baseline": values, "blind_answer": _span_text(best.answer["lmms_iou_sum"]),
                "blind_exact": exact}
    _, qa_count = _most_common(letters)
    letter, span = best.answer["gqa_hits"]
    values = {"Acc@QA": qa_count / n * 100, "Acc@GQA": best.value["gqa_hits"] / n * 100,
              "mIoU": best.value["iou_sum"] / n * 100}
    for t in GQA_THRESHOLDS:
        values[f"IoU@{t}"] = best.value[f"iou>={t}"] / n * 100
    values["mIoP"] = best.value["iop_sum"] / n * 100
    for t in GQA_THRESHOLDS:
        values[f"IoP@{t}"] = best.value[f"iop>={t}"] / n * 100
    return {"blind_baseline": values, "blind_answer": f"({letter}) {_span_text(span)}", "blind_exact": exact}


def _most_common(values: Sequence[Any]) -> tuple[Any, int]:
    """The most frequent value (the first in sorted order among ties) and its count."""
    counts = Counter(values)
    top = max(counts.values())
    return sorted(v for v, c in counts.items() if c == top)[0], top
