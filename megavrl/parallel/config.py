"""The ``parallel`` section of the config: Megatron's TP/PP sizes and the process-group backend."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megavrl.config_base import ConfigError, check_choice, check_positive


@dataclass
class ParallelConfig:
    tp: int = 1
    """Megatron tensor-parallel size."""
    pp: int = 1
    """Megatron pipeline-parallel size. Data parallelism is world_size / (tp * pp)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (only takes effect on GPU with DP > 1)."""
    backend: str = "auto"
    """auto | nccl | gloo. auto: nccl with CUDA, gloo (CPU mode) without."""
    nproc: Optional[int] = None
    """Processes to start when a command runs outside torchrun (default: tp * pp)."""


def validate_parallel(parallel: ParallelConfig, world_size: int | None = None) -> None:
    """Parallel sizes against each other and, when known, the number of processes."""
    check_positive("parallel.tp", parallel.tp)
    check_positive("parallel.pp", parallel.pp)
    check_choice("parallel.backend", parallel.backend, ("auto", "nccl", "gloo"))
    model_parallel = parallel.tp * parallel.pp
    if world_size is not None and world_size % model_parallel != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp * parallel.pp = "
            f"{parallel.tp} * {parallel.pp} = {model_parallel}: start a multiple of {model_parallel} "
            f"processes (torchrun --nproc-per-node) or change parallel.tp / parallel.pp")
    if parallel.nproc is not None and parallel.nproc % model_parallel != 0:
        raise ConfigError(f"parallel.nproc={parallel.nproc} is not divisible by parallel.tp * parallel.pp "
                          f"= {model_parallel}")
