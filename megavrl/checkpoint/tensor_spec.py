"""A tensor described without its data: name, global shape, dtype and size in bytes."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorSpec:
    """What a checkpoint reader reports of a stored tensor, and what a streaming writer plans
    its files with before any tensor exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize
