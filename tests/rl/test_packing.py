"""Packed micro-batches and token-budget micro-batches.

The pure parts run here; packed == padded through the Megatron actor (log-probs, loss, KL,
entropy, grad norm at TP=1 [DP 2], TP=2 and PP=2) and the equal micro-batch counts over DP ranks
run in tests/rl/packing_worker.py under torchrun (its docstring states and justifies the
tolerances: fp32, 1e-5).
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from megavrl.rl.batch import TrainSequence, collate, padded_length
from megavrl.rl.micro_batches import (MicroBatching, micro_batch_metrics, rank_micro_batches, split_to_count,
                                      token_budget_bins)
from megavrl.rl.packing import pack, unpack
from tests.parallel.torchrun import run_torchrun


def _sequences():
    a = TrainSequence(input_ids=[10, 11, 12, 20, 21], prompt_len=3, advantage=0.5, rollout_logprobs=[-1.0, -2.0],
                      vision={"pixel_values_videos": torch.ones(4, 3), "video_grid_thw": torch.tensor([[1, 2, 2]]),
                              "second_per_grid_ts": torch.tensor([1.0])},
                      prompt_position_ids=torch.tensor([[0, 1, 1], [0, 1, 2], [0, 2, 1]]), rope_delta=-1)
    b = TrainSequence(input_ids=[10, 13, 22], prompt_len=2, advantage=-1.0, rollout_logprobs=[-3.0])
    return [a, b]


def test_pack_lays_sequences_end_to_end_with_their_own_positions():
    seqs = _sequences()
    packed = pack(seqs, pad_id=0, length=11)
    padded = collate(seqs, pad_id=0, seq_len=5)  # [b, L]: L = the longest sequence
    assert packed["input_ids"].tolist() == [[10, 11, 12, 20, 21, 10, 13, 22, 0, 0, 0]]
    # labels: the next token inside the same sequence; a sequence's last token has none (pad)
    assert packed["labels"].tolist() == [[11, 12, 20, 21, 0, 13, 22, 0, 0, 0, 0]]
    assert packed["packed_seq_params"].qkv_format == "thd"
    assert packed["packed_seq_params"].cu_seqlens_q.tolist() == [0, 5, 8, 11]  # the tail is a segment of its own
    assert packed["packed_seq_params"].cu_seqlens_q.dtype == torch.int32
    assert packed["position_ids"][:, 0, :5].tolist() == seqs[0].position_ids(5).tolist()
    assert packed["position_ids"][:, 0, 5:8].tolist() == [[0, 1, 2]] * 3  # starts over
    assert packed["vision_token_mask"].tolist() == [[True] * 3 + [False] * 2 + [True] * 2 + [False] * 4]
    assert "attention_mask" not in packed
    for key in ("loss_mask", "advantages", "rollout_logprobs", "pixel_values_videos", "video_grid_thw"):
        assert torch.equal(packed[key], padded[key]), key
    # unpack puts per-token values of the row back at [sequence, position]
    row = packed["labels"].float()
    assert torch.equal(unpack(row, packed["unpack_index"]) * padded["loss_mask"], padded["labels"].float()
                       * padded["loss_mask"])
    with pytest.raises(ValueError, match="shorter than the 8 tokens"):
        pack(seqs, pad_id=0, length=7)


def _check_bins(bins, lengths, budget):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))  # nothing dropped, nothing twice
    for b in bins:
        assert b == sorted(b)
        assert len(b) <= 1 or sum(lengths[i] for i in b) <= budget


@pytest.mark.parametrize("seed", range(20))
def test_token_budget_bins_respect_the_budget_and_drop_nothing(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(16, 512), rng.randint(300, 900)]) for _ in range(rng.randint(1, 40))]
    budget = rng.choice([512, 1024, 2048])
    bins = token_budget_bins(lengths, budget)
    _check_bins(bins, lengths, budget)
    # as few bins as first-fit decreasing needs, at least the volume bound
    assert len(bins) >= -(-sum(min(n, budget) for n in lengths) // budget)
    for extra in (0, 1, 5, 60):
        more = split_to_count(bins, lengths, len(bins) + extra)
        assert len(more) == len(bins) + extra
        _check_bins([b for b in more if b], lengths, budget)


def test_balanced_first_fit_evens_the_loads_and_isolates_long_sequences():
    lengths = [60, 30, 30, 30, 30, 20]
    bins = token_budget_bins(lengths, 100)
    # first-fit decreasing alone: 90 + 90 + 20; rebalanced over the same 3 micro-batches: 80 + 60 + 60
    assert sorted(sum(lengths[i] for i in b) for b in bins) == [60, 60, 80]
    assert token_budget_bins([500, 5, 5], 100) == [[0], [1, 2]]
    assert split_to_count([[0]], [500], 3) == [[0], [], []]
    with pytest.raises(ValueError, match="budget=0"):
        token_budget_bins([1], 0)


def _mini(lengths):
    return [TrainSequence(input_ids=torch.arange(n) + 1, prompt_len=n // 2, advantage=1.0, info={"index": i})
            for i, n in enumerate(lengths)]


@pytest.mark.parametrize("how", [MicroBatching(micro_batch_size=2, packing=False),
                                 MicroBatching(micro_batch_size=2, packing=True),
                                 MicroBatching(max_tokens_per_micro_batch=64, packing=True),
                                 MicroBatching(max_tokens_per_micro_batch=64, packing=True, same_shape=True),
                                 MicroBatching(max_tokens_per_micro_batch=64, packing=False)],
                         ids=["padded", "packed", "packed-budget", "packed-budget-same-shape", "padded-budget"])
def test_a_ranks_micro_batches_keep_every_sequence_and_its_loss_tokens(how):
    lengths = [40, 9, 30, 100, 12, 25, 6]
    mini = _mini(lengths)
    seq_len = padded_length(mini)
    dp = 3
    counts, seen = set(), []
    for rank in range(dp):
        cut = rank_micro_batches(mini, rank, dp, how, pad_id=0, seq_len=seq_len)
        if how.max_tokens_per_micro_batch is None or not how.packing:
            counts.add(len(cut.batches))  # by count: equal by construction (by budget: the DP all-reduce, torchrun test)
        real = [[s for s in g if not s.info.get("padding")] for g in cut.groups]
        seen += [s.info["index"] for g in real for s in g]
        for batch, group in zip(cut.batches, real):
            assert batch["loss_mask"].sum() == sum(s.response_len for s in group)  # place holders carry no loss
            assert [s.info["index"] for s in group] == sorted(s.info["index"] for s in group)
            if how.packing and how.max_tokens_per_micro_batch and len(group) > 1:
                assert batch["input_ids"].shape[1] <= 64 or how.same_shape
            if not how.packing:
                assert batch["input_ids"].shape[1] == seq_len
        if how.same_shape:
            assert len({b["input_ids"].shape for b in cut.batches}) == 1
        metrics = micro_batch_metrics([cut])
        assert metrics["micro_batches/oversize_sequences"] == (1 if how.max_tokens_per_micro_batch else 0)
        assert 0.0 <= metrics["micro_batches/padding_fraction"] < 1.0
    assert sorted(seen) == list(range(len(lengths)))
    assert len(counts) <= 1


def test_packing_computes_fewer_tokens_than_padding():
    mini = _mini([200, 10, 12, 15, 9, 180, 11, 14])
    seq_len = padded_length(mini)
    padded = rank_micro_batches(mini, 0, 1, MicroBatching(micro_batch_size=4, packing=False), 0, seq_len)
    packed = rank_micro_batches(mini, 0, 1, MicroBatching(max_tokens_per_micro_batch=256, packing=True), 0, seq_len)
    assert padded.computed_tokens == 8 * seq_len and packed.computed_tokens == sum(len(s) for s in mini)
    assert micro_batch_metrics([packed])["micro_batches/padding_fraction"] == 0.0
    assert micro_batch_metrics([padded])["micro_batches/padding_fraction"] > 0.6


@pytest.mark.parametrize("value", ["0", "-5", "2.5"])
def test_invalid_token_budget_is_refused_naming_the_field(value):
    from megavrl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="trainer.max_tokens_per_micro_batch"):
        load_config([], [f"trainer.max_tokens_per_micro_batch={value}"])
    cfg = load_config([], ["trainer.max_tokens_per_micro_batch=4096", "trainer.packing=false"])
    assert cfg.trainer.max_tokens_per_micro_batch == 4096 and cfg.trainer.packing is False


@pytest.mark.slow
@pytest.mark.distributed
def test_packed_equals_padded_through_the_actor_at_tp_pp_and_dp(tiny_hf_dir):
    proc = run_torchrun(["tests/rl/packing_worker.py", str(tiny_hf_dir)], nproc=2, timeout=600)
    assert proc.stdout.count("BUDGET rank=") == 2, proc.stdout
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        lines = [line for line in proc.stdout.splitlines() if line.startswith(f"PARITY tp={tp} pp={pp} ")]
        assert len(lines) == 2, proc.stdout
        report = json.loads(lines[0].split(" ", 4)[4])
        assert report["computed_tokens"]["packed_budget"] < report["computed_tokens"]["padded"]
