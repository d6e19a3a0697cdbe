"""Rank, world size, barrier and object collectives that also work without a process group.

Conversion and checkpointing run both inside torchrun jobs and in one plain process; these
helpers act on the default group when one is initialised and are no-ops (rank 0 of 1) otherwise.
"""
from __future__ import annotations

from typing import Any, Optional

import torch


def collective_device() -> torch.device:
    """Where a small tensor for an all-reduce must live: NCCL reduces CUDA tensors only ("No backend
    type associated with device type cpu"), gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _group_or_none() -> Optional[Any]:
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def global_rank() -> int:
    d = _group_or_none()
    return d.get_rank() if d else 0


def world_size() -> int:
    d = _group_or_none()
    return d.get_world_size() if d else 1


def barrier() -> None:
    d = _group_or_none()
    if d:
        d.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` of rank ``src`` on every rank (picklable objects)."""
    d = _group_or_none()
    if not d or d.get_world_size() == 1:
        return value
    box = [value]
    d.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(value: Any) -> list:
    """Every rank's ``value``, in rank order (picklable objects)."""
    d = _group_or_none()
    if not d or d.get_world_size() == 1:
        return [value]
    out: list = [None] * d.get_world_size()
    d.all_gather_object(out, value)
    return out
