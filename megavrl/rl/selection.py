"""Variance-aware data selection from repeated rollouts, offline and online.

Offline (``select_by_reward_variance``): roll out each training row k times, score every
response, and keep the rows whose rewards vary: a prompt on which all k responses score the same
gives GRPO a zero advantage everywhere, hence no gradient. Online (``ZeroVarianceFilter``): drop
the zero-variance groups of a training batch and refill it from a queue of scored groups.
"""
from __future__ import annotations

import math
import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from megavrl.rl.advantages import ZERO_VARIANCE_ATOL


@dataclass
class SampleRewardStats:
    """Reward statistics of one row over its k rollouts.

    Fields: id, task, n (number of rollouts), mean and var of the total reward (population
    variance: divided by n), all_same (max - min <= ZERO_VARIANCE_ATOL), component_mean and
    component_var (the same per reward component, e.g. "format", "iou", "choice").
    """

    id: Any
    task: Optional[str]
    n: int
    mean: float
    var: float
    all_same: bool
    component_mean: dict[str, float] = field(default_factory=dict)
    component_var: dict[str, float] = field(default_factory=dict)


@dataclass
class SelectionResult:
    """What ``select_by_reward_variance`` keeps.

    Fields: selected (the kept rows, in input order), stats (a SampleRewardStats per scored row,
    in input order), summary (counts per task before/after, drop counts, mean variances; see
    ``select_by_reward_variance``).
    """

    selected: list
    stats: list[SampleRewardStats]
    summary: dict[str, Any]


def _total_and_components(reward: Any) -> tuple[float, dict[str, float]]:
    """A reward given as a RewardResult, a number, or a dict of components (with or without "total")."""
    if hasattr(reward, "total") and hasattr(reward, "components"):
        return float(reward.total), {str(k): float(v) for k, v in dict(reward.components).items()}
    if isinstance(reward, Mapping):
        components = {str(k): float(v) for k, v in reward.items() if k != "total"}
        total = float(reward["total"]) if "total" in reward else float(sum(components.values()))
        return total, components
    return float(reward), {}


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, sum((v - mean) ** 2 for v in values) / n


def reward_statistics(rewards: Sequence[Any], sample_id: Any = None, task: Optional[str] = None) -> SampleRewardStats:
    """Mean and population variance of one row's k rewards, in total and per component.

    Args:
        rewards: k rewards, each a RewardResult, a number, or a dict of components (whose
            "total" is used if present, else the sum of its values).
        sample_id, task: copied into the result.
    Raises:
        ValueError: no rewards, or a reward that is not a finite number.
    """
    if len(rewards) == 0:
        raise ValueError(f"row {sample_id!r} has no rewards")
    totals: list[float] = []
    per_component: dict[str, list[float]] = {}
    for reward in rewards:
        try:
            total, components = _total_and_components(reward)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"row {sample_id!r}: reward {reward!r} is not a number, a dict of numbers "
                             f"or a RewardResult ({exc})") from None
        if not math.isfinite(total) or not all(math.isfinite(v) for v in components.values()):
            raise ValueError(f"row {sample_id!r}: reward {reward!r} is not finite")
        totals.append(total)
        for name, value in components.items():
            per_component.setdefault(name, []).append(value)
    mean, var = _mean_var(totals)
    component_stats = {name: _mean_var(values) for name, values in per_component.items()}
    return SampleRewardStats(
        id=sample_id, task=task, n=len(totals), mean=mean, var=var,
        all_same=max(totals) - min(totals) <= ZERO_VARIANCE_ATOL,
        component_mean={name: s[0] for name, s in component_stats.items()},
        component_var={name: s[1] for name, s in component_stats.items()})


def _field(row: Any, key: str) -> Any:
    return row.get(key) if isinstance(row, Mapping) else getattr(row, key, None)


def _quotas(budget: int, available: dict[str, int], seed: int) -> dict[str, int]:
    """Split ``budget`` as equally as possible between tasks, none getting more than it has.

    Water-filling: tasks with fewer rows than an equal share give all theirs and the rest is
    shared again among the others; the remainder of an uneven split goes to tasks in a seeded order.
    """
    quotas = {task: 0 for task in available}
    active = sorted(t for t, n in available.items() if n > 0)
    remaining = min(budget, sum(available.values()))
    while active and remaining > 0:
        share = remaining // len(active)
        short = [t for t in active if available[t] <= share]
        if short:
            for task in short:
                quotas[task] = available[task]
                remaining -= available[task]
            active = [t for t in active if t not in short]
            continue
        for task in active:
            quotas[task] = share
        order = list(active)
        random.Random(seed).shuffle(order)
        for task in order[: remaining - share * len(active)]:
            quotas[task] += 1
        remaining = 0
    return quotas


def select_by_reward_variance(rows: Sequence[Any], rewards_table: Mapping[Any, Sequence[Any]], *,
                              k: Optional[int] = None, drop_all_same: bool = True, min_variance: float = 0.0,
                              top_fraction: Optional[float] = None, balance_tasks: bool = False,
                              seed: int = 0) -> SelectionResult:
    """Keep the rows whose rewards over k repeated rollouts vary the most.

    Args:
        rows: data rows (dicts or objects) with ``id`` and ``task``.
        rewards_table: row id -> its k rewards (RewardResults, numbers, or dicts of components).
            A row id missing here is looked up again as ``str(id)`` (JSON keys are strings).
        k: the expected number of rollouts per row; rows with another number are still used
            and counted in ``summary["n_wrong_k"]``. None: no check.
        drop_all_same: drop rows whose k total rewards are all equal.
        min_variance: drop rows whose reward variance (population, total reward) is below it.
        top_fraction: of the rows left, keep the ceil(top_fraction * n_scored) of highest
            variance (n_scored = rows with rewards); None keeps them all.
        balance_tasks: split the kept rows equally between the tasks present (a task with too
            few rows gives all it has, the others share the rest); without top_fraction every
            task is cut to the smallest task's count.
        seed: orders rows of equal variance (and an uneven split between tasks), deterministically.
    Returns:
        SelectionResult(selected, stats, summary). ``summary`` has n_rows, n_scored, n_missing
        (no id or no rewards), n_invalid (non-finite or malformed rewards), n_wrong_k,
        n_all_same_dropped, n_below_min_variance, n_selected, per_task_before (scored rows),
        per_task_after, mean_variance_before/after, mean_reward_before/after.
    """
    if min_variance < 0:
        raise ValueError(f"min_variance={min_variance} must be >= 0")
    if top_fraction is not None and not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction={top_fraction} must be in (0, 1], or None")
    scored: list[tuple[int, Any, SampleRewardStats]] = []
    n_missing = n_invalid = n_wrong_k = 0
    for index, row in enumerate(rows):
        row_id = _field(row, "id")
        rewards = None
        if row_id is not None:
            rewards = rewards_table.get(row_id)
            if rewards is None:
                rewards = rewards_table.get(str(row_id))
        if rewards is None or len(rewards) == 0:
            n_missing += 1
            continue
        task = _field(row, "task")
        try:
            stats = reward_statistics(rewards, row_id, None if task is None else str(task))
        except ValueError:
            n_invalid += 1
            continue
        n_wrong_k += int(k is not None and stats.n != k)
        scored.append((index, row, stats))

    candidates = scored
    n_all_same = n_below = 0
    if drop_all_same:
        n_all_same = sum(s.all_same for _, _, s in candidates)
        candidates = [c for c in candidates if not c[2].all_same]
    if min_variance > 0:
        n_below = sum(s.var < min_variance for _, _, s in candidates)
        candidates = [c for c in candidates if c[2].var >= min_variance]

    # Rank by variance, highest first; ties in a seeded random order.
    tiebreak = list(range(len(rows)))
    random.Random(seed).shuffle(tiebreak)
    ranked = sorted(candidates, key=lambda c: (-c[2].var, tiebreak[c[0]]))
    n_scored = len(scored)
    budget = len(ranked) if top_fraction is None else math.ceil(round(top_fraction * n_scored, 9))
    if balance_tasks:
        by_task: dict[str, list] = {}
        for c in ranked:
            by_task.setdefault(_task_name(c[2].task), []).append(c)
        available = {task: len(items) for task, items in by_task.items()}
        if top_fraction is None and available:
            budget = min(available.values()) * len(available)
        quotas = _quotas(budget, available, seed)
        kept = [c for task, items in by_task.items() for c in items[: quotas[task]]]
    else:
        kept = ranked[:budget]
    kept.sort(key=lambda c: c[0])

    def per_task(items: Iterable[tuple[int, Any, SampleRewardStats]]) -> dict[str, int]:
        return dict(sorted(Counter(_task_name(s.task) for _, _, s in items).items()))

    def mean_of(items: Sequence[tuple[int, Any, SampleRewardStats]], attr: str) -> float:
        return sum(getattr(s, attr) for _, _, s in items) / len(items) if items else 0.0

    summary = {
        "n_rows": len(rows), "n_scored": n_scored, "n_missing": n_missing, "n_invalid": n_invalid,
        "n_wrong_k": n_wrong_k, "n_all_same_dropped": n_all_same, "n_below_min_variance": n_below,
        "n_selected": len(kept), "per_task_before": per_task(scored), "per_task_after": per_task(kept),
        "mean_variance_before": mean_of(scored, "var"), "mean_variance_after": mean_of(kept, "var"),
        "mean_reward_before": mean_of(scored, "mean"), "mean_reward_after": mean_of(kept, "mean"),
    }
    return SelectionResult(selected=[row for _, row, _ in kept], stats=[s for _, _, s in scored], summary=summary)


def _task_name(task: Optional[str]) -> str:
    return "unknown" if task is None else task


# ---------------------------------------------------------------------------------------------
# Online: DAPO-style dynamic sampling
# ---------------------------------------------------------------------------------------------
def default_group_rewards(group: Any) -> Sequence[Any]:
    """The rewards of a group: ``group.rewards``, ``group["rewards"]``, or the group itself (a sequence)."""
    if hasattr(group, "rewards"):
        return group.rewards
    if isinstance(group, Mapping):
        return group["rewards"]
    return group


@dataclass
class FilterResult:
    """One filtered batch.

    Fields: groups (the kept groups, at most the batch size: the batch's own non-zero-variance
    groups in order, then refills), num_dropped (zero-variance groups dropped, from the batch or
    the queue), num_refilled (groups taken from the queue into the batch), num_short (batch size
    minus kept groups: how many more groups the caller should roll out, or accept a smaller batch).
    """

    groups: list
    num_dropped: int
    num_refilled: int
    num_short: int


class ZeroVarianceFilter:
    """Drops zero-variance groups from a training batch and refills it from a queue.

    A group is the G scored responses to one prompt; its rewards come from ``rewards_of(group)``
    (default: ``default_group_rewards``), each a number, dict or RewardResult. ``push`` queues
    extra scored groups (e.g. over-sampled prompts); ``filter(batch)`` keeps the batch's groups
    with non-zero reward variance and tops the batch up from the queue, taking at most
    ``max_refills`` groups from it per batch (zero-variance ones among them are discarded and
    count against the cap). Groups left in the queue wait for the next batch.
    """

    def __init__(self, max_refills: int = 4, rewards_of: Callable[[Any], Sequence[Any]] = default_group_rewards):
        if max_refills < 0:
            raise ValueError(f"max_refills={max_refills} must be >= 0")
        self.max_refills = max_refills
        self.rewards_of = rewards_of
        self.queue: deque = deque()
        self.total_dropped = 0
        self.total_refilled = 0

    def __len__(self) -> int:
        return len(self.queue)

    def push(self, groups: Iterable[Any]) -> None:
        """Queue scored groups for later refills."""
        self.queue.extend(groups)

    def has_variance(self, group: Any) -> bool:
        """True when the group's total rewards are not all equal (so GRPO gets a gradient from it)."""
        totals = [_total_and_components(r)[0] for r in self.rewards_of(group)]
        return len(totals) > 1 and max(totals) - min(totals) > ZERO_VARIANCE_ATOL

    def filter(self, batch: Sequence[Any]) -> FilterResult:
        """Drop the zero-variance groups of ``batch``, then refill up to ``len(batch)`` from the queue."""
        kept = [group for group in batch if self.has_variance(group)]
        dropped = len(batch) - len(kept)
        refilled = taken = 0
        while len(kept) < len(batch) and taken < self.max_refills and self.queue:
            group = self.queue.popleft()
            taken += 1
            if self.has_variance(group):
                kept.append(group)
                refilled += 1
            else:
                dropped += 1
        self.total_dropped += dropped
        self.total_refilled += refilled
        return FilterResult(groups=kept, num_dropped=dropped, num_refilled=refilled, num_short=len(batch) - len(kept))
