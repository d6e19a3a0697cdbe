"""Distributed set-up: torch.distributed + Megatron-Core parallel state, CPU (gloo) mode, launching.

    from megavrl.parallel import init_distributed, destroy_distributed
    layout = init_distributed(tp=2, pp=1)   # under torchrun --nproc-per-node 2, or world 1 alone
    ...
    destroy_distributed()
"""
from megavrl.parallel.cpu_mode import enable_cpu_mode, is_cpu_mode
from megavrl.parallel.distributed import (ParallelLayout, check_parallel_sizes, current_layout,
                                          destroy_distributed, init_distributed)
from megavrl.parallel.launch import cli_argv, ensure_launched

__all__ = ["ParallelLayout", "check_parallel_sizes", "cli_argv", "current_layout", "destroy_distributed",
           "enable_cpu_mode", "ensure_launched", "init_distributed", "is_cpu_mode"]
