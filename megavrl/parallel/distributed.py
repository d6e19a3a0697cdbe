"""torch.distributed + Megatron-Core parallel state, in one call.

``init_distributed(tp, pp)`` is the first thing every multi-process megavrl job does. It works
under torchrun (reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)
and in a plain single process (world size 1, nothing to launch). The data-parallel size is what
is left: ``dp = world_size / (tp * pp)``.

Backends: NCCL when CUDA is available, gloo otherwise. With gloo, Megatron-Core's CUDA
assumptions are redirected once by :func:`megavrl.parallel.cpu_mode.enable_cpu_mode`.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from megavrl.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class ParallelLayout:
    """Where this process sits in the (TP, PP, DP) grid. Ranks are 0-based."""

    world_size: int
    rank: int
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    backend: str
    device: "object"  # torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def transformer_engine_available() -> bool:
    """Transformer Engine layer specs are usable: TE imports and CUDA is there."""
    import torch

    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build
        return False
    return torch.cuda.is_available()


def check_parallel_sizes(world_size: int, tp: int, pp: int) -> int:
    """Return the data-parallel size, or raise ValueError naming the sizes that do not fit."""
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_model_parallel_size={tp} and pipeline_model_parallel_size={pp} "
                         "must both be >= 1")
    if world_size % (tp * pp) != 0:
        raise ValueError(
            f"world_size={world_size} is not divisible by tensor_model_parallel_size={tp} x "
            f"pipeline_model_parallel_size={pp} = {tp * pp}: launch a multiple of {tp * pp} "
            f"processes (torchrun --nproc-per-node) or change --tp/--pp")
    return world_size // (tp * pp)


def current_layout() -> ParallelLayout:
    """The layout of an initialised process (after :func:`init_distributed`)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return ParallelLayout(
        world_size=dist.get_world_size(), rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        backend=backend, device=device)


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234, backend: str | None = None,
                     timeout_s: float = 1800.0) -> ParallelLayout:
    """Initialise torch.distributed and Megatron-Core's model-parallel groups; return the layout.

    tp, pp: tensor- and pipeline-parallel sizes; the world size must be a multiple of tp * pp.
    seed: seeds torch and Megatron's model-parallel RNG tracker (TP ranks get different streams
        for sharded weight initialisation and dropout, DP replicas the same).
    backend: "nccl" or "gloo"; default NCCL when CUDA is available, gloo otherwise. gloo on a
        machine without CUDA turns on CPU mode (:mod:`megavrl.parallel.cpu_mode`).
    timeout_s: collective timeout in seconds.

    Calling it again with the same sizes is a no-op; with different sizes it rebuilds the
    Megatron groups on the existing process group. (After :func:`destroy_distributed` a torchrun
    job cannot initialise again: the launcher's rendezvous store is gone.)
    """
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', not {backend!r}")
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    dp = check_parallel_sizes(world_size, tp, pp)  # refuse before touching anything
    if backend == "gloo" and not torch.cuda.is_available():
        from megavrl.parallel.cpu_mode import enable_cpu_mode

        enable_cpu_mode()
    timeout = datetime.timedelta(seconds=timeout_s)

    if not dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:  # torchrun (or any launcher that sets the env:// variables)
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # a plain single process: no launcher, world of one
            dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1, timeout=timeout)

    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size() == tp
                and ps.get_pipeline_model_parallel_world_size() == pp):
            return current_layout()
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 distributed_timeout_minutes=max(1, int(timeout_s // 60)))
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    layout = current_layout()
    log.info("distributed: world %d = TP %d x PP %d x DP %d on %s (rank %d: tp %d, pp %d, dp %d)",
             world_size, tp, pp, dp, backend, layout.rank, layout.tp_rank, layout.pp_rank, layout.dp_rank)
    return layout


def destroy_distributed() -> None:
    """Tear down Megatron's groups and the default process group (safe to call twice)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def finish_distributed() -> None:
    """End a multi-process command cleanly: wait for every rank (rank 0 may still be stopping its
    rollout engine), then tear the groups down. A rank that exits while its peers still hold gloo
    connections to it can make them abort at exit ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    destroy_distributed()
