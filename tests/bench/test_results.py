"""bench/: every result file holds the figure, its baseline, the ratio, the machine and the date,
and ``make bench``'s summary renders them all."""
import json
import math
from pathlib import Path

import pytest

from bench.common import Figure, write_result
from bench.run_all import summarise

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"


def _check_record(rec: dict) -> None:
    assert rec["name"] and rec["date"][:4].isdigit()
    assert rec["machine"]["device"] and rec["machine"]["platform"]
    assert rec["figures"], "a result without figures"
    for f in rec["figures"]:
        assert f["name"] and f["unit"] and f["baseline_name"]
        for key in ("value", "baseline", "ratio"):
            assert isinstance(f[key], (int, float)), (rec["name"], f["name"], key)
        if f["baseline"] and f["value"]:
            expected = f["value"] / f["baseline"] if f["higher_is_better"] else f["baseline"] / f["value"]
            assert math.isclose(f["ratio"], expected, rel_tol=1e-9), (rec["name"], f["name"])


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.stem)
def test_committed_result_files_hold_figure_baseline_ratio_machine_date(path):
    _check_record(json.loads(path.read_text()))


def test_write_result_then_summary(tmp_path, monkeypatch):
    import bench.common
    import bench.run_all

    monkeypatch.setattr(bench.common, "RESULTS", tmp_path)
    monkeypatch.setattr(bench.run_all, "RESULTS", tmp_path)
    write_result("demo", [Figure("tokens/s", 300.0, 100.0, "tokens/s", baseline_name="transformers"),
                          Figure("seconds", 2.0, 8.0, "s", higher_is_better=False)])
    rec = json.loads((tmp_path / "demo.json").read_text())
    _check_record(rec)
    assert [f["ratio"] for f in rec["figures"]] == [3.0, 4.0]
    table = summarise()
    assert "| demo | tokens/s | 300 tokens/s | 100 (transformers) | 3.00x |" in table
    assert "| demo | seconds | 2 s | 8 (baseline) | 4.00x |" in table
