"""Training sequences and their collation into Megatron micro-batches (cut per rank by megavrl.rl.micro_batches).

A :class:`TrainSequence` is one prompt + response exactly as the rollout engine ran it (video
placeholder tokens already expanded), the prompt's pixels, and the per-sequence RL quantities.
:func:`collate` pads a list of them into the tensors the actor's forward step consumes.

Alignment: the logits at position ``t`` predict token ``t + 1``, so every per-token quantity
(log-probs, masks, advantages) lives at *label* positions: ``labels[:, t] = input_ids[:, t + 1]``
and the i-th response token of a sequence whose prompt has ``P`` tokens sits at ``t = P - 1 + i``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclass
class TrainSequence:
    """One sequence to score or train on.

    input_ids: prompt + response token ids, [L].
    prompt_len: number of prompt tokens P (the response is input_ids[P:]).
    vision: the prompt's model inputs among VISION_KEYS (pixels [patches, C*T*P*P], grids [n, 3],
        seconds per temporal patch [n]); empty for text-only prompts.
    advantage: the sequence's advantage (GRPO), 0 for SFT.
    rollout_logprobs: the sampling engine's log-probs of the response tokens, [L - P], or None.
    prompt_position_ids: [3, P] M-RoPE ids of the prompt, or None for text positions 0..P-1.
    rope_delta: response token i (0-based over the whole sequence) sits at position i + rope_delta
        on all three M-RoPE axes, as in the rollout engine: generated tokens are text, whatever
        their ids.
    group: index of the prompt group the sequence belongs to (for metrics).
    info: anything the trainer wants to carry along (task, reward, id), not collated.
    """

    input_ids: torch.Tensor
    prompt_len: int
    vision: dict = field(default_factory=dict)
    advantage: float = 0.0
    rollout_logprobs: torch.Tensor | None = None
    prompt_position_ids: torch.Tensor | None = None
    rope_delta: int = 0
    group: int = 0
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_ids = torch.as_tensor(self.input_ids, dtype=torch.long)
        if not 0 < self.prompt_len < len(self.input_ids):
            raise ValueError(f"prompt_len={self.prompt_len} must leave at least one response token in a "
                             f"sequence of {len(self.input_ids)} tokens")
        if self.rollout_logprobs is not None:
            self.rollout_logprobs = torch.as_tensor(self.rollout_logprobs, dtype=torch.float32)
            if len(self.rollout_logprobs) != self.response_len:
                raise ValueError(f"{len(self.rollout_logprobs)} rollout log-probs for {self.response_len} "
                                 f"response tokens")

    def position_ids(self, length: int) -> torch.Tensor:
        """[3, length] M-RoPE ids: the prompt's, then i + rope_delta (padding continues the count)."""
        positions = torch.arange(length, dtype=torch.long).expand(3, length).clone()
        positions[:, self.prompt_len:] += self.rope_delta
        if self.prompt_position_ids is not None:
            positions[:, :self.prompt_len] = torch.as_tensor(self.prompt_position_ids, dtype=torch.long)
        return positions

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len

    def __len__(self) -> int:
        return len(self.input_ids)


def padded_length(sequences: list[TrainSequence], multiple: int = 8) -> int:
    """The common length every micro-batch of a step is padded to (fixed shapes for the pipeline)."""
    longest = max(len(s) for s in sequences)
    return (longest + multiple - 1) // multiple * multiple


def collate(sequences: list[TrainSequence], pad_id: int, seq_len: int | None = None) -> dict:
    """Right-pad ``sequences`` to ``seq_len`` and concatenate their pixels.

    Returns:
        input_ids [b, S] long; attention_mask [b, S] long (1 = real token);
        position_ids [3, b, S] long (see TrainSequence.position_ids);
        vision_token_mask [b, S] bool (True on the prompt, where placeholder ids are vision slots);
        labels [b, S] long (input_ids shifted left by one, pad after the end);
        loss_mask [b, S] float (1 at label positions that are response tokens);
        advantages [b, S] float (the sequence's advantage at its loss positions, 0 elsewhere);
        rollout_logprobs [b, S] float (at loss positions; absent when no sequence has them);
        and the vision keys, concatenated in sequence order (grids stacked).
    """
    if not sequences:
        raise ValueError("collate() needs at least one sequence")
    seq_len = seq_len or padded_length(sequences)
    b = len(sequences)
    input_ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((b, seq_len), dtype=torch.long)
    position_ids = torch.zeros((3, b, seq_len), dtype=torch.long)
    vision_token_mask = torch.zeros((b, seq_len), dtype=torch.bool)
    labels = torch.full((b, seq_len), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((b, seq_len), dtype=torch.float32)
    advantages = torch.zeros((b, seq_len), dtype=torch.float32)
    have_rollout = any(s.rollout_logprobs is not None for s in sequences)
    rollout = torch.zeros((b, seq_len), dtype=torch.float32) if have_rollout else None
    for i, s in enumerate(sequences):
        n = len(s)
        if n > seq_len:
            raise ValueError(f"sequence {i} has {n} tokens, more than seq_len={seq_len}")
        input_ids[i, :n] = s.input_ids
        attention_mask[i, :n] = 1
        position_ids[:, i] = s.position_ids(seq_len)
        vision_token_mask[i, :s.prompt_len] = True
        labels[i, :n - 1] = s.input_ids[1:]
        start, stop = s.prompt_len - 1, n - 1  # label positions of the response tokens
        loss_mask[i, start:stop] = 1.0
        advantages[i, start:stop] = s.advantage
        if rollout is not None and s.rollout_logprobs is not None:
            rollout[i, start:stop] = s.rollout_logprobs
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
             "vision_token_mask": vision_token_mask, "labels": labels,
             "loss_mask": loss_mask, "advantages": advantages}
    if rollout is not None:
        batch["rollout_logprobs"] = rollout
    for key in VISION_KEYS:
        parts = [s.vision[key] for s in sequences if s.vision.get(key) is not None]
        if parts:
            batch[key] = torch.cat([torch.as_tensor(p) for p in parts], dim=0)
    return batch


def split_micro_batches(sequences: list, micro_batch_size: int) -> list[list]:
    """Consecutive chunks of ``micro_batch_size`` (the last may be shorter)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
    return [sequences[i:i + micro_batch_size] for i in range(0, len(sequences), micro_batch_size)]


def response_from_label_positions(values: torch.Tensor, sequences: list[TrainSequence]) -> list[torch.Tensor]:
    """Undo the alignment: per sequence, the [response_len] values at its loss positions."""
    return [values[i, s.prompt_len - 1:len(s) - 1] for i, s in enumerate(sequences)]
