"""THE Hugging Face <-> Megatron mapping of Qwen2.5-VL: one row per tensor, written once.

The converters (``megavrl convert``), the checkpoint loader (:mod:`megavrl.checkpoint.hf_io`),
the parity tool and the vLLM weight sync all read this table; nothing else knows tensor names.

A row (:class:`TensorMapping`) says, for one Megatron parameter:
- ``megatron``: its name inside :class:`megavrl.models.qwen2_5_vl.model.Qwen2_5_VLModel`
  (``language_model.*`` is the Megatron-Core ``GPTModel``, ``vision_model.*`` the vision tower
  of :mod:`megavrl.models.qwen2_5_vl.vision`). ``{i}`` stands for a layer (text) or block
  (vision) index. For text layers the HF index is global while a pipeline stage numbers its
  layers from 0: the loader translates (``layer.layer_number - 1`` is the global index).
- ``hf``: the HF tensor name(s) in the *published* layout of Qwen's checkpoints (``model.*``,
  ``visual.*``, ``lm_head.*``), same ``{i}``. Several names when several HF tensors make one
  Megatron tensor (q, k, v -> linear_qkv; gate, up -> linear_fc1). Readers also accept the
  transformers-5 layout (``model.language_model.*``, ``model.visual.*``), see :func:`hf_aliases`.
- ``split``: how the tensor is cut across tensor-parallel (TP) ranks, one of :class:`Split`:

  ========== ==================================================================================
  REPLICATED every rank holds the whole tensor (norms, row-parallel biases, patch embedding).
  COLUMN     dim 0 cut in TP equal chunks (ColumnParallelLinear weight and bias).
  ROW        dim 1 cut in TP equal chunks (RowParallelLinear weight; its bias is REPLICATED).
  VOCAB      rows padded with zeros to the padded vocabulary (a multiple of 128 * TP, as
             Megatron pads), then cut on dim 0; export trims the padding.
  QKV        HF q [nh*d, .], k [ng*d, .], v [ng*d, .] (3 names) -> Megatron's linear_qkv, which
             holds, for each query group g in order, the nh/ng query heads of g, then g's key
             head, then g's value head: [ng * (nh/ng + 2) * d, .]. TP rank r holds query groups
             [r*ng/tp, (r+1)*ng/tp). Weights and biases alike. nh, ng, d come from the row's
             ``component`` (language or vision attention geometry of the :class:`MappingContext`).
  QKV_FUSED  the same Megatron layout from ONE HF tensor that stacks q, k, v on dim 0 (the vision
             tower's ``attn.qkv``).
  GATE_UP    HF gate [F, .] and up [F, .] (2 names) -> linear_fc1, where TP rank r holds
             [gate rows of chunk r; up rows of chunk r] (Megatron's gated-MLP layout, so
             ``torch.chunk(fc1_out, 2, -1)`` gives the rank's gate and up halves).
  ========== ==================================================================================

- ``component``: "language" or "vision" (which attention geometry QKV rules use, and which
  layer count ``{i}`` runs over).

Every split rule is a pair of pure functions over tensors: :func:`shard_pieces` (which slices of
the HF tensors a TP rank needs, so a reader can load only those) + :func:`assemble_shard`, and
:func:`merge_shards` (all TP shards -> the HF tensors). They are tested for every rule at several
TP sizes by tests/checkpoint/test_mapping.py.

Tied embeddings (``tie_word_embeddings``): there is no ``lm_head.weight`` in the HF checkpoint;
when the last pipeline stage holds its own copy of the output weight (PP > 1) it is loaded from
``model.embed_tokens.weight`` and never exported (see :data:`TIED_OUTPUT_MEGATRON`).

Adding a model part: append rows to the right section below; if a tensor needs a new way of
being split, add a :class:`Split` member and its three functions' branches, and a test.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from megavrl.models.qwen2_5_vl.config import Qwen2_5_VLConfigs

LANGUAGE_PREFIX = "language_model."
VISION_PREFIX = "vision_model."


class Split(str, enum.Enum):
    REPLICATED = "replicated"
    COLUMN = "column"
    ROW = "row"
    VOCAB = "vocab"
    QKV = "qkv"
    QKV_FUSED = "qkv_fused"
    GATE_UP = "gate_up"


@dataclass(frozen=True)
class TensorMapping:
    """One row of the table (see the module docstring)."""

    megatron: str
    hf: tuple[str, ...]
    split: Split
    component: str = "language"

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.megatron


def _text(megatron: str, hf: str | tuple[str, ...], split: Split) -> TensorMapping:
    return TensorMapping(LANGUAGE_PREFIX + megatron, hf if isinstance(hf, tuple) else (hf,), split, "language")


def _vision(megatron: str, hf: str | tuple[str, ...], split: Split) -> TensorMapping:
    return TensorMapping(VISION_PREFIX + megatron, hf if isinstance(hf, tuple) else (hf,), split, "vision")


_L = "decoder.layers.{i}."
_HL = "model.layers.{i}."
# HF names that code outside this table refers to (the tied output, a small tensor to probe).
HF_EMBEDDING = "model.embed_tokens.weight"
HF_FINAL_NORM = "model.norm.weight"
HF_OUTPUT = "lm_head.weight"  # absent from the checkpoint of a model with tied embeddings

# ---------------------------------------------------------------------------------------------
# Language model (Megatron-Core GPTModel, local or TE spec with separate norm modules)
# ---------------------------------------------------------------------------------------------
LANGUAGE_ROWS: tuple[TensorMapping, ...] = (
    _text("embedding.word_embeddings.weight", HF_EMBEDDING, Split.VOCAB),
    _text(_L + "input_layernorm.weight", _HL + "input_layernorm.weight", Split.REPLICATED),
    _text(_L + "self_attention.linear_qkv.weight",
          (_HL + "self_attn.q_proj.weight", _HL + "self_attn.k_proj.weight", _HL + "self_attn.v_proj.weight"),
          Split.QKV),
    _text(_L + "self_attention.linear_qkv.bias",
          (_HL + "self_attn.q_proj.bias", _HL + "self_attn.k_proj.bias", _HL + "self_attn.v_proj.bias"),
          Split.QKV),
    _text(_L + "self_attention.linear_proj.weight", _HL + "self_attn.o_proj.weight", Split.ROW),
    _text(_L + "pre_mlp_layernorm.weight", _HL + "post_attention_layernorm.weight", Split.REPLICATED),
    _text(_L + "mlp.linear_fc1.weight", (_HL + "mlp.gate_proj.weight", _HL + "mlp.up_proj.weight"), Split.GATE_UP),
    _text(_L + "mlp.linear_fc2.weight", _HL + "mlp.down_proj.weight", Split.ROW),
    _text("decoder.final_layernorm.weight", HF_FINAL_NORM, Split.REPLICATED),
    _text("output_layer.weight", HF_OUTPUT, Split.VOCAB),
)

TIED_OUTPUT_MEGATRON = LANGUAGE_PREFIX + "output_layer.weight"
TIED_OUTPUT_SOURCE = HF_EMBEDDING

# ---------------------------------------------------------------------------------------------
# Vision tower (megavrl.models.qwen2_5_vl.vision.Qwen2_5_VisionModel) -- the vision engineer's
# section: change these rows with the tower's parameter names. Written from vision.py's names
# and its test loader; checked by the TP=2 / PP=2 parity, gradient and bit-exact export tests
# (tests/models/qwen2_5_vl/test_model.py). Megatron names are relative to the tower, prefixed
# with VISION_PREFIX by _vision(); HF names in the published layout (visual.*); {i} runs over
# the vision blocks, which all live on the first pipeline stage. attn.qkv is HF's fused
# [Q; K; V] (QKV_FUSED regroups it per head: vision attention has num_query_groups = num_heads).
# Verified end to end by tests/models/qwen2_5_vl/test_vision.py: loaded through these rows at
# TP 1 and 2 the tower matches transformers, and gathered TP shards export to the exact HF tensors.
# ---------------------------------------------------------------------------------------------
_VL = "decoder.layers.{i}."
_HV = "visual.blocks.{i}."
VISION_ROWS: tuple[TensorMapping, ...] = (
    _vision("patch_embed.proj.weight", "visual.patch_embed.proj.weight", Split.REPLICATED),
    _vision(_VL + "input_layernorm.weight", _HV + "norm1.weight", Split.REPLICATED),
    _vision(_VL + "self_attention.linear_qkv.weight", _HV + "attn.qkv.weight", Split.QKV_FUSED),
    _vision(_VL + "self_attention.linear_qkv.bias", _HV + "attn.qkv.bias", Split.QKV_FUSED),
    _vision(_VL + "self_attention.linear_proj.weight", _HV + "attn.proj.weight", Split.ROW),
    _vision(_VL + "self_attention.linear_proj.bias", _HV + "attn.proj.bias", Split.REPLICATED),
    _vision(_VL + "pre_mlp_layernorm.weight", _HV + "norm2.weight", Split.REPLICATED),
    _vision(_VL + "mlp.linear_fc1.weight", (_HV + "mlp.gate_proj.weight", _HV + "mlp.up_proj.weight"), Split.GATE_UP),
    _vision(_VL + "mlp.linear_fc1.bias", (_HV + "mlp.gate_proj.bias", _HV + "mlp.up_proj.bias"), Split.GATE_UP),
    _vision(_VL + "mlp.linear_fc2.weight", _HV + "mlp.down_proj.weight", Split.ROW),
    _vision(_VL + "mlp.linear_fc2.bias", _HV + "mlp.down_proj.bias", Split.REPLICATED),
    _vision("merger.ln_q.weight", "visual.merger.ln_q.weight", Split.REPLICATED),
    _vision("merger.linear_fc1.weight", "visual.merger.mlp.0.weight", Split.COLUMN),
    _vision("merger.linear_fc1.bias", "visual.merger.mlp.0.bias", Split.COLUMN),
    _vision("merger.linear_fc2.weight", "visual.merger.mlp.2.weight", Split.ROW),
    _vision("merger.linear_fc2.bias", "visual.merger.mlp.2.bias", Split.REPLICATED),
)
# --------------------------------------- end of vision rows ----------------------------------

ROWS: tuple[TensorMapping, ...] = LANGUAGE_ROWS + VISION_ROWS


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
_LAYOUT_ALIASES = (("model.visual.", "visual."), ("model.language_model.", "model."))
# The first component of every HF name, in both layouts (transformers-5's names start with "model.").
HF_PREFIXES = tuple(dict.fromkeys(name.split(".", 1)[0] + "." for row in ROWS for name in row.hf))


def hf_aliases(published: str) -> tuple[str, ...]:
    """The names a published-layout HF tensor may have on disk: itself, then transformers-5's."""
    if published.startswith("visual."):
        return published, "model." + published
    if published.startswith("model."):
        return published, "model.language_model." + published[len("model."):]
    return (published,)


def to_published(name: str) -> str:
    """A transformers-5 in-memory / on-disk name -> the published layout (others unchanged)."""
    for t5, published in _LAYOUT_ALIASES:
        if name.startswith(t5):
            return published + name[len(t5):]
    return name


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


_MEGATRON_PATTERNS = [(row, _pattern(row.megatron)) for row in ROWS]


@dataclass(frozen=True)
class Binding:
    """A row resolved for one local parameter: its local Megatron name and its HF names."""

    row: TensorMapping
    megatron_name: str
    hf_names: tuple[str, ...]
    layer: int | None  # global layer/block index, None for non-layer tensors


def match_megatron_name(name: str) -> tuple[TensorMapping, int | None]:
    """(row, local layer index or None) of a Megatron parameter name; KeyError if unmapped."""
    for row, pat in _MEGATRON_PATTERNS:
        m = pat.match(name)
        if m:
            return row, (int(m.group(1)) if m.groups() else None)
    raise KeyError(f"Megatron parameter {name!r} has no row in megavrl/checkpoint/mapping.py")


def bind(name: str, layer_offset: int = 0, tie_word_embeddings: bool = False) -> Binding:
    """Resolve a local Megatron parameter name. ``layer_offset``: global index of this pipeline
    stage's first text layer (vision blocks are never offset)."""
    row, local = match_megatron_name(name)
    layer = None
    if local is not None:
        layer = local + (layer_offset if row.component == "language" else 0)
    if tie_word_embeddings and name == TIED_OUTPUT_MEGATRON:
        hf = (TIED_OUTPUT_SOURCE,)
    else:
        hf = tuple(h.replace("{i}", str(layer)) for h in row.hf) if layer is not None else row.hf
    return Binding(row, name, hf, layer)


# ---------------------------------------------------------------------------------------------
# Split rules
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionGeometry:
    num_heads: int
    num_query_groups: int
    head_dim: int


@dataclass(frozen=True)
class MappingContext:
    """The sizes the split rules need. Build it from the model's configs with :func:`mapping_context`."""

    tp_size: int
    vocab_size: int
    padded_vocab_size: int
    language: AttentionGeometry
    vision: AttentionGeometry | None = None
    tie_word_embeddings: bool = False

    def geometry(self, component: str) -> AttentionGeometry:
        geo = self.language if component == "language" else self.vision
        if geo is None:
            raise ValueError(f"MappingContext has no {component} attention geometry")
        return geo


def mapping_context(configs: Qwen2_5_VLConfigs) -> MappingContext:
    """The split rules' sizes of a model built at one TP layout
    (:class:`megavrl.models.qwen2_5_vl.config.Qwen2_5_VLConfigs`, from ``build_configs``)."""
    text, vision = configs.text, configs.vision_sizes
    return MappingContext(
        tp_size=configs.tp, vocab_size=text.vocab_size, padded_vocab_size=configs.padded_vocab_size,
        language=AttentionGeometry(text.num_attention_heads, text.num_query_groups, text.kv_channels),
        vision=AttentionGeometry(vision.num_heads, vision.num_heads, vision.head_dim),
        tie_word_embeddings=text.tie_word_embeddings)


# A piece: (index into the row's HF names, dim to slice or None for all, start, stop).
Piece = tuple[int, int | None, int, int]


def _chunk(n: int, tp: int, what: str) -> int:
    if n % tp:
        raise ValueError(f"{what}={n} is not divisible by tensor_model_parallel_size={tp}")
    return n // tp


def shard_pieces(split: Split, hf_shapes: Sequence[Sequence[int]], tp_rank: int, ctx: MappingContext,
                 component: str = "language") -> list[Piece]:
    """The slices of the HF tensors (full shapes ``hf_shapes``) that TP rank ``tp_rank`` needs."""
    tp, r = ctx.tp_size, tp_rank
    if split is Split.REPLICATED:
        return [(0, None, 0, 0)]
    if split is Split.COLUMN:
        c = _chunk(hf_shapes[0][0], tp, "output size")
        return [(0, 0, r * c, (r + 1) * c)]
    if split is Split.ROW:
        c = _chunk(hf_shapes[0][1], tp, "input size")
        return [(0, 1, r * c, (r + 1) * c)]
    if split is Split.VOCAB:
        c = _chunk(ctx.padded_vocab_size, tp, "padded vocab size")
        start, stop = r * c, min((r + 1) * c, hf_shapes[0][0])
        return [(0, 0, start, stop)] if start < stop else []
    if split is Split.GATE_UP:
        c = _chunk(hf_shapes[0][0], tp, "ffn hidden size")
        return [(0, 0, r * c, (r + 1) * c), (1, 0, r * c, (r + 1) * c)]
    if split in (Split.QKV, Split.QKV_FUSED):
        g = ctx.geometry(component)
        groups = _chunk(g.num_query_groups, tp, "num_query_groups")
        q_rows = groups * (g.num_heads // g.num_query_groups) * g.head_dim
        kv_rows = groups * g.head_dim
        if split is Split.QKV:
            return [(0, 0, r * q_rows, (r + 1) * q_rows), (1, 0, r * kv_rows, (r + 1) * kv_rows),
                    (2, 0, r * kv_rows, (r + 1) * kv_rows)]
        k0, v0 = g.num_heads * g.head_dim, (g.num_heads + g.num_query_groups) * g.head_dim
        return [(0, 0, r * q_rows, (r + 1) * q_rows), (0, 0, k0 + r * kv_rows, k0 + (r + 1) * kv_rows),
                (0, 0, v0 + r * kv_rows, v0 + (r + 1) * kv_rows)]
    raise ValueError(f"unknown split {split!r}")


def take(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    """Apply a piece's slice to a full HF tensor."""
    _, dim, start, stop = piece
    return tensor if dim is None else tensor.narrow(dim, start, stop - start)


def assemble_shard(split: Split, parts: Sequence[torch.Tensor], ctx: MappingContext,
                   component: str = "language") -> torch.Tensor:
    """Build a rank's Megatron shard from the slices of :func:`shard_pieces`, in that order."""
    if split in (Split.REPLICATED, Split.COLUMN, Split.ROW):
        return parts[0].contiguous()
    if split is Split.VOCAB:
        c = ctx.padded_vocab_size // ctx.tp_size
        if not parts:  # this rank's rows are all padding
            raise ValueError("assemble_shard(VOCAB) needs the row count: use vocab_padding_rows")
        part = parts[0]
        if part.shape[0] == c:
            return part.contiguous()
        pad = part.new_zeros((c - part.shape[0],) + tuple(part.shape[1:]))
        return torch.cat([part, pad], dim=0)
    if split is Split.GATE_UP:
        return torch.cat([parts[0], parts[1]], dim=0)
    if split in (Split.QKV, Split.QKV_FUSED):
        g = ctx.geometry(component)
        groups = g.num_query_groups // ctx.tp_size
        per = g.num_heads // g.num_query_groups
        rest = tuple(parts[0].shape[1:])
        q = parts[0].reshape((groups, per * g.head_dim) + rest)
        k = parts[1].reshape((groups, g.head_dim) + rest)
        v = parts[2].reshape((groups, g.head_dim) + rest)
        return torch.cat([q, k, v], dim=1).reshape((-1,) + rest)
    raise ValueError(f"unknown split {split!r}")


def shard_hf_tensors(split: Split, hf_tensors: Sequence[torch.Tensor], tp_rank: int, ctx: MappingContext,
                     component: str = "language") -> torch.Tensor:
    """Full HF tensors -> the Megatron shard of TP rank ``tp_rank``."""
    pieces = shard_pieces(split, [t.shape for t in hf_tensors], tp_rank, ctx, component)
    if split is Split.VOCAB and not pieces:
        c = ctx.padded_vocab_size // ctx.tp_size
        t = hf_tensors[0]
        return t.new_zeros((c,) + tuple(t.shape[1:]))
    return assemble_shard(split, [take(hf_tensors[p[0]], p) for p in pieces], ctx, component)


def merge_shards(split: Split, shards: Sequence[torch.Tensor], ctx: MappingContext,
                 component: str = "language") -> list[torch.Tensor]:
    """The shards of all TP ranks (in rank order) -> the full HF tensors, in the row's HF order."""
    def cat(tensors, dim=0):  # one shard (TP=1, the exporter's case) is returned as it is: no copy
        return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim=dim)

    if split is Split.REPLICATED:
        return [shards[0]]
    if split is Split.COLUMN:
        return [cat(shards)]
    if split is Split.ROW:
        return [cat(shards, dim=1)]
    if split is Split.VOCAB:
        return [cat(shards)[:ctx.vocab_size]]
    if split is Split.GATE_UP:
        halves = [s.chunk(2, dim=0) for s in shards]
        return [cat([h[0] for h in halves]), cat([h[1] for h in halves])]
    if split in (Split.QKV, Split.QKV_FUSED):
        g = ctx.geometry(component)
        per = g.num_heads // g.num_query_groups
        full = cat(shards)  # groups are contiguous across ranks
        rest = tuple(full.shape[1:])
        grouped = full.reshape((g.num_query_groups, (per + 2) * g.head_dim) + rest)
        q, k, v = grouped.split([per * g.head_dim, g.head_dim, g.head_dim], dim=1)
        q, k, v = (x.reshape((-1,) + rest) for x in (q, k, v))
        return [torch.cat([q, k, v], dim=0)] if split is Split.QKV_FUSED else [q, k, v]
    raise ValueError(f"unknown split {split!r}")


def hf_shapes_from_shard(split: Split, shard_shape: Sequence[int], ctx: MappingContext,
                         component: str = "language") -> list[tuple[int, ...]]:
    """Full HF shapes of a row, from the shape of one TP shard (what merge_shards returns)."""
    tp, shape = ctx.tp_size, tuple(shard_shape)
    rest = shape[1:]
    if split is Split.REPLICATED:
        return [shape]
    if split is Split.COLUMN:
        return [(shape[0] * tp,) + rest]
    if split is Split.ROW:
        return [(shape[0], shape[1] * tp) + shape[2:]]
    if split is Split.VOCAB:
        return [(ctx.vocab_size,) + rest]
    if split is Split.GATE_UP:
        return [(shape[0] // 2 * tp,) + rest] * 2
    if split in (Split.QKV, Split.QKV_FUSED):
        g = ctx.geometry(component)
        q, kv = (g.num_heads * g.head_dim,) + rest, (g.num_query_groups * g.head_dim,) + rest
        return [((g.num_heads + 2 * g.num_query_groups) * g.head_dim,) + rest] if split is Split.QKV_FUSED else [q, kv, kv]
    raise ValueError(f"unknown split {split!r}")


def tp_gather_dim(split: Split) -> int:
    """The dim along which TP shards have equal shape (all shards of a row have the same shape)."""
    return 1 if split is Split.ROW else 0
