"""``variance_hist.png`` of ``megavrl select``: how the reward variance of the rows is spread, and
where the selection cut it.

Bars are stacked by task (none hides another), the title says k (rollouts per row) and how many
rows were kept, and a dashed line marks each cut-off: the lowest variance among the kept rows of
a task (one line when the selection cut all tasks at one value).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path


def selection_cutoffs(result) -> dict[str, float]:
    """The selection's cut-off: the lowest reward variance among the kept rows, as ``{"all": v}``
    when no dropped row lies above it, else per task (``balance_tasks`` cuts each task apart)."""
    kept_ids = {row.get("id") if isinstance(row, dict) else getattr(row, "id", None) for row in result.selected}
    kept = [s for s in result.stats if s.id in kept_ids]
    if not kept:
        return {}
    lowest = min(s.var for s in kept)
    if all(s.var <= lowest for s in result.stats if s.id not in kept_ids):
        return {"all": lowest}
    cutoffs: dict[str, float] = {}
    for s in kept:
        task = s.task or "?"
        cutoffs[task] = min(cutoffs.get(task, float("inf")), s.var)
    return cutoffs


def plot_variance_histogram(result, path: str | Path) -> None:
    """Write the histogram of ``result`` (a :class:`megavrl.rl.selection.SelectionResult`) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = result.stats
    by_task: dict[str, list[float]] = {}
    for s in stats:
        by_task.setdefault(s.task or "?", []).append(s.var)
    k = Counter(s.n for s in stats).most_common(1)[0][0] if stats else 0
    cutoffs = selection_cutoffs(result)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    top = max([v for vs in by_task.values() for v in vs] + [1e-6])
    bins = [top * i / 20 for i in range(21)]
    tasks = sorted(by_task)
    colors = [f"C{i}" for i in range(len(tasks))]
    if tasks:
        ax.hist([by_task[t] for t in tasks], bins=bins, stacked=True, color=colors, edgecolor="white",
                linewidth=0.5, label=[f"{t} ({len(by_task[t])} rows)" for t in tasks])
    if "all" in cutoffs:
        ax.axvline(cutoffs["all"], color="black", linestyle="--", linewidth=1.2,
                   label=f"cut-off {cutoffs['all']:.3g}: rows at or above it kept")
    for task, color in zip(tasks, colors):
        if task in cutoffs:
            ax.axvline(cutoffs[task], color=color, linestyle="--", linewidth=1.2,
                       label=f"{task} cut-off {cutoffs[task]:.3g} (tasks balanced)")
    ax.set_xlim(0, top * 1.02)
    ax.set_xlabel(f"variance of the total reward over k={k} rollouts")
    ax.set_ylabel("rows")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"Reward variance per row, k={k}: {len(result.selected)} of {len(stats)} rows kept")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
