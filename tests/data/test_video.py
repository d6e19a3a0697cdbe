"""Frame sampling against the Qwen team's reference sampler (qwen-vl-utils, decord backend)."""
from __future__ import annotations

import pytest
import torch

from megavrl.data.video import (FPS, FPS_MAX_FRAMES, FPS_MIN_FRAMES, VIDEO_MAX_PIXELS, VIDEO_MIN_PIXELS,
                                VIDEO_TOTAL_PIXELS, VideoError, VideoSampler, smart_nframes, smart_resize)


@pytest.fixture(scope="module")
def qwen_vp():
    from qwen_vl_utils import vision_process as vp

    vp.FORCE_QWENVL_VIDEO_READER = "decord"
    vp.get_video_reader_backend.cache_clear()
    assert vp.get_video_reader_backend() == "decord"
    return vp


def test_defaults_are_qwen_vl_utils(qwen_vp):
    vp = qwen_vp
    assert FPS == vp.FPS and FPS_MIN_FRAMES == vp.FPS_MIN_FRAMES and FPS_MAX_FRAMES == vp.FPS_MAX_FRAMES
    factor = 14 * vp.SPATIAL_MERGE_SIZE
    assert VIDEO_MIN_PIXELS == vp.VIDEO_MIN_TOKEN_NUM * factor ** 2
    assert VIDEO_MAX_PIXELS == vp.VIDEO_MAX_TOKEN_NUM * factor ** 2
    assert VIDEO_TOTAL_PIXELS == int(vp.MODEL_SEQ_LEN * factor ** 2 * 0.9)
    sampler = VideoSampler()
    assert (sampler.fps, sampler.min_frames, sampler.max_frames) == (2.0, 4, 768)


# (qwen-vl-utils element keys, our sampler kwargs)
SETTINGS = [
    ({}, {}),
    ({"fps": 1.0, "min_pixels": 16 * 784, "max_pixels": 64 * 784}, {"fps": 1.0, "min_pixels": 16 * 784, "max_pixels": 64 * 784}),
    ({"fps": 4.0, "total_pixels": 300 * 784}, {"fps": 4.0, "total_pixels": 300 * 784}),
    ({"nframes": 6, "min_pixels": 8 * 784, "max_pixels": 40 * 784}, {"nframes": 6, "min_pixels": 8 * 784, "max_pixels": 40 * 784}),
    ({"video_start": 0.7, "video_end": 2.9, "max_frames": 6}, {"max_frames": 6, "start": 0.7, "end": 2.9}),
]


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_sampling_matches_qwen_vl_utils(videos, qwen_vp, setting):
    ele_extra, kwargs = SETTINGS[setting]
    kwargs = dict(kwargs)
    start, end = kwargs.pop("start", None), kwargs.pop("end", None)
    sampler = VideoSampler(**kwargs)
    for name, path in videos.items():
        try:
            ref, meta = qwen_vp.fetch_video({"video": path, **ele_extra}, return_video_metadata=True)
        except Exception:  # e.g. a clip longer than a short video: both sides must refuse it
            with pytest.raises(VideoError):
                sampler(path, start, end)
            continue
        got = sampler(path, start, end)
        assert got.frame_indices == list(meta["frames_indices"]), name
        assert tuple(got.frames.shape) == tuple(ref.shape), name
        assert got.frames.dtype == torch.uint8
        assert torch.equal(got.frames.float(), ref), f"{name}: pixels differ from qwen-vl-utils"
        plan = sampler.plan(path, start, end)  # metadata-only planning gives the same answer
        assert (plan.frame_indices, plan.resized_height, plan.resized_width) == (
            got.frame_indices, got.plan.resized_height, got.plan.resized_width)
        fps = meta["fps"]
        assert got.timestamps == pytest.approx([i / fps for i in meta["frames_indices"]])
        assert got.sample_fps == pytest.approx(len(meta["frames_indices"]) / meta["total_num_frames"] * fps)


def test_sample_fps_is_what_qwen_vl_utils_reports(videos, qwen_vp):
    path = videos["ntsc_322x182"]
    _, sample_fps = qwen_vp.fetch_video({"video": path, "fps": 2.0}, return_video_sample_fps=True)
    assert VideoSampler()(path).sample_fps == pytest.approx(sample_fps)


def test_pure_rules_match_qwen_vl_utils(qwen_vp):
    for h, w in [(182, 322), (131, 225), (480, 96), (40, 50), (2000, 3000), (28, 28 * 150)]:
        for lo, hi in [(VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS), (4 * 784, 16 * 784), (56 * 56, 28 * 28 * 1280)]:
            assert smart_resize(h, w, 28, lo, hi) == qwen_vp.smart_resize(h, w, 28, lo, hi)
    for total, fps in [(95, 29.97), (7, 8.0), (3000, 30.0), (41, 25.0), (2, 30.0)]:
        for target in (0.5, 2.0, 8.0):
            ref = qwen_vp.smart_nframes({"fps": target}, total_frames=total, video_fps=fps)
            assert smart_nframes(total, fps, fps=target) == ref


def test_frames_are_a_multiple_of_the_temporal_patch(videos):
    for path in videos.values():
        got = VideoSampler(fps=3.0)(path)
        assert got.frames.shape[0] % 2 == 0
        assert got.frames.shape[2] % 28 == 0 and got.frames.shape[3] % 28 == 0


def test_bad_videos_raise_video_error_with_a_kind(tmp_path, videos):
    sampler = VideoSampler()
    with pytest.raises(VideoError, match="does not exist") as exc:
        sampler(str(tmp_path / "missing.mp4"))
    assert exc.value.kind == "video_not_found"
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20)
    with pytest.raises(VideoError) as exc:
        sampler(str(corrupt))
    assert exc.value.kind == "corrupt_video"
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError) as exc:
        sampler(str(empty))
    assert exc.value.kind == "corrupt_video"
    from tests.data.conftest import write_video

    one = write_video(tmp_path / "one_frame.mp4", 64, 48, 10, 1)
    with pytest.raises(VideoError) as exc:
        sampler(one)
    assert exc.value.kind in ("video_too_short", "zero_duration")
    with pytest.raises(VideoError) as exc:  # a clip beyond the end of a 0.9 s video
        sampler(videos["short_50x40_8fps"], start=5.0, end=9.0)
    assert exc.value.kind == "timestamps_outside_video"
