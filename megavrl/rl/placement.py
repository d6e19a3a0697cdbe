"""Where the rollout engines live: one per data-parallel replica by default, each fed by its replica.

With world = TP x PP x DP processes there are DP model replicas (each one TP x PP ranks holding a
full copy of the model between them). ``rollout.engines`` E (``auto`` = DP, or a divisor of DP)
splits the replicas into E consecutive *engine groups* of k = DP / E replicas. In each group:

- the group's first replica's first rank (TP rank 0, PP rank 0) hosts the engine: it reads and
  decodes the group's share of the prompts (data shard g of E), samples, scores, and builds the
  training sequences;
- the engine takes its weights from that replica only (its TP gathers and PP broadcasts), so
  weights never leave the replica's ranks, and no rank holds more than its replica's full copy;
- the sequences (pixels included) are broadcast to the group's ranks only, and its k replicas
  share them as data-parallel ranks.

Prompt i of a step (0-based over the whole step, in the order of the data stream) is served by
engine ``i % E`` as that engine's ``i // E``-th prompt: with the data shard of engine g being rows
``g, g + E, g + 2E, ...`` of the global order, the prompts of a step and their order are the same
for every E. ``E = 1`` is one engine on global rank 0 for the whole job.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megavrl.parallel.collectives import all_gather_object, global_rank


def resolve_engine_count(setting: str | int, dp: int) -> int:
    """``rollout.engines`` as a number: ``auto`` is one engine per data-parallel replica."""
    from megavrl.config_base import ConfigError

    text = str(setting).strip().lower()
    if text == "auto":
        return dp
    try:
        engines = int(text)
    except ValueError:
        raise ConfigError(f"rollout.engines={setting!r} is neither 'auto' nor a number of engines") from None
    if engines < 1 or dp % engines:
        raise ConfigError(f"rollout.engines={engines} must divide the data-parallel size {dp} (world size / "
                          f"(parallel.tp * parallel.pp)): use one of {[d for d in range(1, dp + 1) if dp % d == 0]} "
                          f"or 'auto' ({dp})")
    return engines


@dataclass
class EnginePlacement:
    """This rank's view of the engines. Every field is the same on every rank except those that
    say "this rank"."""

    engines: int
    """E, the number of engines in the job."""
    replicas_per_engine: int
    """k = DP / E."""
    engine_index: int
    """The engine group this rank belongs to."""
    replica_in_group: int
    """This rank's data-parallel rank within its group (0 .. k - 1)."""
    host_ranks: list[int]
    """Global rank hosting each engine."""
    group_ranks: list[list[int]]
    """Global ranks of each engine group."""
    group: Any = field(default=None, repr=False)
    """This rank's group's process group (None when the group is the whole world)."""
    host_local_devices: list[int] = field(default_factory=list)
    """Local device indices (LOCAL_RANK) of this group's host's replica on the host's node, ordered by
    (PP rank, TP rank): the GPUs the engine's own tensor-parallel workers should use."""

    @property
    def host_rank(self) -> int:
        return self.host_ranks[self.engine_index]

    @property
    def hosts_engine(self) -> bool:
        """This rank starts an engine."""
        return global_rank() == self.host_rank

    @property
    def syncs_weights(self) -> bool:
        """This rank's replica feeds an engine (the first replica of each group)."""
        return self.replica_in_group == 0

    def broadcast_in_group(self, value: Any) -> Any:
        """The host's ``value`` on every rank of this rank's group (picklable objects)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or len(self.group_ranks[self.engine_index]) == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=self.host_rank, group=self.group)
        return box[0]

    def from_every_engine(self, value: Any) -> list:
        """Each engine host's ``value`` in engine order, on every rank (the others' values are dropped)."""
        values = all_gather_object(value)
        return [values[r] for r in self.host_ranks]


def place_engines(setting: str | int) -> EnginePlacement:
    """Build the placement for the current Megatron layout (every rank calls it, in the same order,
    since new process groups are created collectively)."""
    from megatron.core import parallel_state as ps

    dist = torch.distributed
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    engines = resolve_engine_count(setting, dp)
    k = dp // engines
    where = all_gather_object((socket.gethostname(), int(os.environ.get("LOCAL_RANK", "0"))))
    coords = all_gather_object((dp_rank, ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()))
    group_ranks = [[r for r, (d, _, _) in enumerate(coords) if d // k == g] for g in range(engines)]
    host_ranks = [next(r for r in ranks if coords[r] == (g * k, 0, 0)) for g, ranks in enumerate(group_ranks)]
    host = host_ranks[dp_rank // k]
    replica = sorted((coords[r][2], coords[r][1], r) for r in range(len(coords))
                     if coords[r][0] == coords[host][0] and where[r][0] == where[host][0])
    devices = [where[r][1] for _, _, r in replica]
    group: Optional[Any] = None
    if engines > 1:
        for g, ranks in enumerate(group_ranks):  # collective: every rank creates every group
            made = dist.new_group(ranks)
            if global_rank() in ranks:
                group = made
    return EnginePlacement(engines=engines, replicas_per_engine=k, engine_index=dp_rank // k,
                           replica_in_group=dp_rank % k, host_ranks=host_ranks, group_ranks=group_ranks, group=group,
                           host_local_devices=devices)


def interleave(per_engine: list[list]) -> list:
    """Items of each engine's list back in the step's global order: item j of engine g is item
    ``j * E + g`` (the inverse of dealing the step's prompts round-robin over E engines)."""
    out = []
    longest = max((len(items) for items in per_engine), default=0)
    for j in range(longest):
        for items in per_engine:
            if j < len(items):
                out.append(items[j])
    return out


@contextmanager
def engine_devices(devices: list[int]):
    """``CUDA_VISIBLE_DEVICES`` narrowed to ``devices`` (local indices, through any mask already
    set) while an engine starts, so that the worker processes vLLM spawns for its own tensor
    parallelism land on the replica's GPUs rather than on GPUs 0..n-1 of the node. This process's
    own CUDA context, created before, is not affected."""
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    physical = before.split(",") if before else [str(i) for i in range(max(devices, default=-1) + 1)]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(physical[i] for i in devices)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before
