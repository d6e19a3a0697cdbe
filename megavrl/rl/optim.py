"""Megatron-Core DDP, optimizer and LR schedule for the actor, built from megavrl's config.

Everything here is Megatron-Core's own machinery: ``DistributedDataParallel`` (contiguous grad
buffers, data-parallel all-reduce or reduce-scatter), ``get_megatron_optimizer`` (Adam with
gradient clipping over the model-parallel groups; the distributed optimizer shards its state
across data-parallel ranks) and ``OptimizerParamScheduler`` (linear warmup, then constant,
linear or cosine decay). This module only translates megavrl's config sections into theirs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megavrl.rl.config import OptimizerConfig as MegavrlOptimizerConfig
from megavrl.log import get_logger

log = get_logger(__name__)


@dataclass
class ActorOptimizer:
    model: list  # DDP-wrapped model chunks (one per virtual pipeline stage; one here)
    optimizer: object  # megatron.core.optimizer.MegatronOptimizer
    scheduler: object  # megatron.core.optimizer_param_scheduler.OptimizerParamScheduler

    def zero_grad(self) -> None:
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def step(self) -> tuple[bool, float | None]:
        """Optimizer step then one scheduler step. Returns (applied, grad_norm).

        ``applied`` is False when Megatron found non-finite gradients and skipped the update.
        """
        applied, grad_norm, _ = self.optimizer.step()
        if applied:
            self.scheduler.step(increment=1)
        return bool(applied), (float(grad_norm) if grad_norm is not None else None)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict()}

    def sharded_state_dict(self, model_sharded_state_dict: dict, is_loading: bool = False) -> dict:
        return self.optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading)

    def adam_step(self) -> int:
        """Adam's step counter (the same for every parameter); 0 before the first update."""
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            for state in opt.optimizer.state.values():
                if "step" in state:
                    return int(state["step"])
        return 0


def wrap_ddp(chunks: list, transformer_config, use_distributed_optimizer: bool) -> list:
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        check_for_nan_in_grad=False,  # non-finite losses are handled (skipped and counted) by the trainer
    )
    return [DistributedDataParallel(config=transformer_config, ddp_config=ddp_config, module=chunk)
            for chunk in chunks]


def build_actor_optimizer(chunks: list, transformer_config, opt: MegavrlOptimizerConfig, total_steps: int,
                          use_distributed_optimizer: bool = False) -> ActorOptimizer:
    """Wrap ``chunks`` in Megatron DDP and build Adam + the LR schedule.

    The distributed optimizer needs CUDA buffers and a data-parallel group > 1 to be worth it; on
    CPU it is turned off with a log line.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    if use_distributed_optimizer and (not torch.cuda.is_available() or ps.get_data_parallel_world_size() == 1):
        log.info("distributed optimizer off: it needs CUDA and data-parallel size > 1")
        use_distributed_optimizer = False
    model = wrap_ddp(chunks, transformer_config, use_distributed_optimizer)
    params_dtype = transformer_config.params_dtype
    mcore_opt = OptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(mcore_opt, model)
    decay_steps = max(1, total_steps)
    style = opt.lr_decay_style
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if opt.lr_warmup_steps > 0 else opt.lr,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.lr_warmup_steps,
        lr_decay_steps=max(decay_steps, opt.lr_warmup_steps + 1),
        lr_decay_style=style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True,
    )
    return ActorOptimizer(model=model, optimizer=optimizer, scheduler=scheduler)
