"""Variance-aware selection and the online zero-variance filter on constructed reward tables."""
from dataclasses import fields
from types import SimpleNamespace

import pytest

from megavrl.rewards import RewardResult
from megavrl.rl import SelectionConfig, ZeroVarianceFilter, reward_statistics, select_by_reward_variance

ROWS = [
    {"id": "r1", "task": "tvg"}, {"id": "r2", "task": "tvg"}, {"id": "r3", "task": "tvg"},
    {"id": "r4", "task": "mcq"}, {"id": "r5", "task": "mcq"}, {"id": "r6", "task": "mcq"},
    {"id": "r7", "task": "gqa"}, {"id": "r8", "task": "gqa"}, {"task": "gqa"},
]
TABLE = {
    "r1": [1, 1, 1, 1],  # all same
    "r2": [0, 1, 0, 1],  # mean 0.5, var 0.25
    "r3": [0, 0.5, 0.5, 1],  # mean 0.5, var 0.125
    "r4": [0, 0, 0, 2],  # mean 0.5, var 0.75
    "r5": [2, 2, 2, 2],  # all same
    "r6": [1, 1, 1, 2],  # mean 1.25, var 0.1875
    "r7": [0, 3, 0, 3],  # mean 1.5, var 2.25
    # r8 has no rollouts; the last row has no id
}


def ids(result):
    return [row["id"] for row in result.selected]


def test_statistics_per_row():
    result = select_by_reward_variance(ROWS, TABLE, drop_all_same=False)
    stats = {s.id: s for s in result.stats}
    assert [s.id for s in result.stats] == ["r1", "r2", "r3", "r4", "r5", "r6", "r7"]
    assert (stats["r2"].mean, stats["r2"].var, stats["r2"].n, stats["r2"].task) == (0.5, 0.25, 4, "tvg")
    assert stats["r3"].var == pytest.approx(0.125)
    assert stats["r4"].var == pytest.approx(0.75)
    assert (stats["r6"].mean, stats["r6"].var) == (pytest.approx(1.25), pytest.approx(0.1875))
    assert stats["r1"].all_same and stats["r5"].all_same and not stats["r7"].all_same


def test_drop_all_same_default():
    result = select_by_reward_variance(ROWS, TABLE)
    assert ids(result) == ["r2", "r3", "r4", "r6", "r7"]
    s = result.summary
    assert (s["n_rows"], s["n_scored"], s["n_missing"], s["n_all_same_dropped"], s["n_selected"]) == (9, 7, 2, 2, 5)
    assert s["per_task_before"] == {"gqa": 1, "mcq": 3, "tvg": 3}
    assert s["per_task_after"] == {"gqa": 1, "mcq": 2, "tvg": 2}
    assert s["mean_variance_after"] == pytest.approx((0.25 + 0.125 + 0.75 + 0.1875 + 2.25) / 5)
    assert s["mean_reward_before"] == pytest.approx((1 + 0.5 + 0.5 + 0.5 + 2 + 1.25 + 1.5) / 7)


def test_keep_all_when_no_rule_applies():
    kept = ids(select_by_reward_variance(ROWS, TABLE, drop_all_same=False))
    assert kept == ["r1", "r2", "r3", "r4", "r5", "r6", "r7"]


def test_min_variance_threshold():
    result = select_by_reward_variance(ROWS, TABLE, min_variance=0.2)
    assert ids(result) == ["r2", "r4", "r7"]
    assert result.summary["n_below_min_variance"] == 2  # r3 (0.125), r6 (0.1875)
    assert ids(select_by_reward_variance(ROWS, TABLE, min_variance=0.25)) == ["r2", "r4", "r7"]  # >= keeps 0.25


def test_top_fraction_of_scored_rows():
    # ceil(0.3 * 7) = 3 highest variances: r7 (2.25), r4 (0.75), r2 (0.25), returned in input order
    assert ids(select_by_reward_variance(ROWS, TABLE, top_fraction=0.3)) == ["r2", "r4", "r7"]
    # 1.0 keeps every candidate (the all-same rows are already dropped)
    assert ids(select_by_reward_variance(ROWS, TABLE, top_fraction=1.0)) == ["r2", "r3", "r4", "r6", "r7"]


def test_balance_tasks_cuts_to_the_smallest_task():
    result = select_by_reward_variance(ROWS, TABLE, balance_tasks=True)
    assert ids(result) == ["r2", "r4", "r7"]  # the highest-variance row of each task
    assert result.summary["per_task_after"] == {"gqa": 1, "mcq": 1, "tvg": 1}


def test_balance_tasks_with_a_budget_water_fills():
    # budget ceil(0.5 * 7) = 4; gqa has 1 row, mcq and tvg share the other 3: 1 each + 1 by seed
    result = select_by_reward_variance(ROWS, TABLE, balance_tasks=True, top_fraction=0.5, seed=3)
    chosen = ids(result)
    assert len(chosen) == 4 and {"r2", "r4", "r7"} <= set(chosen)
    assert set(chosen) - {"r2", "r4", "r7"} <= {"r3", "r6"}
    assert ids(select_by_reward_variance(ROWS, TABLE, balance_tasks=True, top_fraction=0.5, seed=3)) == chosen
    # a budget covering everything keeps everything
    assert len(select_by_reward_variance(ROWS, TABLE, balance_tasks=True, top_fraction=1.0).selected) == 5


def test_ties_are_broken_deterministically_by_seed():
    rows = [{"id": i, "task": "mcq"} for i in range(20)]
    table = {i: [0, 1] for i in range(20)}  # all variances equal
    pick = {seed: ids(select_by_reward_variance(rows, table, top_fraction=0.25, seed=seed)) for seed in range(5)}
    assert all(len(p) == 5 for p in pick.values())
    assert pick[0] == ids(select_by_reward_variance(rows, table, top_fraction=0.25, seed=0))
    assert len({tuple(p) for p in pick.values()}) > 1


def test_reward_results_and_component_statistics():
    results = [RewardResult(total=f + i, components={"format": f, "iou": i})
               for f, i in [(1, 0.2), (1, 0.4), (0, 0.6), (1, 0.8)]]
    stats = reward_statistics(results, "x", "tvg")
    assert stats.component_mean == {"format": pytest.approx(0.75), "iou": pytest.approx(0.5)}
    assert stats.component_var == {"format": pytest.approx(0.1875), "iou": pytest.approx(0.05)}
    assert stats.mean == pytest.approx(1.25)
    # totals [1.2, 1.4, 0.6, 1.8]: deviations [-0.05, 0.15, -0.65, 0.55], squares sum to 0.75
    assert stats.var == pytest.approx(0.75 / 4)


def test_dict_rewards_with_and_without_total():
    with_total = reward_statistics([{"total": 2.0, "iou": 0.5}, {"total": 0.0, "iou": 0.0}])
    assert (with_total.mean, with_total.var, with_total.component_mean) == (1.0, 1.0, {"iou": 0.25})
    summed = reward_statistics([{"format": 1.0, "choice": 1.0}, {"format": 1.0, "choice": 0.0}])
    assert (summed.mean, summed.var) == (1.5, 0.25)


def test_k_check_string_ids_and_invalid_rewards():
    rows = [{"id": 1, "task": "tvg"}, {"id": 2, "task": "tvg"}, {"id": 3, "task": "tvg"}]
    table = {"1": [0, 1, 1], "2": [0, float("nan")], 3: [0, 1]}  # JSON-style string key, a NaN
    result = select_by_reward_variance(rows, table, k=3)
    assert ids(result) == [1, 3]
    assert (result.summary["n_invalid"], result.summary["n_wrong_k"]) == (1, 1)


def test_argument_validation():
    with pytest.raises(ValueError, match="top_fraction"):
        select_by_reward_variance(ROWS, TABLE, top_fraction=0.0)
    with pytest.raises(ValueError, match="min_variance"):
        select_by_reward_variance(ROWS, TABLE, min_variance=-1)
    with pytest.raises(ValueError, match="no rewards"):
        reward_statistics([])


def test_selection_config():
    assert [(f.name, f.default) for f in fields(SelectionConfig)] == [
        ("k", 8), ("drop_all_same", True), ("min_variance", 0.0), ("top_fraction", None), ("balance_tasks", False),
        ("seed", 0), ("max_refills", 4)]
    config = SelectionConfig(top_fraction=0.3)
    assert ids(select_by_reward_variance(ROWS, TABLE, **{**config.select_kwargs(), "k": 4})) == ["r2", "r4", "r7"]
    for bad, match in ((dict(k=0), "k="), (dict(top_fraction=1.5), "top_fraction"),
                       (dict(max_refills=-1), "max_refills"), (dict(min_variance=-0.1), "min_variance")):
        with pytest.raises(ValueError, match=match):
            SelectionConfig(**bad)


# ----------------------------------------------------------------------------------------------
# Online filter
# ----------------------------------------------------------------------------------------------
def group(name, rewards):
    return {"name": name, "rewards": rewards}


def names(groups):
    return [g["name"] for g in groups]


def test_filter_drops_zero_variance_and_refills_up_to_the_cap():
    flt = ZeroVarianceFilter(max_refills=2)
    flt.push([group("q1", [1, 1]), group("q2", [0, 1]), group("q3", [0.2, 0.4])])
    batch = [group("g1", [0, 1]), group("g2", [0, 0]), group("g3", [1.0, 1.0]), group("g4", [0.5, 0.0])]
    out = flt.filter(batch)
    # q1 (zero variance) and q2 are taken: the cap of 2 is reached before the batch is full
    assert names(out.groups) == ["g1", "g4", "q2"]
    assert (out.num_dropped, out.num_refilled, out.num_short) == (3, 1, 1)
    assert len(flt) == 1
    out = flt.filter([group("g5", [2, 2])])
    assert names(out.groups) == ["q3"] and (out.num_dropped, out.num_refilled, out.num_short) == (1, 1, 0)
    assert (flt.total_dropped, flt.total_refilled, len(flt)) == (4, 2, 0)


def test_filter_without_refills_or_queue():
    out = ZeroVarianceFilter(max_refills=0).filter([group("a", [0, 0]), group("b", [0, 1])])
    assert names(out.groups) == ["b"] and out.num_short == 1
    out = ZeroVarianceFilter(max_refills=5).filter([group("a", [3])])  # a group of one has zero variance
    assert out.groups == [] and out.num_short == 1


def test_filter_reads_rewards_from_objects_sequences_or_a_callback():
    flt = ZeroVarianceFilter()
    assert flt.has_variance(SimpleNamespace(rewards=[RewardResult(1.0, {}), RewardResult(0.0, {})]))
    assert not flt.has_variance([0.5, 0.5])
    custom = ZeroVarianceFilter(rewards_of=lambda g: g[1])
    assert custom.has_variance(("x", [0, 1])) and not custom.has_variance(("y", [1, 1]))
