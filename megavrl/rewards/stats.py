"""Running reward statistics for logging: means per task and component, parse-failure counts."""
from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Iterable, Optional

from megavrl.rewards.registry import RewardResult


class RewardStats:
    """Accumulates RewardResults and reports per-task means and failure counts.

    ``summary()`` keys (with the default prefix "reward/"):
      ``reward/total`` (mean over all results), ``reward/count``, ``reward/parse_failures``,
      ``reward/parse_fail_rate``, ``reward/invalid_samples``, ``reward/std`` (population standard
      deviation of the totals), and per task ``reward/<task>/total``, ``reward/<task>/std``,
      ``reward/<task>/<component>`` (unweighted means), ``reward/<task>/count``,
      ``reward/<task>/parse_failures``, ``reward/<task>/parse_fail_rate``. Invalid samples (bad
      ground truth) are counted apart and excluded from the parse failures.
    ``merge`` adds another instance's counts (e.g. gathered from data-parallel ranks).
    ``errors`` counts failures by reason (e.g. "no <answer>...</answer> block": 3).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        self.count: dict[str, int] = defaultdict(int)
        self.total_sum: dict[str, float] = defaultdict(float)
        self.totals: dict[str, list[float]] = defaultdict(list)  # for the standard deviations
        self.component_sum: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.component_count: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.parse_failures: dict[str, int] = defaultdict(int)
        self.invalid_samples: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)

    def add(self, task: str, result: RewardResult) -> None:
        """Count one result of ``task``."""
        self.count[task] += 1
        self.total_sum[task] += float(result.total)
        self.totals[task].append(float(result.total))
        for name, value in result.components.items():
            self.component_sum[task][name] += float(value)
            self.component_count[task][name] += 1
        if result.invalid_sample:
            self.invalid_samples[task] += 1
        elif not result.parse_ok:
            self.parse_failures[task] += 1
        if result.error:
            # The reason without row-specific detail ("no time span in the answer", "invalid sample").
            reason = "invalid sample" if result.invalid_sample else result.error.split(":")[0]
            for part in reason.split("; "):
                self.errors[part[:120]] += 1

    def add_many(self, tasks: Iterable[str], results: Iterable[RewardResult]) -> None:
        """``add`` for each (task, result) pair."""
        for task, result in zip(tasks, results):
            self.add(task, result)

    def merge(self, other: "RewardStats") -> None:
        """Add ``other``'s counts to this one."""
        for task, n in other.count.items():
            self.count[task] += n
            self.total_sum[task] += other.total_sum[task]
            self.totals[task].extend(other.totals.get(task, ()))
            self.parse_failures[task] += other.parse_failures.get(task, 0)
            self.invalid_samples[task] += other.invalid_samples.get(task, 0)
            for name, value in other.component_sum[task].items():
                self.component_sum[task][name] += value
                self.component_count[task][name] += other.component_count[task][name]
        for error, n in other.errors.items():
            self.errors[error] += n

    def summary(self, prefix: str = "reward/") -> dict[str, float]:
        """Flat dict of scalars for TensorBoard (see the class docstring for the keys)."""
        out: dict[str, float] = {}
        n_all = sum(self.count.values())
        fails = sum(self.parse_failures.values())
        out[f"{prefix}count"] = float(n_all)
        out[f"{prefix}total"] = _mean(sum(self.total_sum.values()), n_all)
        out[f"{prefix}std"] = _std([x for xs in self.totals.values() for x in xs])
        out[f"{prefix}parse_failures"] = float(fails)
        out[f"{prefix}parse_fail_rate"] = _mean(fails, n_all)
        out[f"{prefix}invalid_samples"] = float(sum(self.invalid_samples.values()))
        for task in sorted(self.count):
            n = self.count[task]
            out[f"{prefix}{task}/count"] = float(n)
            out[f"{prefix}{task}/total"] = _mean(self.total_sum[task], n)
            out[f"{prefix}{task}/std"] = _std(self.totals[task])
            out[f"{prefix}{task}/parse_failures"] = float(self.parse_failures.get(task, 0))
            out[f"{prefix}{task}/parse_fail_rate"] = _mean(self.parse_failures.get(task, 0), n)
            for name in sorted(self.component_sum[task]):
                out[f"{prefix}{task}/{name}"] = _mean(self.component_sum[task][name],
                                                      self.component_count[task][name])
        return out


def _mean(total: float, n: Optional[int]) -> float:
    return float(total) / n if n else 0.0


def _std(values: list[float]) -> float:
    """Population standard deviation (0.0 for fewer than two values)."""
    return float(statistics.pstdev(values)) if len(values) > 1 else 0.0
