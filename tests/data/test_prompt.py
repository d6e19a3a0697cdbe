"""Prompt building against the Qwen2.5-VL processor, M-RoPE ids, and the vLLM input format."""
from __future__ import annotations

import pytest
import torch

from megavrl.data.prompt import PromptBuilder, PromptConfig, PromptTooLongError
from megavrl.rollout.inputs import vllm_prompt as vllm_inputs
from megavrl.data.schema import Sample
from megavrl.data.video import VideoSampler

GQA = Sample(id="g1", video="v.mp4", task="gqa", question="Which shape moved left?",
             options=["circle", "square", "triangle", "diamond"], answer="C", timestamps=[0.5, 1.5])
TVG = Sample(id="t1", video="v.mp4", task="tvg", question="the red circle is on screen", timestamps=[0.5, 2.0])
MCQ = Sample(id="m1", video="v.mp4", task="mcq", question="Which colour was the shape that moved up?",
             options=["red", "green", "blue", "yellow"], answer="A")


@pytest.fixture(scope="module")
def processor(tiny_hf_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_hf_dir))


@pytest.fixture(scope="module")
def video(videos):
    # small frames (below the processor's own min_pixels) so that pinning the size matters
    return VideoSampler(min_pixels=8 * 784, max_pixels=24 * 784)(videos["ntsc_322x182"])


def _hf(processor, text, frames, metadata, **kwargs):
    return processor(text=[text], videos=[frames], video_metadata=[metadata], return_tensors="pt",
                     cap_pixels_per_frame=False, **kwargs)


@pytest.mark.parametrize("sample", [TVG, MCQ, GQA], ids=["tvg", "mcq", "gqa"])
def test_prepared_prompt_equals_the_hf_processor(tiny_hf_dir, processor, video, sample):
    builder = PromptBuilder.from_hf_dir(str(tiny_hf_dir))
    prepared = builder.build(sample, video)
    assert prepared.prompt.count("<|video_pad|>") == 1
    assert "<think>" in prepared.prompt and prepared.prompt.endswith("<|im_start|>assistant\n")
    h, w = video.frames.shape[-2:]
    ref = _hf(processor, prepared.prompt, video.frames, video.hf_metadata(), do_resize=False)
    assert torch.equal(ref["input_ids"][0], prepared.input_ids)
    assert torch.equal(ref["video_grid_thw"], prepared.video_grid_thw)
    torch.testing.assert_close(ref["pixel_values_videos"], prepared.pixel_values_videos, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref["second_per_grid_ts"].float(), prepared.second_per_grid_ts)
    assert prepared.num_video_tokens == int((prepared.input_ids == builder.video_token_id).sum())
    assert prepared.num_video_tokens == video.frames.shape[0] // 2 * (h // 28) * (w // 28)
    assert prepared.sample.duration == pytest.approx(video.duration)  # filled in from the video


def test_vllm_inputs_give_the_same_tokens_and_pixels(tiny_hf_dir, processor, video):
    """What vLLM's Qwen2.5-VL processor computes from vllm_inputs() equals the trainer's side."""
    builder = PromptBuilder.from_hf_dir(str(tiny_hf_dir))
    prepared = builder.build(GQA, video)
    inputs = vllm_inputs(prepared)
    assert inputs["prompt_token_ids"].count(builder.video_token_id) == 1
    (frames, metadata), = inputs["multi_modal_data"]["video"]
    metadata = {k: v for k, v in metadata.items() if k != "do_sample_frames"}  # vLLM strips it before the processor
    assert frames.dtype.name == "uint8" and frames.shape == (video.frames.shape[0], *video.frames.shape[2:], 3)
    assert torch.equal(torch.from_numpy(frames).permute(0, 3, 1, 2), video.frames)
    # vLLM hands the HF processor the text, the frames with their metadata and mm_processor_kwargs;
    # the frames are below the processor's min_pixels, so only the pinned size keeps them as they are.
    text_inputs = vllm_inputs(prepared, use_token_ids=False)
    ref = _hf(processor, text_inputs["prompt"], frames, metadata, **inputs["mm_processor_kwargs"])
    assert torch.equal(ref["input_ids"][0], prepared.input_ids)
    torch.testing.assert_close(ref["pixel_values_videos"], prepared.pixel_values_videos, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref["second_per_grid_ts"].float(), prepared.second_per_grid_ts)
    unpinned = _hf(processor, text_inputs["prompt"], frames, metadata, do_sample_frames=False)
    assert unpinned["pixel_values_videos"].shape != prepared.pixel_values_videos.shape
    assert processor.tokenizer(text_inputs["prompt"])["input_ids"] == inputs["prompt_token_ids"]


@pytest.mark.parametrize("convention", ["transformers", "qwen"])
def test_position_ids(tiny_hf_dir, processor, video, convention):
    from transformers import AutoConfig, Qwen2_5_VLModel

    builder = PromptBuilder.from_hf_dir(str(tiny_hf_dir), PromptConfig(rope_convention=convention))
    prepared = builder.build(TVG, video)
    assert prepared.position_ids.shape == (3, prepared.num_tokens)
    pos = prepared.position_ids
    if convention == "transformers":
        model = Qwen2_5_VLModel(AutoConfig.from_pretrained(str(tiny_hf_dir)))
        ref = _hf(processor, prepared.prompt, video.frames, video.hf_metadata(), do_resize=False)
        ref_pos, ref_delta = model.get_rope_index(ref["input_ids"], ref["mm_token_type_ids"],
                                                  video_grid_thw=ref["video_grid_thw"],
                                                  second_per_grid_ts=ref["second_per_grid_ts"],
                                                  attention_mask=ref["attention_mask"])
        assert torch.equal(ref_pos[:, 0], pos)
        assert int(ref_delta[0, 0]) == prepared.rope_delta
    else:  # Qwen's own rule: text after the video resumes at the video's largest id + 1
        video_mask = prepared.input_ids == builder.video_token_id
        last_video = int(video_mask.nonzero().max())
        assert int(pos[:, last_video + 1].unique()) == int(pos[:, video_mask].max()) + 1
    assert prepared.rope_delta == int(pos.max()) + 1 - prepared.num_tokens


def test_prompt_too_long_is_a_clear_error(tiny_hf_dir, video):
    builder = PromptBuilder.from_hf_dir(str(tiny_hf_dir), PromptConfig(max_prompt_len=64))
    with pytest.raises(PromptTooLongError, match="max_prompt_len=64") as exc:
        builder.build(TVG, video)
    assert "video tokens" in str(exc.value) and exc.value.kind == "prompt_too_long"


def test_templates_come_from_config(tiny_hf_dir, video):
    config = PromptConfig(system_prompt="Think in <think></think>, answer in <answer></answer>.",
                          templates={"mcq": "Q: {question} [{num_options} options]\n{options}"})
    prepared = PromptBuilder.from_hf_dir(str(tiny_hf_dir), config).build(MCQ, video)
    assert "Q: Which colour was the shape that moved up? [4 options]\n(A) red\n(B) green" in prepared.prompt
    assert prepared.prompt.startswith("<|im_start|>system\nThink in <think></think>")
    assert "tvg" in config.templates  # tasks not overridden keep the default template
