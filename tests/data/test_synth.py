"""``megavrl data synth`` and ``megavrl data inspect``."""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np
import pytest

from megavrl.cli import main
from megavrl.data.synth import COLORS


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != "data.yaml":  # data.yaml names the output directory
            h.update(path.relative_to(root).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_synth_cli_is_deterministic_and_fast(tmp_path, capsys):
    started = time.process_time()
    assert main(["data", "synth", "--out", str(tmp_path / "a"), "--n", "32", "--seed", "5"]) == 0
    cpu = time.process_time() - started
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"out": str(tmp_path / "a"), "train": 28 * 3, "val": 4 * 3, "videos": 32}
    assert len(list((tmp_path / "a" / "videos").glob("*.mp4"))) == 32
    assert cpu < 20, f"32 synthetic videos took {cpu:.1f} s of CPU"
    args = ["data", "synth", "--n", "3", "--seed", "5", "--tasks", "tvg,gqa", "--difficulty", "hard",
            "--fps", "6", "--seconds", "3", "--size", "96x64"]
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert main(args + ["--out", str(tmp_path / "c")]) == 0
    assert _digest(tmp_path / "b") == _digest(tmp_path / "c")
    assert main(args[:5] + ["6"] + args[6:] + ["--out", str(tmp_path / "d")]) == 0
    assert _digest(tmp_path / "d") != _digest(tmp_path / "b")
    rows = [json.loads(x) for x in (tmp_path / "b" / "train.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == {"tvg", "gqa"}


def test_synth_bad_arguments(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path), "--tasks", "tvg,caption"]) == 2
    assert "caption" in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path), "--size", "161x120"]) == 2


def _has_colour(frame: np.ndarray, colour: str) -> bool:
    target = np.array(COLORS[colour], dtype=np.int16)
    close = np.abs(frame.astype(np.int16) - target).max(axis=-1) < 40
    return int(close.sum()) >= 20


def test_events_happen_when_the_rows_say(synth_dir):
    import decord

    rows = [json.loads(x) for x in (synth_dir / "train.jsonl").read_text().splitlines()]
    for row in rows:
        vr = decord.VideoReader(str(synth_dir / row["video"]))
        fps = vr.get_avg_fps()
        frames = vr.get_batch(list(range(len(vr)))).asnumpy()
        assert len(vr) / fps == pytest.approx(row["duration"])
        if row["task"] == "tvg":
            colour = row["question"].split()[1]
        elif row["task"] == "mcq":
            colour = row["options"]["ABCD".index(row["answer"])]
            mover = row["meta"]["events"][0]
            assert mover["color"] == colour and row["question"].endswith(f"moved {mover['direction']}?")
            continue
        else:
            mover = row["meta"]["events"][0]
            assert row["options"]["ABCD".index(row["answer"])] == mover["shape"]
            assert row["timestamps"] == [mover["start"], mover["end"]]
            colour = mover["color"]
        start, end = row["timestamps"]
        inside = [i for i in range(len(vr)) if start * fps <= i < end * fps]
        outside = [i for i in range(len(vr)) if i < start * fps - 1 or i > end * fps]
        assert inside and all(_has_colour(frames[i], colour) for i in inside), row["id"]
        assert not any(_has_colour(frames[i], colour) for i in outside), row["id"]


def test_inspect_prints_the_plan(videos, capsys):
    from megavrl.data.video import VideoSampler

    path = videos["ntsc_322x182"]
    assert main(["data", "inspect", "--video", path, "--json", "--fps", "3", "--max-pixels", str(200 * 784)]) == 0
    info = json.loads(capsys.readouterr().out)
    sampled = VideoSampler(fps=3, max_pixels=200 * 784)(path)
    assert info["frame_indices"] == sampled.frame_indices
    assert (info["resized_height"], info["resized_width"]) == tuple(sampled.frames.shape[-2:])
    assert info["grid_thw"] == [sampled.frames.shape[0] // 2, sampled.frames.shape[2] // 14, sampled.frames.shape[3] // 14]
    assert info["timestamps"] == pytest.approx(sampled.timestamps, abs=1e-5)
    assert main(["data", "inspect", "--video", path]) == 0
    assert "frame indices:" in capsys.readouterr().out
    assert main(["data", "inspect", "--video", path + ".missing"]) == 1


@pytest.mark.parametrize("difficulty,extra", [("easy", {}), ("medium", {}), ("hard", {}),
                                               ("easy", {"distractors": 0, "shape_size": 1.0})])  # the demo's
def test_a_constant_answer_scores_little(difficulty, extra):
    # The tasks need the video: the best constant answer (the eval report's blind baseline) on
    # 200 videos of each seed scores mIoU <= 15 on tvg and gqa, a letter 1/4 (balanced by
    # construction), Acc@GQA <= 15. Planning the rows renders nothing, so this is cheap.
    from megavrl.data.synth import SynthSettings, plan_video
    from megavrl.eval.blind import blind_baseline

    for seed in (0, 1, 2):
        settings = SynthSettings(n=200, seed=seed, difficulty=difficulty, **extra)
        rows = [row for i in range(settings.n) for row in plan_video(i, settings)[1]]
        blind = {task: blind_baseline(task, [{"ground_truth": r} for r in rows if r["task"] == task])["blind_baseline"]
                 for task in ("tvg", "mcq", "gqa")}
        assert blind["tvg"]["mIoU"] <= 15, (seed, blind["tvg"])
        assert blind["mcq"]["accuracy"] == pytest.approx(25.0), (seed, blind["mcq"])
        assert blind["gqa"]["Acc@QA"] == pytest.approx(25.0), (seed, blind["gqa"])
        assert blind["gqa"]["Acc@GQA"] <= 15 and blind["gqa"]["mIoU"] <= 15, (seed, blind["gqa"])
        spans = [r["timestamps"] for r in rows if r["task"] == "tvg"]
        starts = [s for s, _ in spans]
        assert min(starts) == 0 and max(e for _, e in spans) == 8.0  # spread over the whole video
        assert all(e - s <= 8.0 * 5 / 32 + 0.5 for s, e in spans)


def test_written_rows_are_the_planned_rows(synth_dir):
    from megavrl.data.synth import SynthSettings, plan_video

    manifest = json.loads((synth_dir / "manifest.json").read_text())
    settings = SynthSettings(**manifest["settings"])
    written = [json.loads(x) for split in ("train", "val")
               for x in (synth_dir / f"{split}.jsonl").read_text().splitlines()]
    assert written == [row for i in range(settings.n) for row in plan_video(i, settings)[1]]
    for row in written:  # event boundaries on the 0.5 s grid
        assert all((2 * x).is_integer() for e in row["meta"]["events"] for x in (e["start"], e["end"]))


def test_clock_and_distractor_options(synth_dir, tmp_path):
    import decord

    from megavrl.data.synth import CLOCK_LEVELS

    def corner_brightness(path):  # the top-left 4x4 pixels: background unless a shape passes there
        frames = decord.VideoReader(str(path)).get_batch([0, -1]).asnumpy().astype(float)
        return frames[:, :4, :4].mean(axis=(1, 2, 3))

    first, last = corner_brightness(next((synth_dir / "videos").glob("*.mp4")))
    assert last - first == pytest.approx(CLOCK_LEVELS, abs=8)  # the background brightens with time
    assert main(["data", "synth", "--out", str(tmp_path), "--n", "2", "--tasks", "gqa", "--no-clock",
                 "--distractors", "0", "--val-fraction", "0"]) == 0
    first, last = corner_brightness(tmp_path / "videos" / "synth_00000.mp4")
    assert abs(last - first) < 4
    rows = [json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert [len(r["meta"]["events"]) for r in rows] == [1, 1]
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--distractors", "8"]) == 2


def test_shape_size_option(tmp_path):
    # --shape-size 1: the shape fills the frame's height, so a third or more of the screen is its
    # colour while the event lasts, and none before or after it.
    import decord

    assert main(["data", "synth", "--out", str(tmp_path), "--n", "2", "--tasks", "tvg", "--size", "64x64",
                 "--shape-size", "1", "--distractors", "0", "--difficulty", "medium", "--val-fraction", "0"]) == 0
    for row in (json.loads(x) for x in (tmp_path / "train.jsonl").read_text().splitlines()):
        vr = decord.VideoReader(str(tmp_path / row["video"]))
        frames = vr.get_batch(list(range(len(vr)))).asnumpy().astype(np.int16)
        target = np.array(COLORS[row["question"].split()[1]], dtype=np.int16)
        share = (np.abs(frames - target).max(axis=-1) < 40).mean(axis=(1, 2))  # per frame
        start, end = (round(t * vr.get_avg_fps()) for t in row["timestamps"])
        assert share[start:end].min() > 0.3 and share[:max(start - 1, 0)].max(initial=0) == 0
        assert share[end + 1:].max(initial=0) == 0
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--shape-size", "0"]) == 2
    assert main(["data", "synth", "--out", str(tmp_path / "x"), "--shape-size", "1.5"]) == 2
