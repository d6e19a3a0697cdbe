"""Rollout prompts -> vLLM prompt dicts: formats, metadata and the errors users see (no vLLM needed)."""
from __future__ import annotations

import numpy as np
import pytest

from megavrl.rollout import RolloutPrompt, VideoInput
from megavrl.rollout.inputs import as_rollout_prompt, to_vllm_prompt
from tests.rollout.helpers import video_prompt

FRAMES = np.zeros((6, 56, 84, 3), np.uint8)


def _convert(item, pixel_multiple=28):
    return to_vllm_prompt(as_rollout_prompt(item), 3, pixel_multiple=pixel_multiple,
                          mm_processor_kwargs={"do_resize": False})


def test_video_prompt_format():
    video = VideoInput(frames=FRAMES, fps=30.0, frames_indices=[0, 15, 30, 45, 60, 75], total_num_frames=90)
    assert video.sampled_fps == pytest.approx(2.0)
    out = _convert(RolloutPrompt(prompt=video_prompt("q"), videos=[video], mm_processor_kwargs={"fps": 2}))
    (frames, meta), = out["multi_modal_data"]["video"]
    assert frames is FRAMES
    assert meta == {"fps": 30.0, "total_num_frames": 90, "frames_indices": [0, 15, 30, 45, 60, 75],
                    "duration": 3.0, "video_backend": "megavrl", "do_sample_frames": False}
    assert out["mm_processor_kwargs"] == {"do_resize": False, "fps": 2}
    # vLLM's own (frames, metadata) pair is accepted too
    pair = _convert({"prompt": video_prompt("q"), "videos": [(FRAMES, VideoInput.from_frames(FRAMES, 2).metadata())]})
    assert pair["multi_modal_data"]["video"][0][1]["frames_indices"] == list(range(6))


def test_text_prompts_pass_through():
    assert _convert("hello") == {"prompt": "hello"}
    assert _convert({"prompt_token_ids": [1, 2, 3]}) == {"prompt_token_ids": [1, 2, 3]}


@pytest.mark.parametrize("item, message", [
    (RolloutPrompt(prompt="no placeholder", videos=[VideoInput.from_frames(FRAMES, 2)]), "placeholder"),
    (RolloutPrompt(prompt=video_prompt("q"), videos=[VideoInput.from_frames(FRAMES[:, :50], 2)]), "multiple of 28"),
    (RolloutPrompt(prompt=video_prompt("q"), videos=[VideoInput.from_frames(FRAMES.astype(np.float32), 2)]), "uint8"),
    (RolloutPrompt(prompt=video_prompt("q"), videos=[(FRAMES, {"fps": 2.0})]), "frames_indices"),
    (RolloutPrompt(), "exactly one of prompt"),
    ({"prompt": "x", "video": []}, "unknown rollout prompt keys"),
])
def test_bad_prompts_are_named(item, message):
    with pytest.raises(ValueError, match=message):
        _convert(item)


def test_resize_in_vllm_allows_any_size():
    out = _convert(RolloutPrompt(prompt=video_prompt("q"), videos=[VideoInput.from_frames(FRAMES[:, :50], 2)]),
                   pixel_multiple=None)
    assert out["multi_modal_data"]["video"][0][0].shape == (6, 50, 84, 3)


def test_vllm_prompt_dicts_are_accepted():
    """The format megavrl.rollout.inputs.vllm_prompt produces: token ids with one pad, (frames, metadata)."""
    meta = {"fps": 24.0, "frames_indices": [0, 12, 24, 36, 48, 60], "total_num_frames": 72, "duration": 3.0}
    item = {"prompt_token_ids": [5, 724, 6], "multi_modal_data": {"video": [(FRAMES, meta)]},
            "mm_processor_kwargs": {"do_sample_frames": False}}
    out = to_vllm_prompt(as_rollout_prompt(item), 0, pixel_multiple=28, mm_processor_kwargs={"do_resize": False},
                         video_token_id=724)
    assert out["prompt_token_ids"] == [5, 724, 6]
    assert out["multi_modal_data"]["video"][0][1] == {"do_sample_frames": False, **meta}
    assert out["mm_processor_kwargs"] == {"do_resize": False, "do_sample_frames": False}
    with pytest.raises(ValueError, match="1 video"):
        to_vllm_prompt(as_rollout_prompt({**item, "prompt_token_ids": [5, 6]}), 0, pixel_multiple=28,
                       mm_processor_kwargs={}, video_token_id=724)
