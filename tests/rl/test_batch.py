import pytest
import torch

from megavrl.rl.batch import TrainSequence, collate, padded_length, response_from_label_positions, split_micro_batches


def test_collate_aligns_response_to_label_positions():
    a = TrainSequence(input_ids=[10, 11, 12, 20, 21], prompt_len=3, advantage=0.5, rollout_logprobs=[-1.0, -2.0],
                      vision={"pixel_values_videos": torch.ones(4, 3), "video_grid_thw": torch.tensor([[1, 2, 2]]),
                              "second_per_grid_ts": torch.tensor([1.0])})
    b = TrainSequence(input_ids=[10, 13, 22], prompt_len=2, advantage=-1.0, rollout_logprobs=[-3.0],
                      vision={"pixel_values_videos": 2 * torch.ones(8, 3), "video_grid_thw": torch.tensor([[2, 2, 2]]),
                              "second_per_grid_ts": torch.tensor([0.5])})
    batch = collate([a, b], pad_id=0, seq_len=8)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 0, 0, 0], [10, 13, 22, 0, 0, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]
    assert batch["labels"][0, :4].tolist() == [11, 12, 20, 21]
    # response tokens 20, 21 of a are predicted at positions 2 and 3; token 22 of b at position 1
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0, 0, 0]]
    assert batch["labels"][batch["loss_mask"].bool()].tolist() == [20, 21, 22]
    assert batch["advantages"][0, 2:4].tolist() == [0.5, 0.5] and batch["advantages"][1, 1] == -1.0
    assert batch["advantages"].sum() == 0.0  # 0.5 + 0.5 - 1.0
    assert batch["rollout_logprobs"][batch["loss_mask"].bool()].tolist() == [-1.0, -2.0, -3.0]
    assert batch["pixel_values_videos"].shape == (12, 3) and batch["video_grid_thw"].tolist() == [[1, 2, 2], [2, 2, 2]]
    assert batch["second_per_grid_ts"].tolist() == [1.0, 0.5]
    back = response_from_label_positions(batch["rollout_logprobs"], [a, b])
    assert [t.tolist() for t in back] == [[-1.0, -2.0], [-3.0]]


def test_refusals_and_helpers():
    with pytest.raises(ValueError, match="at least one response token"):
        TrainSequence(input_ids=[1, 2], prompt_len=2)
    with pytest.raises(ValueError, match="2 rollout log-probs for 1 response tokens"):
        TrainSequence(input_ids=[1, 2], prompt_len=1, rollout_logprobs=[0.0, 0.0])
    s = TrainSequence(input_ids=list(range(9)), prompt_len=4)
    assert padded_length([s]) == 16
    with pytest.raises(ValueError, match="more than seq_len=8"):
        collate([s], pad_id=0, seq_len=8)
    assert "rollout_logprobs" not in collate([s], pad_id=0)
    assert [len(c) for c in split_micro_batches(list(range(5)), 2)] == [2, 2, 1]


def test_response_tokens_are_text_positions_and_not_vision_slots():
    # A prompt of 4 tokens whose M-RoPE ids end at 2 (a video compressed the positions): the
    # response continues at i + rope_delta on all axes, like the rollout engine, even when the
    # model sampled a placeholder id (9) in its response.
    prompt_pos = torch.tensor([[0, 1, 1, 2], [0, 1, 2, 2], [0, 1, 1, 2]])
    s = TrainSequence(input_ids=[1, 9, 9, 2, 9, 3], prompt_len=4, prompt_position_ids=prompt_pos, rope_delta=-1)
    batch = collate([s], pad_id=0, seq_len=8)
    assert batch["position_ids"].shape == (3, 1, 8)
    assert batch["position_ids"][:, 0, :4].tolist() == prompt_pos.tolist()
    assert batch["position_ids"][0, 0, 4:].tolist() == [3, 4, 5, 6]  # i + rope_delta
    assert batch["vision_token_mask"][0].tolist() == [True] * 4 + [False] * 4
