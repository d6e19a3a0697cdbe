"""Each public annotation format, and every kind of bad row, read into the megavrl schema."""
from __future__ import annotations

import json

import pytest

from megavrl.data.config import DatasetSpec
from megavrl.data.datasets import apply_sampling, read_dataset
from megavrl.data.schema import SkipReport


def _read(tmp_path, name, content, fmt, **spec):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    skips = SkipReport(name="test", log_first=0)
    rows = read_dataset(DatasetSpec(json_path=str(path), data_folder=str(tmp_path / "vids"), format=fmt, **spec),
                        skips, check_videos_exist=False)
    return rows, skips


def test_charades_sta_text(tmp_path):
    rows, skips = _read(tmp_path, "charades_sta_train.txt",
                        "3MSZA 24.3 30.4##person turn a light on.\nAB12C 0.0 6.9##a person is eating food\n\n",
                        "charades_sta")
    assert skips.total == 0 and len(rows) == 2
    r = rows[0]
    assert (r.task, r.question, r.timestamps, r.video) == ("tvg", "person turn a light on", [24.3, 30.4], "3MSZA.mp4")
    assert r.video_path == str(tmp_path / "vids" / "3MSZA.mp4") and r.source == "charades_sta_train.txt:1"


def test_charades_sta_json_and_activitynet_captions(tmp_path):
    data = {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81]],
                              "sentences": ["A young woman is seen standing.", " She then dances."]}}
    for fmt in ("charades_sta", "activitynet_captions"):
        rows, skips = _read(tmp_path, f"{fmt}.json", data, fmt)
        assert skips.total == 0
        assert [(r.question, r.timestamps, r.duration) for r in rows] == [
            ("A young woman is seen standing", [0.83, 19.86], 82.73), ("She then dances", [17.37, 60.81], 82.73)]
        assert rows[0].video == "v_QOlSCBRmfWY.mp4" and rows[1].id == "v_QOlSCBRmfWY_1"


def test_nextgqa(tmp_path):
    data = [{"video_id": "4010069381", "qid": 6, "question": "why did the boy pick up the toy",
             "a0": "play", "a1": "throw", "a2": "give to girl", "a3": "clean", "a4": "eat", "answer": 2,
             "duration": 35.0, "location": [[3.1, 8.4], [20.0, 22.5]]},
            {"video_id": "4010069381", "qid": 7, "question": "what is on the table",
             "options": ["cup", "toy"], "answer": "toy", "location": [1.0, 4.0]}]
    rows, skips = _read(tmp_path, "nextgqa_val.json", data, "nextgqa")
    assert skips.total == 0
    a, b = rows
    assert (a.task, a.answer, a.options[2], a.timestamps) == ("gqa", "C", "give to girl", [3.1, 8.4])
    assert a.meta["spans"] == [[3.1, 8.4], [20.0, 22.5]] and a.id == "4010069381_6"
    assert (b.answer, b.timestamps) == ("B", [1.0, 4.0])


def test_mvbench(tmp_path):
    data = [{"video": "166583.webm", "question": "What is the action performed by the person?",
             "candidates": ["sit down", "stand up", "jump"], "answer": "stand up"},
            {"video": "clip.mp4", "question": "What happens first?", "candidates": ["a", "b"], "answer": "a",
             "start": 2.0, "end": 9.5}]
    rows, skips = _read(tmp_path, "action_sequence.json", data, "mvbench")
    assert skips.total == 0
    assert (rows[0].task, rows[0].answer, rows[0].clip) == ("mcq", "B", None)
    assert rows[1].clip == [2.0, 9.5]


def test_temporal_r1(tmp_path):
    lines = [{"problem": "the man opens the door", "solution": [0.1, 0.35], "video_length": 40.0, "video": "a.mp4"},
             {"problem": "she sits", "solution": "<answer>0.5 to 0.75</answer>", "video_length": 8, "video": "b"}]
    rows, skips = _read(tmp_path, "tr1.jsonl", "\n".join(json.dumps(x) for x in lines), "temporal_r1")
    assert skips.total == 0
    assert [(r.task, r.timestamps, r.duration) for r in rows] == [("tvg", [4.0, 14.0], 40.0), ("tvg", [4.0, 6.0], 8.0)]
    assert rows[1].video == "b.mp4"


def test_megavrl_schema_and_every_bad_row(tmp_path):
    good = {"id": "ok", "video": "a.mp4", "task": "mcq", "question": "q?", "options": ["x", "y"], "answer": "(B)"}
    bad = [
        ({"video": "a.mp4", "task": "caption", "question": "q"}, "unknown_task"),
        ({"video": "a.mp4", "task": "tvg", "question": "q", "timestamps": [5, 2]}, "reversed_timestamps"),
        ({"video": "a.mp4", "task": "tvg", "question": "q", "timestamps": [5, 20], "duration": 10}, "timestamps_outside_video"),
        ({"video": "a.mp4", "task": "tvg", "question": "q", "timestamps": [-3, 2]}, "timestamps_outside_video"),
        ({"video": "a.mp4", "task": "tvg", "question": "q", "timestamps": [1, 2], "duration": 0}, "zero_duration"),
        ({"video": "a.mp4", "task": "tvg", "question": "q"}, "malformed"),
        ({"video": "a.mp4", "task": "mcq", "question": "q", "options": ["x", "y"], "answer": "D"}, "malformed"),
        ({"task": "tvg", "question": "q", "timestamps": [1, 2]}, "malformed"),
        ([1, 2, 3], "malformed"),
    ]
    lines = [json.dumps(good)] + [json.dumps(row) for row, _ in bad] + ["{not json", json.dumps(good)]
    rows, skips = _read(tmp_path, "train.jsonl", "\n".join(lines), "megavrl")
    assert [r.id for r in rows] == ["ok", "ok"] and rows[0].answer == "B"
    expected = {}
    for _, kind in bad:
        expected[kind] = expected.get(kind, 0) + 1
    expected["malformed"] += 1  # the line that is not json
    assert dict(skips.counts) == expected
    assert skips.examples["reversed_timestamps"][0].source == "train.jsonl:3"
    summary = skips.summary(of=len(rows))
    assert summary.startswith(f"test: skipped {skips.total} of {skips.total + 2} rows") and "train.jsonl:2" in summary


def test_overshooting_timestamps_within_tolerance_are_clamped(tmp_path):
    rows, skips = _read(tmp_path, "t.json", [{"video": "a.mp4", "task": "tvg", "question": "q",
                                              "timestamps": [2, 10.5], "duration": 10}], "megavrl")
    assert skips.total == 0 and rows[0].timestamps == [2.0, 10.0]


def test_unreadable_files_and_missing_videos_are_reported(tmp_path):
    skips = SkipReport(name="test", log_first=0)
    assert read_dataset(DatasetSpec(json_path=str(tmp_path / "nope.json")), skips) == []
    (tmp_path / "broken.json").write_text("[{\"video\": ")
    assert read_dataset(DatasetSpec(json_path=str(tmp_path / "broken.json")), skips) == []
    (tmp_path / "rows.json").write_text(json.dumps([{"video": "missing.mp4", "task": "tvg", "question": "q",
                                                     "timestamps": [0, 1]}]))
    assert read_dataset(DatasetSpec(json_path=str(tmp_path / "rows.json")), skips) == []
    assert dict(skips.counts) == {"unreadable_file": 2, "video_not_found": 1}


def test_sampling_rules():
    rows = list(range(10))
    assert apply_sampling(rows, "all", 0) == rows
    assert apply_sampling(rows, "first:3", 0) == [0, 1, 2]
    assert apply_sampling(rows, "end:2", 0) == [8, 9]
    assert apply_sampling(rows, "first:50%", 0) == [0, 1, 2, 3, 4]
    picked = apply_sampling(rows, "random:4", 7)
    assert len(picked) == 4 and picked == sorted(picked) and picked == apply_sampling(rows, "random:4", 7)
    with pytest.raises(ValueError, match="sampling"):
        DatasetSpec(json_path="x.json", sampling="some:3")
    with pytest.raises(ValueError, match="format"):
        DatasetSpec(json_path="x.json", format="csv")


def test_nextgqa_release_csv_with_video_map(tmp_path):
    # The release's test.csv header, gsub_test.json keyed by video id, map_vid_vidorID.json for the paths.
    (tmp_path / "gsub_test.json").write_text(json.dumps(
        {"2574374895": {"duration": 24.0, "location": {"8": [[2.0, 6.0], [8.0, 9.0]]}, "fps": 30}}))
    (tmp_path / "map_vid_vidorID.json").write_text(json.dumps({"2574374895": "0000/2574374895"}))
    rows, skips = _read(tmp_path, "test.csv",
                        "video_id,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4\n"
                        "2574374895,719,320,240,how did the baby move,crawl,8,CH,walk,crawl,roll,jump,fly\n"
                        "2574374895,719,320,240,why,1,8,CW,x,y,z,u,v\n", "nextgqa")
    assert skips.total == 0
    a, b = rows
    assert (a.video, a.answer, a.timestamps, a.meta["spans"]) == ("0000/2574374895.mp4", "B", [2.0, 6.0],
                                                                   [[2.0, 6.0], [8.0, 9.0]])
    assert b.answer == "B"   # an index (NExT-QA's original files) is read as one
