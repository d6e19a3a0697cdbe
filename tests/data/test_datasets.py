"""Mixing, sharding, background decoding, resuming and skipping bad rows."""
from __future__ import annotations

import json
import shutil

import pytest

from megavrl.data.config import DataConfig, DatasetSpec, VideoConfig, load_data_config
from megavrl.data.datasets import VideoTaskDataset
from megavrl.data.prompt import PreparedPrompt, PromptBuilder, PromptConfig
from megavrl.data.schema import EmptyDatasetError

SMALL_VIDEO = VideoConfig(min_pixels=4 * 784, max_pixels=16 * 784)


def _config(synth_dir, **kw):
    cfg = load_data_config(str(synth_dir / "data.yaml"))
    cfg.video = SMALL_VIDEO
    for key, value in kw.items():
        setattr(cfg, key, value)
    return cfg


def _ids(dataset, n=None):
    it = iter(dataset)
    out = []
    for item in it:
        out.append(item if isinstance(item, str) else item.sample.id)
        if n is not None and len(out) == n:
            break
    return out


def test_synthetic_data_config_loads(synth_dir):
    cfg = load_data_config(str(synth_dir / "data.yaml"))
    assert cfg.source == str(synth_dir / "data.yaml")
    train = VideoTaskDataset(cfg, split="train", prepare=lambda s: s.id)
    val = VideoTaskDataset(cfg, split="val", prepare=lambda s: s.id)
    assert len(train.samples) == 9 * 3 and len(val.samples) == 3 * 3
    assert train.skips.total == 0 and {s.task for s in train.samples} == {"tvg", "mcq", "gqa"}
    assert _ids(val) == [s.id for s in val.samples]  # val: one epoch, in file order


def test_sharding_is_disjoint_and_deterministic(synth_dir):
    cfg = _config(synth_dir)
    shards = [VideoTaskDataset(cfg, rank=r, world_size=4, prepare=lambda s: s.id) for r in range(4)]
    order = shards[0].epoch_order(0)
    assert sorted(order) == list(range(27)) and order != list(range(27))  # shuffled
    per_rank = [s.shard(0) for s in shards]
    assert all(len(p) == 6 for p in per_rank)  # 27 rows, 4 ranks: the tail of 3 is dropped
    flat = [i for p in per_rank for i in p]
    assert len(set(flat)) == 24 and set(flat) <= set(order)
    again = VideoTaskDataset(cfg, rank=2, world_size=4, prepare=lambda s: s.id)
    assert again.shard(0) == per_rank[2] and again.shard(1) != per_rank[2]
    assert VideoTaskDataset(_config(synth_dir, seed=1), rank=2, world_size=4, prepare=lambda s: s.id).shard(0) != per_rank[2]


def test_weights_and_sampling(synth_dir):
    jsonl = str(synth_dir / "train.jsonl")
    cfg = DataConfig(train=[DatasetSpec(json_path=jsonl, data_folder=str(synth_dir), sampling="first:10", weight=2.0),
                            DatasetSpec(json_path=jsonl, data_folder=str(synth_dir), sampling="end:8", weight=0.5)],
                     video=SMALL_VIDEO)
    ds = VideoTaskDataset(cfg, prepare=lambda s: s.id)
    assert ds.sizes == [10, 8]
    order = ds.epoch_order(0)
    assert len(order) == 2 * 10 + 4
    assert all(order.count(i) == 2 for i in range(10)) and sum(1 for i in order if i >= 10) == 4
    assert set(ds.epoch_order(0)) != set(ds.epoch_order(1)) or ds.epoch_order(0) != ds.epoch_order(1)


def test_background_decoding_keeps_the_order_and_builds_prompts(synth_dir, tiny_hf_dir):
    builder = PromptBuilder.from_hf_dir(str(tiny_hf_dir))
    serial = VideoTaskDataset(_config(synth_dir, num_workers=0), builder, rank=1, world_size=2)
    threaded = VideoTaskDataset(_config(synth_dir, num_workers=2, prefetch=2), builder, rank=1, world_size=2)
    a, b = serial.take(5), threaded.take(5)
    assert [p.sample.id for p in a] == [p.sample.id for p in b] == [serial.samples[i].id for i in serial.shard(0)[:5]]
    for p, q in zip(a, b):
        assert isinstance(q, PreparedPrompt) and q.pixel_values_videos.shape[1] == 3 * 2 * 14 * 14
        assert p.input_ids.equal(q.input_ids) and p.pixel_values_videos.equal(q.pixel_values_videos)
        assert q.sample.duration == pytest.approx(4.0) and q.frames.shape[0] == 8  # 4 s at 2 fps


def test_resume_continues_the_same_stream(synth_dir):
    cfg = _config(synth_dir, num_workers=2, prefetch=3)
    reference = _ids(VideoTaskDataset(cfg, rank=0, world_size=2, prepare=lambda s: s.id), 30)  # crosses an epoch
    first = VideoTaskDataset(cfg, rank=0, world_size=2, prepare=lambda s: s.id)
    it = iter(first)
    head = [next(it) for _ in range(17)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["epoch"] == 1 and state["index"] == 17 - 13  # 13 rows per rank per epoch
    second = VideoTaskDataset(cfg, rank=0, world_size=2, prepare=lambda s: s.id)
    second.load_state_dict(state)
    assert head + _ids(second, 13) == reference
    # a different data-parallel size resumes after the same number of rows over all ranks
    third = VideoTaskDataset(cfg, rank=0, world_size=4, prepare=lambda s: s.id)
    third.load_state_dict(state)
    assert (third.epoch, third.index) == (1, state["consumed"] // 4)


def test_bad_videos_are_skipped_counted_and_not_retried(synth_dir, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth_dir, root)
    rows = [json.loads(line) for line in (root / "train.jsonl").read_text().splitlines()][:6]
    (root / "videos" / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"\x17" * 3000)
    rows[0]["video"] = "videos/corrupt.mp4"
    rows[1]["video"] = "videos/gone.mp4"
    rows[2]["timestamps"], rows[2]["task"] = [6.0, 9.0], "tvg"  # beyond the 4 s video
    rows[2].pop("duration")
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(train=[DatasetSpec(json_path=str(root / "rows.jsonl"), data_folder=str(root))],
                     video=SMALL_VIDEO, check_videos_exist=False, shuffle=False, num_workers=2)
    ds = VideoTaskDataset(cfg, prepare=None)
    got = [sample.id for sample, video in ds.take(6)]
    assert got == [r["id"] for r in rows[3:]] + [rows[3]["id"], rows[4]["id"], rows[5]["id"]]
    assert dict(ds.skips.counts) == {"corrupt_video": 1, "video_not_found": 1, "timestamps_outside_video": 1}
    assert ds.skips.examples["video_not_found"][0].source == "rows.jsonl:2"
    assert "skipped 3" in ds.skips.summary()


def test_too_long_prompts_are_skipped(synth_dir, tiny_hf_dir):
    builder = PromptBuilder.from_hf_dir(str(tiny_hf_dir), PromptConfig(max_prompt_len=200))
    cfg = _config(synth_dir, num_workers=0)
    cfg.video = VideoConfig(min_pixels=4 * 784, max_pixels=16 * 784, fps=1.0)
    ds = VideoTaskDataset(cfg, builder, split="val")
    # mcq prompts are ~190 tokens here, tvg and gqa ones longer
    items = list(ds)
    assert items and all(p.num_tokens <= 200 for p in items)
    assert 0 < ds.skips.counts["prompt_too_long"] == len(ds.samples) - len(items)


def test_empty_dataset_is_an_error_at_start(tmp_path, synth_dir):
    rows = tmp_path / "bad.jsonl"
    rows.write_text(json.dumps({"video": "x.mp4", "task": "summarise", "question": "q"}) + "\n")
    (tmp_path / "data.yaml").write_text(f"train:\n  - {{json_path: {rows}, format: megavrl}}\n")
    cfg = load_data_config(str(tmp_path / "data.yaml"))
    with pytest.raises(EmptyDatasetError, match="data.yaml.*no usable rows.*unknown task"):
        VideoTaskDataset(cfg)


def test_an_epoch_with_only_bad_rows_stops_the_stream(tmp_path):
    (tmp_path / "v.mp4").write_bytes(b"not a video at all" * 100)
    rows = [{"id": f"r{i}", "video": "v.mp4", "task": "tvg", "question": "q", "timestamps": [0, 1]} for i in range(3)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    cfg = DataConfig(train=[DatasetSpec(json_path=str(tmp_path / "rows.json"))], video=SMALL_VIDEO, num_workers=0)
    with pytest.raises(RuntimeError, match="every one of the 3 rows"):
        next(iter(VideoTaskDataset(cfg)))
