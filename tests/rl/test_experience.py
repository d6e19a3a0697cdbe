"""The reward's view of a dataset row during training (rl.experience)."""
import pytest

from megavrl.data.schema import Sample
from megavrl.rewards import RewardConfig, score
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
