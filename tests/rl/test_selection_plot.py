"""variance_hist.png of `megavrl select`: the cut-off it marks is the selection's."""
import random

from megavrl.rl.selection import select_by_reward_variance
from megavrl.rl.selection_plot import plot_variance_histogram, selection_cutoffs


def _rows_and_rewards():
    rng = random.Random(0)
    rows = [{"id": i, "task": ["tvg", "mcq", "gqa"][i % 3]} for i in range(30)]
    return rows, {i: [rng.random() * (1 + i % 3) for _ in range(8)] for i in range(30)}


def test_one_cutoff_when_all_tasks_are_ranked_together(tmp_path):
    rows, table = _rows_and_rewards()
    result = select_by_reward_variance(rows, table, k=8, top_fraction=0.5)
    cut = selection_cutoffs(result)
    kept = {r["id"] for r in result.selected}
    assert list(cut) == ["all"]
    assert all((s.var >= cut["all"]) == (s.id in kept) for s in result.stats)  # the line separates kept from dropped
    plot_variance_histogram(result, tmp_path / "v.png")
    assert (tmp_path / "v.png").stat().st_size > 5000


def test_a_cutoff_per_task_when_balanced():
    rows, table = _rows_and_rewards()
    result = select_by_reward_variance(rows, table, k=8, top_fraction=0.5, balance_tasks=True)
    cut = selection_cutoffs(result)
    assert set(cut) == {"tvg", "mcq", "gqa"}
    for s in result.stats:
        kept = s.id in {r["id"] for r in result.selected}
        assert kept == (s.var >= cut[s.task])
