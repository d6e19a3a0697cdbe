"""Hugging Face safetensors <-> a sharded Megatron Qwen2.5-VL, through the mapping table.

Loading (:func:`load_hf_weights`): every rank opens the safetensors files lazily and reads, tensor
by tensor, only the slices its own parameters need (its pipeline stage's layers, its TP shard).
No communication; peak memory is one slice.

Exporting (:func:`export_hf_weights`): a generator of ``(hf_name, full tensor)`` in the published
layout, one tensor at a time. The stage that owns a tensor all-gathers its TP shards, merges them
with the table's rule (trimming vocab padding), and, when PP > 1, broadcasts the result to the
other stages. All ranks must iterate it to the end (it runs collectives); with
``ranks="rank0"`` only global rank 0 receives the tensors (``ranks="first"``: the first rank of
every model replica, TP rank 0 and PP rank 0), the others drive the collectives and
yield nothing. The same stream feeds the HF converter and the vLLM weight sync.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from megavrl.checkpoint.mapping import (TIED_OUTPUT_MEGATRON, Binding, MappingContext, assemble_shard, bind,
                                        hf_aliases, hf_shapes_from_shard, mapping_context, merge_shards,
                                        shard_pieces)
from megavrl.log import get_logger

log = get_logger(__name__)


class HFCheckpointReader:
    """Lazy, name-aware access to the safetensors files of a HF directory.

    Accepts published (``model.*``, ``visual.*``) and transformers-5 (``model.language_model.*``,
    ``model.visual.*``) names on disk; callers always ask in the published layout.
    """

    def __init__(self, hf_dir: str | os.PathLike):
        self.hf_dir = Path(hf_dir)
        index = self.hf_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.hf_dir.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.hf_dir}")
        self._handles = {f: _open_safetensors(self.hf_dir / f) for f in files}
        if weight_map is None:
            weight_map = {k: f for f, h in self._handles.items() for k in h.keys()}
        self._file_of = weight_map

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._handles.clear()

    def names(self) -> list[str]:
        return list(self._file_of)

    def resolve(self, published: str) -> str:
        """The on-disk name of a published-layout name; KeyError naming the directory."""
        for name in hf_aliases(published):
            if name in self._file_of:
                return name
        raise KeyError(f"tensor {published!r} is not in {self.hf_dir} (nor under its transformers-5 name)")

    def has(self, published: str) -> bool:
        return any(n in self._file_of for n in hf_aliases(published))

    def _slice(self, published: str):
        name = self.resolve(published)
        return self._handles[self._file_of[name]].get_slice(name)

    def shape(self, published: str) -> tuple[int, ...]:
        return tuple(self._slice(published).get_shape())

    def read(self, published: str, dim: int | None = None, start: int = 0, stop: int = 0) -> torch.Tensor:
        """The whole tensor, or rows/columns [start, stop) of dim 0 or 1, read from disk alone."""
        sl = self._slice(published)
        if dim is None:
            return sl[:]
        index = (slice(start, stop),) if dim == 0 else (slice(None),) * dim + (slice(start, stop),)
        return sl[index]


def _open_safetensors(path: Path):
    """``safe_open`` of one file; a missing, unreadable, truncated or corrupt file raises a
    :class:`megavrl.errors.UserError` naming it (safetensors' own errors do not)."""
    from safetensors import SafetensorError, safe_open

    from megavrl.errors import UserError, unreadable

    if not path.is_file():
        raise UserError(f"safetensors file {str(path)!r} does not exist (listed in "
                        f"{str(path.parent / 'model.safetensors.index.json')!r}?): the model directory is incomplete")
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:  # e.g. "Error while deserializing header: incomplete metadata, file not fully covered"
        raise UserError(f"safetensors file {str(path)!r} is truncated or corrupt ({e}): copy or download it "
                        f"again") from None
    except OSError as e:
        raise unreadable(path, e, "safetensors file") from None


def _model_bindings(model, tie_word_embeddings: bool) -> list[tuple[Binding, torch.nn.Parameter]]:
    """Every parameter of the model stage with its mapping row; raises on an unmapped name."""
    offset = model.layer_offset
    out = []
    for name, param in model.named_parameters():
        out.append((bind(name, layer_offset=offset, tie_word_embeddings=tie_word_embeddings), param))
    return out


def _tp_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() if ps.model_parallel_is_initialized() else 0


@torch.no_grad()
def load_hf_weights(model, hf_dir: str | os.PathLike, ctx: MappingContext | None = None) -> int:
    """Copy this rank's shard of every parameter of ``model`` (a Qwen2_5_VLModel stage) from the
    HF directory. Returns the number of parameters loaded; raises if one is missing on disk or
    has the wrong shape."""
    ctx = ctx or mapping_context(model.configs)
    tp_rank = _tp_rank()
    loaded = 0
    with HFCheckpointReader(hf_dir) as reader:
        for binding, param in _model_bindings(model, ctx.tie_word_embeddings):
            row = binding.row
            shapes = [reader.shape(n) for n in binding.hf_names]
            pieces = shard_pieces(row.split, shapes, tp_rank, ctx, row.component)
            parts = [reader.read(binding.hf_names[p[0]], p[1], p[2], p[3]) for p in pieces]
            if not parts:  # a vocab shard made of padding rows only
                param.zero_()
                loaded += 1
                continue
            shard = assemble_shard(row.split, parts, ctx, row.component)
            if tuple(shard.shape) != tuple(param.shape):
                raise ValueError(f"{binding.hf_names} -> {binding.megatron_name}: shard shape {tuple(shard.shape)} "
                                 f"does not match the parameter's {tuple(param.shape)}")
            param.copy_(shard)
            loaded += 1
    log.info("loaded %d parameter shards from %s (tp rank %d, layers from %d)", loaded, hf_dir, tp_rank,
             model.layer_offset)
    return loaded


def export_hf_weights(model, ctx: MappingContext | None = None, ranks: str = "all",
                      dtype: torch.dtype | None = None, of: str = "weights") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(published HF name, full tensor)`` for every tensor of the model, one at a time.

    model: this rank's Qwen2_5_VLModel stage (any TP/PP; DP replicas export independently).
    ranks: "all" -- every rank yields every tensor; "first" -- only each model replica's first rank
        (TP rank 0, PP rank 0) yields, e.g. into that replica's rollout engine; "rank0" -- only
        global rank 0 yields, the
        others drive the collectives and yield nothing. Every rank must exhaust the iterator.
    dtype: cast each tensor (e.g. torch.bfloat16 for vLLM); default the parameter dtype.
    of: "weights", or "grads" to stream the parameters' ``.grad`` in HF names instead (zeros
        where a gradient is None), e.g. to compare gradients with transformers.
    Order: stage by stage (vision tower, embedding, layers, final norm, output), table order
    within a stage. Tied output weights are not exported (HF has no lm_head then).
    A yielded tensor may share memory with the parameter (at TP=1, PP=1 without ``dtype``): copy
    it before changing it.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if of not in ("weights", "grads"):
        raise ValueError(f"of must be 'weights' or 'grads', not {of!r}")
    if ranks not in ("all", "first", "rank0"):
        raise ValueError(f"ranks must be 'all', 'first' or 'rank0', not {ranks!r}")
    ctx = ctx or mapping_context(model.configs)
    distributed = dist.is_available() and dist.is_initialized() and ps.model_parallel_is_initialized()
    tp = ps.get_tensor_model_parallel_world_size() if distributed else 1
    pp = ps.get_pipeline_model_parallel_world_size() if distributed else 1
    if tp != ctx.tp_size:
        raise ValueError(f"MappingContext is for TP={ctx.tp_size} but the model runs at TP={tp}")
    if ranks == "all" or not distributed:
        yields = True
    elif ranks == "first":
        yields = ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0
    else:
        yields = dist.get_rank() == 0

    local = [(b, p) for b, p in _model_bindings(model, ctx.tie_word_embeddings)
             if not (ctx.tie_word_embeddings and b.megatron_name == TIED_OUTPUT_MEGATRON)]
    # Every stage learns what the others hold: (hf names, shapes, dtype) per tensor, in order.
    meta = [(b.hf_names, hf_shapes_from_shard(b.row.split, p.shape, ctx, b.row.component), p.dtype)
            for b, p in local]
    if pp > 1:
        stages: list = [None] * pp
        dist.all_gather_object(stages, meta, group=ps.get_pipeline_model_parallel_group())
    else:
        stages = [meta]
    my_stage = ps.get_pipeline_model_parallel_rank() if distributed else 0
    pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()) if pp > 1 else None
    tp_group = ps.get_tensor_model_parallel_group() if tp > 1 else None

    for stage, entries in enumerate(stages):
        for index, (hf_names, shapes, pdtype) in enumerate(entries):
            tensors = None
            if stage == my_stage:
                binding, param = local[index]
                shard = param.detach()
                if of == "grads":
                    shard = param.grad.detach() if param.grad is not None else torch.zeros_like(shard)
                if tp > 1:
                    shard = shard.contiguous()
                    gathered = [torch.empty_like(shard) for _ in range(tp)]
                    dist.all_gather(gathered, shard, group=tp_group)
                else:
                    gathered = [shard]
                tensors = merge_shards(binding.row.split, gathered, ctx, binding.row.component)
            for i, name in enumerate(hf_names):
                if pp > 1:
                    if tensors is not None:
                        t = tensors[i].contiguous()
                    else:
                        t = torch.empty(shapes[i], dtype=pdtype, device=_device())
                    dist.broadcast(t, src=pp_ranks[stage], group=ps.get_pipeline_model_parallel_group())
                else:
                    t = tensors[i]
                if yields:
                    yield name, (t if dtype is None else t.to(dtype))


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

