"""From rollouts to training sequences (rl.experience): the reward's view of a row, grpo_sequences."""
import pytest
import torch

from megavrl.data.schema import Sample
from megavrl.rewards import RewardConfig, RewardResult, score
from megavrl.rl.experience import ground_truth


def test_training_reward_sees_every_ground_truth_segment():
    # A NExT-GQA question grounded in two segments: the reader keeps the first in `timestamps` and
    # all of them in meta.spans; the reward scores the best-overlapping one ([12, 18] in [10, 20]).
    sample = Sample(id="q1", task="gqa", video="v.mp4", question="what and when?", options=["a dog", "a car"],
                    answer="B", timestamps=[0.0, 4.0], duration=30.0, meta={"spans": [[0.0, 4.0], [10.0, 20.0]]})
    truth = ground_truth(sample)
    assert truth["meta"]["spans"] == [[0.0, 4.0], [10.0, 20.0]]
    result = score("gqa", "<think>x</think><answer>B, from 12 to 18</answer>", truth, RewardConfig())
    assert result.components["iou"] == pytest.approx(0.6)


# ------------------------------------------------------------------ grpo_sequences


@pytest.fixture(scope="module")
def prepared_pair(tiny_hf_dir, tmp_path_factory):
    """Two prompts built by the data pipeline from a real decoded video (tvg and mcq)."""
    from megavrl.data.prompt import PromptBuilder
    from megavrl.data.video import VideoSampler
    from tests.rollout.helpers import write_test_video

    path = write_test_video(tmp_path_factory.mktemp("video") / "v.mp4")
    video = VideoSampler(min_pixels=8 * 784, max_pixels=24 * 784)(str(path))
    builder = PromptBuilder.from_hf_dir(str(tiny_hf_dir))
    tvg = Sample(id="t1", video="v.mp4", task="tvg", question="the square moves", timestamps=[0.5, 1.5])
    mcq = Sample(id="m1", video="v.mp4", task="mcq", question="Which colour?", options=["red", "green"], answer="B")
    return [builder.build(tvg, video), builder.build(mcq, video)]


def _group(index, prompt_ids, responses):
    from megavrl.rollout.inputs import RolloutPrompt
    from megavrl.rollout.outputs import RolloutGroup, RolloutSample

    samples = [RolloutSample(token_ids=list(t), logprobs=[-0.5 - 0.1 * i for i in range(len(t))],
                             finish_reason="length" if len(t) == 3 else "stop", text=f"r{index}{j}")
               for j, t in enumerate(responses)]
    return RolloutGroup(prompt_index=index, prompt=RolloutPrompt(prompt_token_ids=[0]),
                        prompt_token_ids=list(prompt_ids), samples=samples)


def test_grpo_sequences_pair_each_response_with_the_trainers_prompt(prepared_pair):
    from megavrl.rl.batch import collate
    from megavrl.rl.experience import grpo_sequences

    responses = [[[11, 12, 13], [21], []], [[31, 32], [41, 42, 43], [51]]]  # an empty response is skipped
    groups = [_group(i, p.input_ids.tolist(), r) for i, (p, r) in enumerate(zip(prepared_pair, responses))]
    advantages = torch.tensor([[1.0, -1.0, 0.0], [0.5, -0.25, -0.25]])
    rewards = [[RewardResult(total=float(i + j), components={}) for j in range(3)] for i in range(2)]
    build = grpo_sequences(groups, prepared_pair, advantages, rewards)
    assert build.mismatched_prompts == 0
    seqs = build.sequences
    assert [(s.group, s.info["id"], s.advantage, s.info["reward"]) for s in seqs] == [
        (0, "t1", 1.0, 0.0), (0, "t1", -1.0, 1.0), (1, "m1", 0.5, 1.0), (1, "m1", -0.25, 2.0), (1, "m1", -0.25, 3.0)]
    for s, tokens in zip(seqs, [[11, 12, 13], [21], [31, 32], [41, 42, 43], [51]]):
        prep = prepared_pair[s.group]
        assert s.prompt_len == prep.num_tokens and s.input_ids[s.prompt_len:].tolist() == tokens
        assert torch.equal(s.input_ids[:s.prompt_len], prep.input_ids)
        assert s.vision["pixel_values_videos"] is prep.pixel_values_videos
        assert torch.equal(s.prompt_position_ids, prep.position_ids) and s.rope_delta == prep.rope_delta
        assert s.info["finish_reason"] == ("length" if len(tokens) == 3 else "stop")
    # The sampled tokens and their vLLM log-probs land on the label positions the loss reads.
    batch = collate(seqs, pad_id=0)
    for i, s in enumerate(seqs):
        mask = batch["loss_mask"][i].bool()
        assert batch["labels"][i][mask].tolist() == s.input_ids[s.prompt_len:].tolist()
        assert torch.equal(batch["rollout_logprobs"][i][mask], s.rollout_logprobs)
        assert torch.all(batch["advantages"][i][mask] == s.advantage)


def test_grpo_sequences_drop_a_group_whose_prompt_tokens_differ(prepared_pair):
    from megavrl.rl.experience import grpo_sequences

    ids = prepared_pair[0].input_ids.tolist()
    groups = [_group(0, ids[:-1], [[1], [2]]), _group(1, prepared_pair[1].input_ids.tolist(), [[3], [4]])]
    build = grpo_sequences(groups, prepared_pair, torch.tensor([[1.0, -1.0], [1.0, -1.0]]))
    assert build.mismatched_prompts == 1
    assert [(s.group, s.info["id"], s.info["reward"]) for s in build.sequences] == [(1, "m1", None), (1, "m1", None)]


def test_grpo_sequences_need_m_rope_positions(prepared_pair):
    from dataclasses import replace

    from megavrl.rl.experience import grpo_sequences

    prep = replace(prepared_pair[0], position_ids=None)
    with pytest.raises(ValueError, match="compute_position_ids"):
        grpo_sequences([_group(0, prep.input_ids.tolist(), [[1]])], [prep], torch.tensor([[0.0]]))
