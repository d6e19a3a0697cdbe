"""Normalise + patchify against transformers' Qwen2-VL video and image processors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megavrl.data.preprocess import VisionSpec, preprocess_images, preprocess_video, preprocess_videos
from megavrl.data.video import VideoSampler

MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]


@pytest.fixture(scope="module")
def hf_video_processor():
    from transformers import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28, patch_size=14,
                                 temporal_patch_size=2, merge_size=2, image_mean=MEAN, image_std=STD)


@pytest.fixture(scope="module")
def hf_image_processor():
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, patch_size=14,
                                 temporal_patch_size=2, merge_size=2, image_mean=MEAN, image_std=STD)


def _hf_video(proc, frames, metadata=None, do_resize=False):
    out = proc(videos=[frames], video_metadata=None if metadata is None else [metadata], do_resize=do_resize,
               return_tensors="pt", return_metadata=True, cap_pixels_per_frame=False)
    return out


@pytest.mark.parametrize("name", ["ntsc_322x182", "odd_225x131", "tall_96x480_12fps", "short_50x40_8fps"])
def test_video_features_equal_hf(videos, hf_video_processor, name):
    video = VideoSampler(max_pixels=160 * 784)(videos[name])
    ours = preprocess_video(video.frames, video.sample_fps)
    # The frames are already sized inside the processor's own pixel range: its resize is a no-op.
    ref = _hf_video(hf_video_processor, video.frames, video.hf_metadata(), do_resize=True)
    assert torch.equal(ref["video_grid_thw"], ours.video_grid_thw)
    assert ours.pixel_values_videos.dtype == torch.float32
    assert ours.pixel_values_videos.shape == ref["pixel_values_videos"].shape
    torch.testing.assert_close(ours.pixel_values_videos, ref["pixel_values_videos"], rtol=0, atol=1e-5)
    # transformers 5 derives second_per_grid_ts from VideoMetadata.sampled_fps (Qwen2_5_VLProcessor)
    sampled_fps = ref["video_metadata"][0].sampled_fps
    assert sampled_fps == pytest.approx(video.sample_fps)
    assert ours.second_per_grid_ts.tolist() == pytest.approx([2 / sampled_fps])


def test_odd_frame_count_is_padded_like_hf(hf_video_processor):
    frames = torch.randint(0, 256, (5, 3, 56, 84), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = preprocess_video(frames, sample_fps=2.0)
    ref = _hf_video(hf_video_processor, frames)
    assert ours.video_grid_thw.tolist() == ref["video_grid_thw"].tolist() == [[3, 4, 6]]
    torch.testing.assert_close(ours.pixel_values_videos, ref["pixel_values_videos"], rtol=0, atol=1e-5)


def test_several_videos_concatenate_in_order(hf_video_processor):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (4, 3, 56, 56), dtype=torch.uint8, generator=g)
    b = torch.randint(0, 256, (2, 3, 28 * 3, 28 * 2), dtype=torch.uint8, generator=g)
    ours = preprocess_videos([a, b], [2.0, 0.5])
    ref = hf_video_processor(videos=[a, b], do_resize=False, return_tensors="pt", cap_pixels_per_frame=False)
    assert ours.video_grid_thw.tolist() == ref["video_grid_thw"].tolist()
    torch.testing.assert_close(ours.pixel_values_videos, ref["pixel_values_videos"], rtol=0, atol=1e-5)
    assert ours.second_per_grid_ts.tolist() == [1.0, 4.0]


@pytest.mark.parametrize("size", [(100, 150), (37, 901), (1000, 700), (56, 56)])
def test_image_features_equal_hf(hf_image_processor, size):
    from PIL import Image

    h, w = size
    img = Image.fromarray(np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8))
    ours = preprocess_images([img], VisionSpec(image_min_pixels=56 * 56, image_max_pixels=28 * 28 * 1280))
    ref = hf_image_processor(images=[img], return_tensors="pt")
    assert ours.image_grid_thw.tolist() == ref["image_grid_thw"].tolist()
    torch.testing.assert_close(ours.pixel_values, ref["pixel_values"], rtol=0, atol=1e-5)


def test_spec_reads_the_tiny_model_processor_config(tiny_hf_dir):
    spec = VisionSpec.from_hf_dir(str(tiny_hf_dir))
    assert (spec.patch_size, spec.temporal_patch_size, spec.merge_size) == (14, 2, 2)
    assert spec.image_mean == pytest.approx(MEAN) and spec.image_std == pytest.approx(STD)
    assert (spec.video_min_pixels, spec.video_max_pixels) == (128 * 28 * 28, 768 * 28 * 28)


def test_unaligned_frames_are_refused():
    with pytest.raises(ValueError, match="multiple of"):
        preprocess_video(torch.zeros(2, 3, 50, 56, dtype=torch.uint8), 2.0)
