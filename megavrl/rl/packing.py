"""Packed micro-batches: the sequences of a micro-batch laid end to end in one row (``thd``).

Padded, a micro-batch of b sequences costs b x (longest length) tokens of compute; GRPO
responses run from a few tokens to ``max_new_tokens`` and video prompts vary with the video, so
most of it is padding. Packed, it is one row of T = sum of the lengths, and nothing is computed
twice or for nothing:

- attention stays inside each sequence: Megatron-Core's ``PackedSeqParams`` (``qkv_format="thd"``,
  ``cu_seqlens`` = the sequences' boundaries) reach the core attention, Transformer Engine's THD
  attention on a GPU, :class:`~megavrl.models.qwen2_5_vl.sdpa_attention.SDPACoreAttention`'s
  segments on the CPU;
- every sequence keeps its own M-RoPE ids (its prompt's 3-D ids, then its response's), laid end
  to end like the tokens. Megatron applies rotary embeddings per packed token when the
  frequencies cover all T positions (``rope_utils._apply_rotary_pos_emb_thd``'s exact mapping), so
  a sequence is rotated exactly as when alone -- not from position 0 per segment, the bug a
  1-D-position packing would have for Qwen2.5-VL's vision tokens;
- the pixels are concatenated in sequence order, as for padded batches, and the placeholder
  tokens appear in that order in the row, so the vision embeddings land where they belong.

Per-token RL quantities (loss mask, advantages, rollout / old / reference log-probs) stay in the
padded [b, L] layout of :func:`megavrl.rl.batch.collate` (L = this micro-batch's longest
sequence), so the policy loss and its per-sequence aggregation are the padded path's;
:func:`unpack` gathers the packed per-token log-probs and entropy [1, T] into that layout.
"""
from __future__ import annotations

import torch

from megavrl.rl.batch import TrainSequence, collate

# What collate() gives that a packed micro-batch replaces by its packed row; the rest (per-token
# RL quantities [b, L], pixels and grids) it keeps as they are.
_ROW_KEYS = ("input_ids", "attention_mask", "position_ids", "vision_token_mask", "labels")


def pack(sequences: list[TrainSequence], pad_id: int, length: int | None = None) -> dict:
    """One packed micro-batch of ``sequences`` (in their order).

    length: the row's length T; default the sum of the sequences' lengths. A longer row ends with
        a segment of padding (its own, so it attends to nothing real and nothing real attends to
        it), for pipeline stages that need one shape for every micro-batch.
    Returns:
        input_ids, labels [1, T] long (labels: the next token inside the same sequence, pad at a
        sequence's last token); position_ids [3, 1, T] long; vision_token_mask [1, T] bool;
        packed_seq_params (``thd``, cu_seqlens int32 [segments + 1]); unpack_index [b, L] long
        (the packed position of token t of sequence i; 0 past its end);
        loss_mask, advantages, rollout_logprobs [b, L] as :func:`collate` gives them; the vision keys.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    padded = collate(sequences, pad_id, seq_len=max(len(s) for s in sequences))
    real = padded["attention_mask"].bool()  # right padding: row-major order is sequence order
    lengths = [len(s) for s in sequences]
    total = sum(lengths)
    length = total if length is None else length
    if length < total:
        raise ValueError(f"length={length} is shorter than the {total} tokens of the {len(sequences)} sequences")
    tail = length - total
    input_ids = torch.full((1, length), pad_id, dtype=torch.long)
    labels = torch.full((1, length), pad_id, dtype=torch.long)
    vision_token_mask = torch.zeros((1, length), dtype=torch.bool)
    position_ids = torch.zeros((3, 1, length), dtype=torch.long)
    input_ids[0, :total] = padded["input_ids"][real]
    labels[0, :total] = padded["labels"][real]
    vision_token_mask[0, :total] = padded["vision_token_mask"][real]
    position_ids[:, 0, :total] = padded["position_ids"][:, real]
    position_ids[:, 0, total:] = torch.arange(tail)
    unpack_index = torch.zeros(real.shape, dtype=torch.long)
    unpack_index[real] = torch.arange(total)
    bounds = [0] + torch.tensor(lengths).cumsum(0).tolist() + ([length] if tail else [])
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32)
    longest = max(max(lengths), tail)
    batch = {"input_ids": input_ids, "position_ids": position_ids, "vision_token_mask": vision_token_mask,
             "labels": labels, "unpack_index": unpack_index,
             "packed_seq_params": PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens,
                                                  cu_seqlens_kv=cu_seqlens, max_seqlen_q=longest,
                                                  max_seqlen_kv=longest)}
    batch.update({key: value for key, value in padded.items() if key not in _ROW_KEYS})
    return batch


def is_packed(batch: dict) -> bool:
    return batch.get("packed_seq_params") is not None


def unpack(values: torch.Tensor, unpack_index: torch.Tensor) -> torch.Tensor:
    """Packed per-token values [1, T] (or [T]) -> the padded layout [b, L] of ``unpack_index``.
    Differentiable; positions past a sequence's end repeat token 0 and must stay masked."""
    return values.reshape(-1)[unpack_index]


def computed_tokens(batch: dict) -> int:
    """Tokens the model computes for this micro-batch: the packed row, or every padded row."""
    return int(batch["input_ids"].numel())
