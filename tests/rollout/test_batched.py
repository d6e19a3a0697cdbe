"""rollout_batches: the batch loop of ``megavrl eval`` and ``megavrl select`` (no engine needed)."""
from types import SimpleNamespace

import pytest
import torch

from megavrl.rollout.batched import rollout_batches, sampling_seed


class RecordingEngine:
    def __init__(self):
        self.calls = []

    def generate(self, prompts, **kwargs):
        self.calls.append((len(prompts), kwargs))
        return [SimpleNamespace(meta=p.meta) for p in prompts]


def _prepared(i):
    sample = SimpleNamespace(id=f"row{i}")
    return SimpleNamespace(sample=sample, prompt_token_ids=[1, 2], prompt="p",
                           frames=torch.zeros(2, 3, 28, 28, dtype=torch.uint8),
                           video_metadata={"fps": 1.0, "total_num_frames": 2, "frames_indices": [0, 1]})


def _source(n, pulled):
    for i in range(n):
        pulled.append(i)
        yield _prepared(i)


@pytest.mark.parametrize("n,total,batch_size", [(10, 10, 4), (10, 7, 4), (10, 8, 4), (3, 3, 32), (5, 0, 2)])
def test_every_row_once_in_order_and_nothing_pulled_beyond_total(n, total, batch_size):
    engine, pulled = RecordingEngine(), []
    out = list(rollout_batches(engine, _source(n, pulled), total=total, desc="t", batch_size=batch_size, n=3))
    ids = [p.sample.id for batch, _ in out for p in batch]
    assert ids == [f"row{i}" for i in range(total)]
    assert len(pulled) == total  # no video is decoded that is not rolled out
    assert all(len(batch) <= batch_size and len(batch) == len(groups) for batch, groups in out)
    assert all(kwargs == {"n": 3} for _, kwargs in engine.calls)
    # the engine sees each batch's own row indices (meta) and the row ids
    assert [g.meta["id"] for _, groups in out for g in groups] == ids


def test_seeds_follow_the_rows_before_each_batch():
    engine = RecordingEngine()
    list(rollout_batches(engine, _source(9, []), total=9, desc="t", batch_size=4, seed=7, n=2))
    assert [kwargs["seed"] for _, kwargs in engine.calls] == [[sampling_seed(7, i) for i in range(4)],
                                                               [sampling_seed(7, i) for i in range(4, 8)],
                                                               [sampling_seed(7, 8)]]
    # one shard of two: its j-th row is row 2j + 1 of the data order, and samples as such
    shard = RecordingEngine()
    list(rollout_batches(shard, _source(3, []), total=3, desc="t", batch_size=4, seed=7, index_of=lambda j: 2 * j + 1))
    assert shard.calls[0][1]["seed"] == [sampling_seed(7, 1), sampling_seed(7, 3), sampling_seed(7, 5)]
    assert len({sampling_seed(s, i) for s in range(5) for i in range(1000)}) == 5000  # distinct per (seed, index)

