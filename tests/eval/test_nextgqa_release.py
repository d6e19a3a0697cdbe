"""NExT-GQA from release-format files (test.csv + gsub_test.json) to metrics.json, through the reader,
the schema, the prediction records the eval runner builds, the reward and the report writer."""
from __future__ import annotations

import csv
import json

import pytest

from megavrl.data.config import DatasetSpec
from megavrl.data.datasets import read_dataset
from megavrl.data.schema import SkipReport
from megavrl.eval import evaluate_predictions, prediction_record, write_report
from megavrl.rewards import score

HEADER = ["video_id", "frame_count", "width", "height", "question", "answer", "qid", "type",
          "a0", "a1", "a2", "a3", "a4"]
QUESTIONS = [
    ["4010069381", "1049", "640", "360", "why did the boy pick up the toy", "give to girl", "6", "CW",
     "play", "throw", "give to girl", "clean", "eat"],
    ["4010069381", "1049", "640", "360", "what did the girl do after that", "clap", "7", "TN",
     "clap", "cry", "run", "sit", "sleep"],
    ["2574374895", "719", "320", "240", "how did the baby move", "crawl", "8", "CH",
     "walk", "crawl", "roll", "jump", "fly"],
    ["2574374895", "719", "320", "240", "why is the lady smiling", "happy", "9", "CW",
     "sad", "happy", "angry", "bored", "tired"],   # no segment in gsub: skipped as no_grounding
]
GSUB = {"4010069381": {"duration": 35.0, "location": {"6": [[0.0, 4.0], [10.0, 20.0]], "7": [[21.5, 30.0]]},
                       "fps": 29.97},
        "2574374895": {"duration": 24.0, "location": {"8": [[2.0, 6.0], [8.0, 9.0], [15.0, 23.9]]}, "fps": 30}}


def _release(tmp_path):
    with open(tmp_path / "test.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(QUESTIONS)
    (tmp_path / "gsub_test.json").write_text(json.dumps(GSUB))
    skips = SkipReport(name="nextgqa", log_first=0)
    rows = read_dataset(DatasetSpec(json_path=str(tmp_path / "test.csv"), data_folder=str(tmp_path / "videos"),
                                    format="nextgqa"), skips, check_videos_exist=False)
    return rows, skips


def test_release_files_are_read_with_every_segment(tmp_path):
    rows, skips = _release(tmp_path)
    assert skips.total == 1 and "no grounding" in skips.summary()
    a, b, c = rows
    assert (a.id, a.video, a.task, a.answer, a.duration) == ("4010069381_6", "4010069381.mp4", "gqa", "C", 35.0)
    assert a.meta["spans"] == [[0.0, 4.0], [10.0, 20.0]] and a.timestamps == [0.0, 4.0]
    assert a.meta["type"] == "CW" and b.answer == "A" and c.meta["spans"][2] == [15.0, 23.9]


def test_release_files_to_metrics_json(tmp_path):
    rows, _ = _release(tmp_path)
    responses = [
        "<think>t</think><answer>(C) 12 to 18</answer>",     # [12, 18] vs [[0, 4], [10, 20]]: IoU 0.6, IoP 1.0
        "<think>t</think><answer>(B) 20 to 25</answer>",     # wrong; vs [21.5, 30]: inter 3.5, hull 10 -> 0.35, IoP 0.7
        "<think>t</think><answer>(B)</answer>",              # correct, no span: out of the grounding denominators
    ]
    # The reward reads the same segments as the evaluation.
    reward = score("gqa", responses[0], rows[0].to_row())
    assert reward.components["iou"] == pytest.approx(0.6) and reward.components["choice"] == 1.0
    records = [prediction_record(row, response, benchmark="nextgqa") for row, response in zip(rows, responses)]
    scored, metrics = evaluate_predictions(records)
    write_report(tmp_path / "eval", scored, metrics)
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())["benchmarks"]["nextgqa"]
    assert scored[0]["iou"] == pytest.approx(0.6) and scored[0]["iop"] == 1.0
    assert written["n"] == 3 and written["n_no_span"] == 1
    assert written["Acc@QA"] == pytest.approx(200 / 3)
    assert written["mIoU"] == pytest.approx((0.6 + 0.35) / 2 * 100)
    assert written["mIoP"] == pytest.approx((1.0 + 0.7) / 2 * 100)
    assert written["IoP@0.5"] == 100.0 and written["IoU@0.5"] == 50.0 and written["Acc@GQA"] == 50.0
    assert "n_no_span" in (tmp_path / "eval" / "metrics.md").read_text()


def test_a_missing_gsub_file_is_named(tmp_path):
    (tmp_path / "val.csv").write_text(",".join(HEADER) + "\n")
    skips = SkipReport(name="nextgqa", log_first=0)
    rows = read_dataset(DatasetSpec(json_path=str(tmp_path / "val.csv"), data_folder=str(tmp_path), format="nextgqa"),
                        skips, check_videos_exist=False)
    assert rows == [] and "gsub_val.json" in skips.summary()
