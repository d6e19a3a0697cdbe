"""Paired comparison of two evaluations of the same rows: how much each benchmark's primary metric
changed, and whether that change is larger than the luck of which rows were held out.

Two evaluations of one split (before and after a training run) score the same rows, so their
difference is judged row by row: the paired bootstrap (Efron & Tibshirani 1993, ch. 16; Koehn 2004
for its use in comparing two systems on one test set) draws the rows with replacement, recomputes
the primary metric of both evaluations on each draw with the metric's own definition
(``megavrl.eval.metrics.task_metrics``, so ratios such as NExT-GQA's Acc@GQA are handled as well
as means), and takes the percentile interval of the differences.

What the interval does not measure: a second training run with another seed, data order or
sampling seed. Runs of the tiny demo model differ by more than their row-sampling interval (see
the README's demo section); an interval that excludes 0 says the two models differ on this
distribution of rows, not that the training method would do it again.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence

from megavrl.eval.metrics import PRIMARY_METRIC, task_metrics

DEFAULT_RESAMPLES = 2000
"""Bootstrap draws: the 2.5% and 97.5% percentiles are then each set by 50 draws."""


@dataclass(frozen=True)
class PairedChange:
    """The change of one benchmark's primary metric, from ``before`` to ``after``, on the rows
    scored validly in both evaluations."""

    benchmark: str
    metric: str
    n: int
    before: Optional[float]
    after: Optional[float]
    low: Optional[float]
    high: Optional[float]
    better: int
    worse: int
    confidence: float

    @property
    def delta(self) -> Optional[float]:
        if self.before is None or self.after is None:
            return None
        return self.after - self.before

    @property
    def beyond_noise(self) -> bool:
        """True when the interval excludes 0."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    def describe(self) -> str:
        """``"-13.43 [-18.10, -8.90]"``: the change and its interval (``-`` when undefined)."""
        if self.delta is None:
            return "-"
        if self.low is None or self.high is None:
            return f"{self.delta:+.2f}"
        return f"{self.delta:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def _valid_by_key(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """``(benchmark, id) -> record`` of the validly scored records (the metrics' denominators)."""
    out: dict[tuple[str, str], Mapping[str, Any]] = {}
    for record in records:
        if record.get("invalid") or "id" not in record:
            continue
        out[(str(record.get("benchmark") or record.get("task")), str(record["id"]))] = record
    return out


def _primary(task: str, metric: str, records: Sequence[Mapping[str, Any]]) -> Optional[float]:
    return task_metrics(task, records)[metric] if records else None


def paired_changes(before: Iterable[Mapping[str, Any]], after: Iterable[Mapping[str, Any]], *,
                   resamples: int = DEFAULT_RESAMPLES, confidence: float = 0.95,
                   seed: int = 0) -> list[PairedChange]:
    """Per benchmark, the change of its primary metric between two evaluations of the same rows.

    Args:
        before, after: scored prediction records (``megavrl.eval.report.read_predictions_jsonl``
            of the ``predictions.jsonl`` that ``megavrl eval`` writes); rows are matched by
            (benchmark, id), and only rows valid in both count. Rows in one evaluation only are
            left out (an evaluation of a subset compares on that subset).
        resamples: bootstrap draws of the rows; 0 gives the change without an interval.
        confidence: the interval's coverage (0.95: the 2.5% and 97.5% percentiles).
        seed: the draws' seed; the same inputs and seed give the same interval.
    Returns:
        One PairedChange per benchmark with a common row, in the order ``after`` first lists them.
        ``better``/``worse`` count the rows whose own primary metric rose or fell (tvg: IoU; mcq:
        correct; gqa: correct with IoP >= 0.5, rows without a span left out).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1)")
    old, new = _valid_by_key(before), _valid_by_key(after)
    keys = [k for k in new if k in old]
    benchmarks: dict[str, list[tuple[str, str]]] = {}
    for key in keys:
        benchmarks.setdefault(key[0], []).append(key)
    rng = random.Random(seed)
    changes = []
    for name, rows in benchmarks.items():
        task = str(new[rows[0]]["task"])
        metric = PRIMARY_METRIC[task]
        pairs = [(old[k], new[k]) for k in rows]
        was = _primary(task, metric, [p[0] for p in pairs])
        now = _primary(task, metric, [p[1] for p in pairs])
        better = worse = 0
        for a, b in pairs:
            x, y = _primary(task, metric, [a]), _primary(task, metric, [b])
            if x is not None and y is not None:
                better += y > x
                worse += y < x
        low = high = None
        if resamples > 0 and was is not None and now is not None:
            diffs = []
            for _ in range(resamples):
                draw = [pairs[rng.randrange(len(pairs))] for _ in pairs]
                x, y = _primary(task, metric, [p[0] for p in draw]), _primary(task, metric, [p[1] for p in draw])
                if x is not None and y is not None:
                    diffs.append(y - x)
            if diffs:
                diffs.sort()
                tail = (1.0 - confidence) / 2.0
                low = diffs[int(tail * (len(diffs) - 1))]
                high = diffs[int(round((1.0 - tail) * (len(diffs) - 1)))]
        changes.append(PairedChange(benchmark=name, metric=metric, n=len(pairs), before=was, after=now,
                                    low=low, high=high, better=better, worse=worse, confidence=confidence))
    return changes
