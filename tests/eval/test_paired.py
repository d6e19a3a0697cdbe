"""The paired comparison of two evaluations: the change of the primary metric, its bootstrap
interval (checked against the normal approximation of a paired mean), row matching."""
from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from megavrl.eval.metrics import task_metrics
from megavrl.eval.paired import paired_changes


def _tvg(ious, prefix="t", benchmark="val/tvg"):
    return [{"id": f"{prefix}{i}", "task": "tvg", "benchmark": benchmark, "iou": float(v), "invalid": False}
            for i, v in enumerate(ious)]


def test_change_equals_the_metric_difference_and_a_clear_gain_excludes_zero():
    rng = np.random.default_rng(0)
    before = rng.uniform(0, 0.6, 120)
    after = np.clip(before + rng.uniform(0.05, 0.35, 120), 0, 1)
    (change,) = paired_changes(_tvg(before), _tvg(after))
    assert change.benchmark == "val/tvg" and change.metric == "mIoU" and change.n == 120
    assert change.before == pytest.approx(task_metrics("tvg", _tvg(before))["mIoU"])
    assert change.delta == pytest.approx(100 * (after - before).mean())
    assert change.low <= change.delta <= change.high
    assert change.beyond_noise and change.low > 0
    assert (change.better, change.worse) == (int((after > before).sum()), int((after < before).sum()))


def test_rows_that_trade_places_give_an_interval_around_zero():
    before = [1.0] * 50 + [0.0] * 50
    after = [0.0] * 50 + [1.0] * 50
    (change,) = paired_changes(_tvg(before), _tvg(after))
    assert change.delta == 0.0 and (change.better, change.worse) == (50, 50)
    assert change.low < 0 < change.high and not change.beyond_noise


def test_interval_of_a_mean_metric_matches_the_normal_approximation():
    """For mIoU (a mean over rows) the percentile bootstrap of the paired difference approaches
    mean(d) +- 1.96 * sd(d) / sqrt(n); with n = 400 and 2000 draws the endpoints agree within 10%
    of the interval's width (Monte Carlo error of a 2.5% quantile from 2000 draws: about 2%)."""
    rng = np.random.default_rng(1)
    before = rng.uniform(0, 1, 400)
    after = np.where(rng.uniform(size=400) < 0.3, rng.uniform(0, 1, 400), before)
    (change,) = paired_changes(_tvg(before), _tvg(after), resamples=2000, seed=3)
    d = [100 * (a - b) for a, b in zip(after, before)]
    half = 1.96 * statistics.pstdev(d) / math.sqrt(len(d))
    width = 2 * half
    assert change.low == pytest.approx(statistics.fmean(d) - half, abs=0.1 * width)
    assert change.high == pytest.approx(statistics.fmean(d) + half, abs=0.1 * width)


def test_same_seed_same_interval_and_no_resamples_no_interval():
    rng = np.random.default_rng(2)
    before, after = _tvg(rng.uniform(size=60)), _tvg(rng.uniform(size=60))
    assert paired_changes(before, after, seed=5) == paired_changes(before, after, seed=5)
    (bare,) = paired_changes(before, after, resamples=0)
    assert bare.low is None and bare.high is None and bare.delta is not None
    assert bare.describe() == f"{bare.delta:+.2f}"
    with pytest.raises(ValueError, match="confidence"):
        paired_changes(before, after, confidence=1.0)


def test_rows_are_matched_by_benchmark_and_id_and_invalid_rows_are_left_out():
    before = _tvg([0.0, 0.0, 0.0, 0.5]) + _tvg([1.0], benchmark="other/tvg")
    after = list(reversed(_tvg([1.0, 1.0, 0.0, 0.5, 0.9])))  # shuffled, one row more (t4)
    after[0]["invalid"] = True  # t4: invalid after
    before[2]["invalid"] = True  # t2: invalid before
    changes = {c.benchmark: c for c in paired_changes(before, after)}
    assert set(changes) == {"val/tvg"}  # other/tvg has no row in after
    change = changes["val/tvg"]
    assert change.n == 3  # t0, t1, t3
    assert change.before == pytest.approx(100 * 0.5 / 3) and change.after == pytest.approx(100 * 2.5 / 3)
    assert (change.better, change.worse) == (2, 0)


def test_choice_and_grounded_qa_use_their_own_primary_metric():
    mcq_before = [{"id": f"m{i}", "task": "mcq", "benchmark": "mcq", "correct": i % 2 == 0, "invalid": False}
                  for i in range(40)]
    mcq_after = [dict(r, correct=True) for r in mcq_before]
    gqa_before = [{"id": f"g{i}", "task": "gqa", "benchmark": "gqa", "correct": True, "iou": 0.4, "iop": 0.2,
                   "prediction": {"span": [0.0, 1.0]}, "invalid": False} for i in range(40)]
    gqa_after = [dict(r, iop=0.8) if i < 30 else dict(r, prediction={"span": None}) for i, r in enumerate(gqa_before)]
    changes = {c.benchmark: c for c in paired_changes(mcq_before + gqa_before, mcq_after + gqa_after)}
    assert changes["mcq"].metric == "accuracy" and changes["mcq"].delta == pytest.approx(50.0)
    assert (changes["mcq"].better, changes["mcq"].worse) == (20, 0)
    # Acc@GQA over the questions with a span: 0/40 before, 30/30 after.
    assert changes["gqa"].metric == "Acc@GQA" and changes["gqa"].delta == pytest.approx(100.0)
    assert changes["gqa"].beyond_noise and changes["gqa"].better == 30
