"""The benchmarks' shared pieces: response length mixes and the allocator setting."""
from __future__ import annotations

import os
import statistics

import pytest

from bench.common import keep_freed_memory, response_lengths


def test_response_lengths_stay_in_range_and_are_reproducible():
    for dist in ("uniform", "loguniform"):
        drawn = response_lengths(4000, 16, 512, dist, seed=3)
        assert min(drawn) >= 16 and max(drawn) <= 512
        assert drawn == response_lengths(4000, 16, 512, dist, seed=3)
        assert drawn != response_lengths(4000, 16, 512, dist, seed=4)


def test_uniform_is_flat_and_loguniform_has_a_long_tail():
    uniform = response_lengths(20000, 16, 512, "uniform")
    tailed = response_lengths(20000, 16, 512, "loguniform")
    assert abs(statistics.mean(uniform) - 264) < 5  # (16 + 512) / 2
    assert abs(statistics.median(tailed) - 91) < 5  # exp((ln 16 + ln 513) / 2) = 90.6
    assert abs(statistics.mean(tailed) - 143) < 5  # (513 - 16) / ln(513 / 16) = 143.0
    assert sum(x < 64 for x in tailed) > 3 * sum(x >= 448 for x in tailed)  # many short, few long


def test_unknown_distribution_is_refused():
    with pytest.raises(ValueError, match="choose one of"):
        response_lengths(3, 16, 512, "normal")


def test_keep_freed_memory_sets_the_tunables_for_child_processes(monkeypatch):
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        monkeypatch.delenv(name, raising=False)
    keep_freed_memory()
    assert os.environ["MALLOC_MMAP_MAX_"] == "0"
    assert int(os.environ["MALLOC_TRIM_THRESHOLD_"]) >= 2**30
