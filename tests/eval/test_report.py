"""The evaluation writers: predictions JSONL, metrics JSON, Markdown; round trips and atomicity."""
from __future__ import annotations

import json

from megavrl.eval import (aggregate_metrics, evaluate_predictions, metrics_markdown, read_predictions_jsonl,
                          write_report)
from megavrl.eval.report import write_metrics_json

RECORDS = [
    {"id": "t0", "task": "tvg", "benchmark": "charades_sta", "response": "<answer>0 to 5</answer>",
     "ground_truth": {"timestamps": [0, 10]}},                                     # IoU 0.5
    {"id": "t1", "task": "tvg", "benchmark": "charades_sta", "response": "no answer",
     "ground_truth": {"timestamps": [0, 10]}},                                     # parse failure
    {"id": "m0", "task": "mcq", "benchmark": "mv|bench", "response": "<answer>B</answer>",
     "ground_truth": {"answer": "B", "options": ["x", "y"]}},                      # correct
]


def test_report_files_round_trip(tmp_path):
    scored, metrics = evaluate_predictions(RECORDS, expected={"activitynet": "tvg"})
    paths = write_report(tmp_path / "eval", scored, metrics, prefix="step_10_")
    assert {p.name for p in paths.values()} == {"step_10_predictions.jsonl", "step_10_metrics.json",
                                                "step_10_metrics.md"}
    assert not list((tmp_path / "eval").glob(".*.tmp"))          # no temporary file left behind

    lines = paths["predictions"].read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["prediction"]["span"] == [0.0, 5.0]
    # Re-aggregating the written predictions gives the written metrics.
    again = aggregate_metrics(read_predictions_jsonl(paths["predictions"]), expected={"activitynet": "tvg"})
    assert json.loads(paths["metrics"].read_text()) == again == json.loads(json.dumps(metrics))

    md = paths["markdown"].read_text()
    # charades_sta: mIoU = 100 * (0.5 + 0) / 2 = 25; R@0.3 = R@0.5 = 50; R@0.7 = 0; format rate 0
    # (no response has the <think> block that the strict template requires).
    assert "| charades_sta | 2 | 25.00 | 50.00 | 50.00 | 0.00 | 0.00 |" in md
    assert "| activitynet | 0 | n/a | n/a | n/a | n/a | n/a |" in md       # the empty benchmark
    assert "| mv\\|bench | mcq | 1 | 0 | 0 | accuracy | 100.00 |" in md   # "|" escaped in a cell
    # Overall: (25 + 100) / 2 over the two non-empty benchmarks.
    assert "primary metrics of 2 non-empty benchmarks): **62.50**" in md
    assert "### Grounded QA" not in md                                  # no gqa benchmark, no table


def test_malformed_prediction_lines_are_skipped(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": 1, "task": "tvg"}\nnot json\n\n[1, 2]\n{"id": 2, "task": "mcq"}\n')
    assert [r["id"] for r in read_predictions_jsonl(path)] == [1, 2]


def test_metrics_json_refuses_nan(tmp_path):
    try:
        write_metrics_json(tmp_path / "m.json", {"overall": {"mean_primary": float("nan")}})
    except ValueError:
        pass
    else:
        raise AssertionError("NaN was written into metrics.json")
    assert not (tmp_path / "m.json").exists() and not list(tmp_path.iterdir())


def test_markdown_of_empty_metrics():
    md = metrics_markdown(aggregate_metrics([]))
    assert "**n/a**" in md and "###" not in md
