"""This data-parallel rank's micro-batches of a mini-batch: which sequences go together, padded or packed.

Two ways to cut a rank's sequences into micro-batches:

- by count (``trainer.micro_batch_size`` sequences each), the default;
- by a token budget (``trainer.max_tokens_per_micro_batch``): each micro-batch computes at most
  that many tokens. Packed, a micro-batch costs the sum of its sequences' lengths, and the
  sequences are binned by a balanced first-fit (:func:`token_budget_bins`); padded, every sequence
  costs the step's padded length, so the budget fixes the number of sequences per micro-batch.
  A sequence longer than the budget gets a micro-batch of its own (warned, and counted in the
  ``micro_batches/oversize_sequences`` metric).

Every DP rank runs the same number of micro-batches: Megatron's schedule and the gradient
all-reduce after it expect it. The ranks agree on the largest count (an all-reduce MAX over the DP
group: with several rollout engines, the replicas of different engines cut different mini-batches) and the others split their fullest
micro-batches until they have as many (:func:`split_to_count`), or add an empty one. Empty places
are filled by a two-token padding sequence that carries no loss. How the sequences are cut never
changes the loss: its normalisers are those of the whole mini-batch (see megavrl.rl.actor).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megavrl.log import get_logger
from megavrl.parallel.collectives import collective_device
from megavrl.rl.batch import TrainSequence, collate, split_micro_batches
from megavrl.rl.packing import computed_tokens, pack

log = get_logger(__name__)


@dataclass(frozen=True)
class MicroBatching:
    """How a rank cuts its sequences (the ``trainer`` keys of the same names).

    same_shape: every micro-batch of a call gets one shape (pipeline parallelism exchanges
        activations of a fixed shape): packed rows are padded to the longest row.
    """

    micro_batch_size: int = 1
    max_tokens_per_micro_batch: int | None = None
    packing: bool = True
    same_shape: bool = False


@dataclass
class RankMicroBatches:
    batches: list[dict]
    """Collated (padded) or packed micro-batches, ready for MegatronActor.logprobs / train_step."""
    groups: list[list[TrainSequence]]
    """The sequences of each micro-batch, in the order of its rows (place holders included)."""
    real_tokens: int
    """Tokens of this rank's sequences."""
    computed_tokens: int
    """Tokens the model computes for them: real ones, padding and place holders."""
    oversize_sequences: int
    """Sequences of the mini-batch (all ranks) longer than the token budget."""


def micro_batch_metrics(cuts: list[RankMicroBatches]) -> dict:
    """Metrics of a step's micro-batches (this rank's): how many, the share of computed tokens that
    are padding, and the sequences over the token budget."""
    computed = sum(c.computed_tokens for c in cuts)
    return {"micro_batches/count": sum(len(c.batches) for c in cuts),
            "micro_batches/padding_fraction": 1.0 - sum(c.real_tokens for c in cuts) / computed if computed else 0.0,
            "micro_batches/oversize_sequences": sum(c.oversize_sequences for c in cuts)}


# --------------------------------------------------------------------------------- binning (pure)


def token_budget_bins(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped so that every group's total is <= ``budget`` (a longer item
    alone): first-fit decreasing, then rebalanced across the same number of groups (longest first
    into the least-filled group) when that respects the budget. Groups hold ascending indices and
    come in the order of their first index."""
    if budget < 1:
        raise ValueError(f"budget={budget} must be >= 1 token")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return _canonical(_rebalanced(bins, lengths, budget))


def split_to_count(bins: list[list[int]], lengths: list[int], count: int) -> list[list[int]]:
    """``count`` groups from ``bins``: the group of most tokens that has two or more items is split in
    two balanced halves, again and again; when none can be split, empty groups are added. Splitting
    never exceeds a budget the groups respected, and drops nothing."""
    if count < len(bins):
        raise ValueError(f"cannot make {len(bins)} groups into {count}")
    bins = [list(b) for b in bins]
    while len(bins) < count:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            bins += [[] for _ in range(count - len(bins))]
            break
        fullest = max(splittable, key=lambda b: sum(lengths[i] for i in b))
        bins.remove(fullest)
        halves = _longest_first(fullest, lengths, 2)
        bins += halves
    return _canonical(bins)


def _longest_first(items: list[int], lengths: list[int], count: int) -> list[list[int]]:
    """``items`` over ``count`` groups, longest first into the group of fewest tokens."""
    groups: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for i in sorted(items, key=lambda i: (-lengths[i], i)):
        g = min(range(count), key=lambda g: (loads[g], g))
        groups[g].append(i)
        loads[g] += lengths[i]
    return groups


def _rebalanced(bins: list[list[int]], lengths: list[int], budget: int) -> list[list[int]]:
    """First-fit fills the first bins to the brim and leaves the last nearly empty; the same number
    of bins filled longest-first is as few micro-batches with similar loads (an even pipeline),
    kept only where every bin still fits the budget (or holds one over-long item)."""
    balanced = _longest_first([i for b in bins for i in b], lengths, len(bins))
    if all(len(b) == 1 or sum(lengths[i] for i in b) <= budget for b in balanced):
        return balanced
    return bins


def _canonical(bins: list[list[int]]) -> list[list[int]]:
    full = sorted((sorted(b) for b in bins if b), key=lambda b: b[0])
    return full + [[] for b in bins if not b]


# --------------------------------------------------------------------------------- a rank's micro-batches


def rank_micro_batches(mini: list[TrainSequence], dp_rank: int, dp: int, how: MicroBatching, pad_id: int,
                       seq_len: int) -> RankMicroBatches:
    """This rank's micro-batches of the mini-batch ``mini`` (the same list on every DP rank).

    Sequences are dealt round-robin over the DP ranks, then cut as ``how`` says. seq_len: the
    padded width (the step's longest sequence, rounded up) of padded micro-batches.
    Collective over the DP group when cutting by a token budget (every DP rank must call it).
    """
    mine = mini[dp_rank::dp]
    budget = how.max_tokens_per_micro_batch
    oversize = [len(s) for s in mini if budget is not None and len(s) > budget]
    if oversize:
        log.warning("%d sequences longer than trainer.max_tokens_per_micro_batch=%d (longest %d tokens) run in "
                    "micro-batches of their own; raise the budget to %d to keep them within it",
                    len(oversize), budget, max(oversize), max(oversize))
    if budget is not None and how.packing:
        lengths = [len(s) for s in mine]
        bins = token_budget_bins(lengths, budget) if mine else []
        count = max(1, agree_on_count(len(bins)))
        groups = [[mine[i] for i in b] for b in split_to_count(bins, lengths, count)]
    else:
        # By count; padded, a budget buys budget // seq_len sequences per micro-batch.
        size = how.micro_batch_size if budget is None else max(1, budget // seq_len)
        # Ranks that cut different mini-batches (the replicas of different rollout engines) agree on the count.
        count = max(1, agree_on_count(math.ceil(math.ceil(len(mini) / dp) / size)))
        if how.packing:  # rows of any length: no filler sequences inside a micro-batch
            groups = split_micro_batches(mine, size)
            groups += [[] for _ in range(count - len(groups))]
        else:  # fixed [size, seq_len] micro-batches
            groups = split_micro_batches(mine + [None] * (count * size - len(mine)), size)
    groups = [[s if s is not None else padding_sequence(pad_id) for s in g] or [padding_sequence(pad_id)]
              for g in groups]
    batches = _collate(groups, pad_id, how, seq_len)
    return RankMicroBatches(batches, groups, real_tokens=sum(len(s) for s in mine),
                            computed_tokens=sum(computed_tokens(b) for b in batches), oversize_sequences=len(oversize))


def padding_sequence(pad_id: int) -> TrainSequence:
    """A place holder that carries no loss (its loss mask is zeroed after collation)."""
    return TrainSequence(input_ids=[pad_id, pad_id], prompt_len=1, info={"padding": True})


def _collate(groups: list[list[TrainSequence]], pad_id: int, how: MicroBatching, seq_len: int) -> list[dict]:
    if how.packing:
        length = max(sum(len(s) for s in g) for g in groups) if how.same_shape else None
        batches = [pack(g, pad_id, length) for g in groups]
    else:
        batches = [collate(g, pad_id, seq_len) for g in groups]
    for batch, group in zip(batches, groups):
        for i, s in enumerate(group):
            if s.info.get("padding"):
                batch["loss_mask"][i] = 0.0
    return batches


def agree_on_count(count: int) -> int:
    """The largest ``count`` over the data-parallel group (an all-reduce MAX; ``count`` alone
    without torch.distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count
    from megatron.core import parallel_state as ps

    group = ps.get_data_parallel_group()
    if torch.distributed.get_world_size(group) == 1:
        return count
    device = collective_device()
    t = torch.tensor([count], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    return int(t.item())
