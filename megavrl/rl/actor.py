"""The policy and the reference model on Megatron-Core: token log-probs and updates.

Both run every micro-batch through Megatron's pipeline schedule (``get_forward_backward_func``:
1F1B across PP stages, plain accumulation at PP=1), so TP, PP and DP come from Megatron. The
per-token work at the end of the last stage (log-probs of the labels from vocab-parallel logits,
entropy, the loss) is a ``loss_func`` handed to the schedule.

Loss scaling. megavrl's losses are divided by *global* normalisers (tokens or sequences of the
whole mini-batch on all data-parallel ranks), so the mini-batch gradient is the plain SUM of the
micro-batch gradients over micro-batches and DP ranks. Megatron instead divides each micro-batch
loss by the number of micro-batches and averages gradients over DP; the loss handed back is
therefore multiplied by ``num_microbatches * dp_size`` to cancel both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from megavrl.dtypes import resolve_dtype
from megavrl.log import get_logger
from megavrl.parallel.collectives import collective_device
from megavrl.models.qwen2_5_vl.model import MODEL_INPUTS as MODEL_KEYS

log = get_logger(__name__)


# loss_fn(batch, logprobs [b, S], entropy [b, S]) -> (loss scalar, metrics dict of floats)
LossFn = Callable[[dict, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]


@dataclass
class StepResult:
    applied: bool
    """False when the update was skipped (a non-finite loss or gradient)."""
    grad_norm: float | None
    metrics: dict
    """Summed over micro-batches and DP ranks (losses use global normalisers); same on every rank."""


class MegatronActor:
    """This rank's pipeline stage and TP shard of Qwen2.5-VL, optionally with an optimizer.

    trainable=False builds a frozen copy (the reference policy): no DDP, no optimizer, no grads.
    random_init=True keeps Megatron's random weights: ``hf_dir`` then needs only its config.json.
    """

    def __init__(self, hf_dir: str, tp: int, pp: int, *, dtype: str = "auto", trainable: bool = True,
                 freeze_vision: bool = False, freeze_projector: bool = False, recompute: bool = False,
                 optimizer_config=None, total_steps: int = 1, use_distributed_optimizer: bool = False,
                 megatron_ckpt: str | None = None, rope_convention: str = "qwen", random_init: bool = False,
                 temperature: float = 1.0):
        from megavrl.checkpoint.hf_io import load_hf_weights
        from megavrl.checkpoint.mapping import mapping_context
        from megavrl.models.qwen2_5_vl.config import build_configs
        from megavrl.models.qwen2_5_vl.model import Qwen2_5_VLModel

        overrides = {"recompute_granularity": "full", "recompute_method": "uniform",
                     "recompute_num_layers": 1} if recompute else {}
        self.configs = build_configs(hf_dir, tp=tp, pp=pp, params_dtype=resolve_dtype(dtype),
                                     language_overrides=overrides)
        self.trainable = trainable
        # Log-probs are of softmax(logits / temperature): GRPO's must be of the distribution the
        # rollout sampled from, or the ratio and the KL describe another policy than the samples'.
        self.temperature = temperature
        # M-RoPE positions must follow the rollout engine's convention ("qwen", as vLLM), or the
        # trainer would score the sampled tokens at other positions than vLLM sampled them.
        self.model = Qwen2_5_VLModel(self.configs, freeze_vision=freeze_vision or not trainable,
                                     freeze_projector=freeze_projector or not trainable,
                                     rope_convention=rope_convention)
        if megatron_ckpt:
            self.load_megatron(megatron_ckpt)
        elif not random_init:
            load_hf_weights(self.model, hf_dir, mapping_context(self.configs))
        self.optim = None
        if trainable:
            from megatron.core.distributed import finalize_model_grads

            from megavrl.rl.optim import build_actor_optimizer

            self.optim = build_actor_optimizer([self.model], self.configs.language, optimizer_config, total_steps,
                                               use_distributed_optimizer=use_distributed_optimizer)
            cfg = self.configs.language
            cfg.finalize_model_grads_func = finalize_model_grads  # DP grad reduce + tied-embedding sync
            cfg.grad_scale_func = self.optim.optimizer.scale_loss
            cfg.no_sync_func = self.optim.model[0].no_sync
        else:
            self.model.eval()
            for p in self.model.parameters():
                p.requires_grad_(False)

    # ------------------------------------------------------------------ plumbing
    @property
    def module(self):
        """What the schedule runs: the DDP wrapper when trainable, the bare stage otherwise."""
        return self.optim.model[0] if self.optim else self.model

    @property
    def is_last_stage(self) -> bool:
        return self.model.post_process

    def _token_stats(self, logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs of the labels and entropy, in the [b, S] layout of the batch's loss mask
        (packed micro-batches are unpacked into it)."""
        from megavrl.rl.logprobs import token_logprobs
        from megavrl.rl.packing import is_packed, unpack

        logprobs, entropy = token_logprobs(logits, batch["labels"], vocab_size=self.configs.vocab_size,
                                           temperature=self.temperature, with_entropy=True)
        if is_packed(batch):
            logprobs, entropy = unpack(logprobs, batch["unpack_index"]), unpack(entropy, batch["unpack_index"])
        return logprobs, entropy

    def _schedule(self, micro_batches: list[dict], seq_len: int | None, loss_func_of: Callable, forward_only: bool,
                  collect: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megavrl.rl.packing import is_packed

        # Pipeline stages exchange [S, b, H] activations of one fixed shape per call.
        shapes = {tuple(b["input_ids"].shape) for b in micro_batches}
        if len(shapes) > 1 and self.configs.language.pipeline_model_parallel_size > 1:
            raise ValueError(f"micro-batches of shapes {sorted(shapes)}: pipeline parallelism needs one shape "
                             "(pad them to a common length)")
        batch_size, width = micro_batches[0]["input_ids"].shape
        if seq_len is not None and not any(is_packed(b) for b in micro_batches) and width != seq_len:
            raise ValueError(f"padded micro-batches of width {width}, not seq_len={seq_len}")

        def step(data_iterator, stage):
            batch = _on_model_device(next(data_iterator))
            inputs = {k: batch[k] for k in MODEL_KEYS if batch.get(k) is not None}
            return stage(**inputs), lambda output, **_: loss_func_of(batch, output)

        return get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(micro_batches), model=[self.module],
            num_microbatches=len(micro_batches), seq_length=width, micro_batch_size=batch_size,
            forward_only=forward_only, collect_non_loss_data=collect)

    # ------------------------------------------------------------------ forward only
    @torch.no_grad()
    def logprobs(self, micro_batches: list[dict], seq_len: int | None = None) -> list[torch.Tensor] | None:
        """Log-probs of each micro-batch's labels, [b, S] (0 off the loss mask), on the last stage;
        None elsewhere. Every rank of the model-parallel group must call it.

        micro_batches: padded (:func:`megavrl.rl.batch.collate`, all of width ``seq_len`` when
        given) or packed (:func:`megavrl.rl.packing.pack`; [b, S] is then the layout of their loss
        mask). At PP > 1 all of one shape."""
        was_training = self.module.training
        self.module.eval()
        try:
            out = self._schedule(micro_batches, seq_len,
                                 lambda batch, logits: self._token_stats(logits, batch)[0] * batch["loss_mask"],
                                 forward_only=True, collect=True)
        finally:
            self.module.train(was_training)
        return list(out) if self.is_last_stage else None

    # ------------------------------------------------------------------ update
    def train_step(self, micro_batches: list[dict], seq_len: int | None, loss_fn: LossFn) -> StepResult:
        """One optimizer step over ``micro_batches`` (this DP rank's share of a mini-batch; padded or
        packed, as for :meth:`logprobs`). ``loss_fn`` sees log-probs and entropy in the [b, S] layout
        of the batch's loss mask either way."""
        from megatron.core import parallel_state as ps

        assert self.optim is not None, "train_step needs a trainable actor"
        scale = len(micro_batches) * ps.get_data_parallel_world_size()
        self.module.train()
        self.optim.zero_grad()

        def loss_func(batch, logits):
            logprobs, entropy = self._token_stats(logits, batch)
            loss, metrics = loss_fn(batch, logprobs, entropy)
            return loss * scale, {k: torch.tensor(float(v)) for k, v in metrics.items()}

        outputs = self._schedule(micro_batches, seq_len, loss_func, forward_only=False, collect=False)
        metrics = reduce_metrics(outputs if self.is_last_stage else [])
        # Decided before the optimizer sees anything: Megatron's fp32 optimizer would apply a
        # non-finite gradient (it only skips for the fp16 loss scaler), and every rank must agree,
        # or one stage or shard would step while another does not.
        finite = all(math.isfinite(v) for v in metrics.values()) and all_ranks_agree(self._local_grads_finite())
        if not finite:
            self.optim.zero_grad()
            return StepResult(applied=False, grad_norm=None, metrics=metrics)
        applied, grad_norm = self.optim.step()
        if grad_norm is not None and not math.isfinite(grad_norm):
            applied = False
        return StepResult(applied=applied, grad_norm=grad_norm, metrics=metrics)

    def _local_grads_finite(self) -> bool:
        """Every gradient this rank holds (after the DP reduction) is finite: one check per
        contiguous DDP gradient buffer."""
        for chunk in self.optim.model:
            for buffer in chunk.buffers + chunk.expert_parallel_buffers:
                if not bool(torch.isfinite(buffer.grad_data).all()):
                    return False
        return True

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, for_loading: bool = False) -> dict:
        """Model, optimizer (Adam moments and step) and LR schedule as a sharded state dict.

        for_loading: build the template to load into. A fresh optimizer has no Adam state yet, so
        Megatron must create it first (``is_loading=True``); a save-side template of a fresh
        optimizer would have nothing to load the moments and the step into.
        """
        model_sd = self.model.sharded_state_dict()
        out = {"model": model_sd}
        if self.optim:
            out["optimizer"] = self.optim.sharded_state_dict(model_sd, is_loading=for_loading)
            out["scheduler"] = self.optim.state_dict()
        return out

    def load_sharded(self, state: dict) -> None:
        """Load what :meth:`sharded_state_dict` (``for_loading=True``) described and
        ``dist_checkpointing.load`` filled in."""
        self.model.load_state_dict(state["model"])
        if self.optim and "optimizer" in state:
            self.optim.optimizer.load_state_dict(state["optimizer"])
            self.optim.scheduler.load_state_dict(state["scheduler"]["scheduler"])

    def load_megatron(self, ckpt: str) -> None:
        """Model weights from a megavrl Megatron checkpoint (converter output, step dir or root)."""
        from megavrl.checkpoint.convert import load_megatron_weights

        load_megatron_weights(self.model, ckpt)

    def export_hf_ranks0(self, dtype: torch.dtype | None = None):
        """Stream of (published HF name, full tensor) yielded on the first rank of this model replica
        (TP rank 0, PP rank 0; global rank 0 in the first replica), for the weight sync. Every rank of
        the replica must exhaust it: the others drive the PP broadcasts and TP gathers."""
        from megavrl.checkpoint.hf_io import export_hf_weights
        from megavrl.checkpoint.mapping import mapping_context

        return export_hf_weights(self.model, mapping_context(self.configs), ranks="first", dtype=dtype)

    def sync_weights_into(self, engine, rpc_guard=None):
        """Stream the weights into a rollout engine: the weight sync after every update (the trainer,
        ``megavrl check-sync``). Every rank of the replica calls it, with the engine on the replica's
        first rank and None elsewhere; returns the engine's SyncStats there, None elsewhere. If the engine fails,
        the stream is still exhausted, so the other ranks finish the export's collectives."""
        stream = self.export_hf_ranks0()
        if engine is None:
            for _ in stream:  # drive the PP broadcasts and TP gathers
                pass
            return None
        try:
            return engine.update_weights(stream, rpc_guard=rpc_guard)
        except BaseException:
            for _ in stream:
                pass
            raise


def _on_model_device(batch: dict) -> dict:
    """The micro-batch on this rank's GPU (collation builds it on the CPU); as it is on the CPU."""
    if not torch.cuda.is_available():
        return batch
    import dataclasses

    device = torch.device("cuda", torch.cuda.current_device())

    def move(value):
        if isinstance(value, torch.Tensor):
            return value.to(device, non_blocking=True)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):  # PackedSeqParams: cu_seqlens
            return dataclasses.replace(value, **{f.name: move(getattr(value, f.name))
                                                 for f in dataclasses.fields(value)
                                                 if isinstance(getattr(value, f.name), torch.Tensor)})
        return value

    return {key: move(value) for key, value in batch.items()}


def all_ranks_agree(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on every rank (a MIN all-reduce over the world)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    device = collective_device()
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def reduce_metrics(outputs: list[dict]) -> dict:
    """Sum per-micro-batch metric dicts over micro-batches and over all ranks that hold them.

    Only last-stage ranks with TP rank 0 contribute (the other TP ranks hold copies), so the
    result is the sum over micro-batches and data-parallel ranks, identical on every rank.
    """
    from megatron.core import parallel_state as ps

    local: dict[str, float] = {}
    if ps.get_tensor_model_parallel_rank() == 0:
        for out in outputs:
            for k, v in out.items():
                local[k] = local.get(k, 0.0) + float(v)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return local
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, local)
    total: dict[str, float] = {}
    for part in gathered:
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    return total
