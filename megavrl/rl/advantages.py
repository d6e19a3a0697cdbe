"""Group-relative advantages: GRPO (z-score), Dr. GRPO (no std) and RLOO (leave-one-out)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from megavrl.rl.config import ADVANTAGE_MODES, STD_MODES

ZERO_VARIANCE_ATOL = 1e-9
"""A group whose rewards span at most this much (max - min) has zero variance: no learning signal."""


def group_advantages(rewards: Union[torch.Tensor, Sequence[float], Sequence[Sequence[float]]],
                     group_size: Optional[int] = None, mode: str = "grpo", eps: float = 1e-6,
                     std: str = "unbiased") -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of G responses per prompt relative to their own group.

    Args:
        rewards: [N, G] (row i = the G responses to prompt i), or flat [N*G] with contiguous
            groups (responses i*G .. i*G+G-1 belong to prompt i) and ``group_size=G``.
        group_size: G, required for flat input (checked against the width of [N, G] input).
        mode: with r the group's rewards, m = mean(r), s = std(r):
            "grpo":   A_i = (r_i - m) / (s + eps)
            "drgrpo": A_i = r_i - m                                  (Dr. GRPO: no std)
            "rloo":   A_i = r_i - mean_{j != i} r_j = G / (G - 1) * (r_i - m)
        eps: added to the std in "grpo".
        std: "unbiased" (divide by G - 1, as torch.std and verl) or "biased" (divide by G).
    Returns:
        (advantages, zero_variance): advantages in the shape of ``rewards`` (floating dtype of
        the input, float32 for integer input); zero_variance [N] bool, True for the groups whose
        rewards are all equal (max - min <= ZERO_VARIANCE_ATOL), which get exactly 0 advantage.
        A group of one response always has zero variance.
    Raises:
        ValueError: a bad mode/std, a shape that does not split into groups, non-finite rewards.
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"advantage mode {mode!r} is not one of {', '.join(map(repr, ADVANTAGE_MODES))}")
    if std not in STD_MODES:
        raise ValueError(f"std={std!r} is not one of {', '.join(map(repr, STD_MODES))}")
    values = torch.as_tensor(rewards)
    if not values.is_floating_point():
        values = values.to(torch.float32)
    shape = values.shape
    if values.dim() == 1:
        if group_size is None or group_size < 1 or values.numel() % group_size != 0:
            raise ValueError(f"flat rewards of length {values.numel()} need group_size, a positive divisor of it "
                             f"(got group_size={group_size!r})")
        groups = values.reshape(-1, group_size)
    elif values.dim() == 2:
        if group_size is not None and group_size != shape[1]:
            raise ValueError(f"rewards of shape {tuple(shape)} have groups of {shape[1]}, not group_size={group_size}")
        groups = values
    else:
        raise ValueError(f"rewards must be [N, G] or [N*G], got shape {tuple(shape)}")
    if not torch.isfinite(groups).all():
        bad = (~torch.isfinite(groups)).any(dim=-1).nonzero().flatten().tolist()
        raise ValueError(f"rewards of groups {bad[:10]} are not finite; check the reward function")
    n, g = groups.shape
    if n == 0 or g == 0:
        return values.clone(), torch.zeros(n, dtype=torch.bool)

    zero_variance = (groups.max(dim=-1).values - groups.min(dim=-1).values) <= ZERO_VARIANCE_ATOL
    centred = groups - groups.mean(dim=-1, keepdim=True)
    if mode == "grpo":
        if g > 1 or std == "biased":
            scale = groups.std(dim=-1, keepdim=True, correction=1 if std == "unbiased" else 0)
        else:
            scale = torch.zeros_like(centred)  # torch.std of one value with G-1 = 0 is NaN
        advantages = centred / (scale + eps)
    elif mode == "drgrpo":
        advantages = centred
    else:  # rloo
        advantages = centred * (g / (g - 1)) if g > 1 else torch.zeros_like(centred)
    advantages = torch.where(zero_variance[:, None], torch.zeros_like(advantages), advantages)
    return advantages.reshape(shape), zero_variance
