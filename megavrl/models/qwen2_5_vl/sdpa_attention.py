"""Core attention of the local (non-Transformer-Engine) layer specs: torch's fused
``scaled_dot_product_attention`` instead of Megatron-Core's ``DotProductAttention``.

Megatron's local attention is unfused: it materialises the [B, heads, S, S] scores and takes
its segments as an explicit [B, 1, S, S] mask, so every layer costs O(S^2) time and memory even
where the mask keeps a small block diagonal (the vision tower's 16-64-patch windows) or a
triangle (causal text). This module is a drop-in replacement (same constructor and forward
contract, so ``SelfAttention`` builds and calls it unchanged) that never builds an [S, S] mask
and computes only what is attended to:

- text (``[S, B, heads, head_dim]``, causal mask types): ``attention_mask`` is a key-padding mask
  [B, 1, 1, S] (True = padded; Transformer Engine's form for ``padding_causal``) or None. Rows
  whose real tokens are one contiguous span (left or right padding) run causal attention on that
  span only; rows with the same span share one call. Padded query positions get zeros: nothing
  may read them (they are masked as keys, and their logits are outside every loss mask).
- segments (packed ``thd``: ``packed_seq_params.cu_seqlens_q``, the vision tower's windows and
  frames, ``[T, heads, head_dim]``): attention inside each segment; segments of equal length are
  batched into one call (windows mostly are).
- anything else (a full [B or 1, 1, Sq, Sk] mask, True = masked, or a padding mask with holes)
  runs SDPA with that boolean mask, as ``DotProductAttention`` would apply it.

Numerics: softmax scale 1/sqrt(head_dim) unless ``softmax_scale`` is given;
``apply_query_key_layer_scaling`` divides and re-multiplies the same factor in Megatron, so it
changes nothing here. SDPA's CPU kernels accumulate the scores, the softmax and the weighted sum
in fp32 also for bf16/fp16 inputs, which is what ``attention_softmax_in_fp32`` asks for. At fp32
the results equal ``DotProductAttention``'s within rounding (tests/models/qwen2_5_vl/test_sdpa_attention.py).
Attention dropout (``config.attention_dropout``, training only) is SDPA's, drawn under Megatron's
model-parallel RNG tracker as ``DotProductAttention`` draws its own.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

_CAUSAL = (AttnMaskType.causal, AttnMaskType.padding_causal)


class SDPACoreAttention(MegatronModule):
    """Megatron core attention on ``torch.nn.functional.scaled_dot_product_attention``.

    Constructor: as ``megatron.core.transformer.dot_product_attention.DotProductAttention``.
    forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
    packed_seq_params=None):
        query [Sq, B, heads, head_dim], key/value [Sk, B, kv_heads, head_dim] (GQA: kv_heads
        divides heads), or [T, heads, head_dim] with packed ``thd`` params. Returns
        [Sq, B, heads * head_dim] ([T, heads * head_dim] packed). Masks: see the module docstring.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(f"context_parallel_size={config.context_parallel_size}: context parallelism needs "
                             "Transformer Engine's attention; use the TE layer spec")
        if config.window_size is not None:
            raise ValueError(f"window_size={config.window_size}: sliding-window attention is not implemented by "
                             "SDPACoreAttention; use Megatron's DotProductAttention or TE")
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type={config.softmax_type!r} is not supported by SDPACoreAttention "
                             "(only 'vanilla')")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        # Heads per TP rank come from the shapes of query/key/value: nothing here depends on TP.
        self.softmax_scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by SDPACoreAttention")
        causal = (self.attn_mask_type if attn_mask_type is None else attn_mask_type) in _CAUSAL
        dropout_p = self.dropout_p if self.training else 0.0
        # Megatron draws attention dropout from the model-parallel stream (different per TP rank).
        rng = (tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p > 0 and not self.config.sequence_parallel
               else nullcontext())
        attend = partial(_sdpa, scale=self.softmax_scale, dropout_p=dropout_p, gqa=query.shape[-2] != key.shape[-2])
        with rng:
            if packed_seq_params is not None:
                out = _packed_attention(attend, query, key, value, attention_mask, packed_seq_params, causal)
            else:
                out = _padded_attention(attend, query, key, value, attention_mask, causal)
        return out.flatten(-2)


def _sdpa(q, k, v, *, scale: float, dropout_p: float, gqa: bool, causal: bool = False,
          mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SDPA on [N, L, heads, head_dim] tensors (any strides) -> [N, L, heads, head_dim].
    mask: bool, True = attend (SDPA's convention), broadcast to [N, heads, Lq, Lk]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         dropout_p=dropout_p, is_causal=causal, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


def _padded_attention(attend: Callable, query, key, value, attention_mask, causal: bool) -> torch.Tensor:
    """[S, B, h, d] layout: causal + key padding by spans, else SDPA with the given mask.
    Returns [Sq, B, heads, head_dim]."""
    q, k, v = (x.transpose(0, 1) for x in (query, key, value))  # [B, S, h, d] views
    batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    padding = attention_mask is not None and attention_mask.shape[-2] == 1
    if attention_mask is None or (padding and not attention_mask.any()):
        if causal and sq != sk and sq > 1:
            raise ValueError(f"causal attention needs as many queries as keys, got {sq} and {sk}")
        return attend(q, k, v, causal=causal and sq > 1).transpose(0, 1)
    if padding and causal and sq == sk:
        spans = _real_spans(attention_mask.reshape(batch, sk))
        if spans is not None:
            return _attend_spans(attend, q, k, v, spans).transpose(0, 1)
    # General case: an explicit boolean mask, True = masked (Megatron's convention, as given; a
    # padding mask is combined with causality). SDPA takes True = attend.
    allowed = ~attention_mask.bool()
    if padding and causal:
        allowed = allowed & torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
    return attend(q, k, v, mask=allowed).transpose(0, 1)


def _real_spans(padded: torch.Tensor) -> Optional[list[tuple[int, int]]]:
    """[B, S] bool (True = padded) -> each row's real tokens as (start, stop), or None when some
    row's real tokens are not contiguous. A row with no real token gives (0, 0)."""
    real = ~padded.bool()
    count = real.sum(dim=1)
    first = torch.where(count > 0, real.int().argmax(dim=1), 0)
    positions = torch.arange(real.shape[1], device=real.device)
    inside = (positions >= first[:, None]) & (positions < (first + count)[:, None])
    if not torch.equal(inside, real):
        return None
    return list(zip(first.tolist(), (first + count).tolist()))


def _attend_spans(attend: Callable, q, k, v, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Causal attention of each row inside its real span; [B, S, h, d] -> [B, S, heads, head_dim],
    zeros at padded query positions. Rows with the same span run as one batch."""
    batch, seq = q.shape[0], q.shape[1]
    rows_of: dict[tuple[int, int], list[int]] = {}
    for row, span in enumerate(spans):
        rows_of.setdefault(span, []).append(row)
    if len(rows_of) == 1 and spans[0] == (0, seq):
        return attend(q, k, v, causal=True)
    out = q.new_zeros(batch, seq, q.shape[2], v.shape[3])
    for (start, stop), rows in rows_of.items():
        if stop == start:
            continue
        idx = slice(None) if len(rows) == batch else torch.tensor(rows, device=q.device)
        part = attend(q[idx, start:stop], k[idx, start:stop], v[idx, start:stop], causal=True)
        out[idx, start:stop] = part
    return out


def _packed_attention(attend: Callable, query, key, value, attention_mask, params: PackedSeqParams,
                      causal: bool) -> torch.Tensor:
    """[T, h, d] packed segments (``thd``): attention inside each [cu[i], cu[i+1]). Returns [T, heads, head_dim]."""
    if params.qkv_format != "thd":
        raise ValueError(f"packed_seq_params.qkv_format={params.qkv_format!r}: SDPACoreAttention takes packed "
                         "sequences in 'thd' format only")
    if attention_mask is not None:
        raise ValueError("packed sequences take their segments from packed_seq_params, not from an attention_mask")
    cu = params.cu_seqlens_q
    padded = [p for p in (params.cu_seqlens_q_padded, params.cu_seqlens_kv_padded) if p is not None]
    if not torch.equal(cu, params.cu_seqlens_kv) or any(not torch.equal(cu, p) for p in padded):
        raise ValueError("SDPACoreAttention needs the same query and key segments (cu_seqlens_q == cu_seqlens_kv, "
                         "no separate padded boundaries)")
    total = query.shape[0]
    if int(cu[-1]) != total or int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens {cu.tolist()} do not cover the {total} packed tokens")
    lengths = cu[1:] - cu[:-1]
    distinct = [n for n in torch.unique(lengths).tolist() if n > 0]
    if len(distinct) == 1:  # one length: the segments are a reshape away
        n = distinct[0]
        q, k, v = (x.view(total // n, n, *x.shape[1:]) for x in (query, key, value))
        return attend(q, k, v, causal=causal).reshape(total, query.shape[1], value.shape[2])
    # Several lengths: gather the segments of each length into one batch, scatter back.
    starts = cu[:-1].to(torch.long)
    outs, indices = [], []
    for n in distinct:
        index = (starts[lengths == n][:, None] + torch.arange(n, device=starts.device)).reshape(-1)
        q, k, v = (x.index_select(0, index).view(-1, n, *x.shape[1:]) for x in (query, key, value))
        outs.append(attend(q, k, v, causal=causal).reshape(-1, query.shape[1], value.shape[2]))
        indices.append(index)
    out = torch.cat(outs)
    return out.new_empty(total, *out.shape[1:]).index_copy(0, torch.cat(indices), out)
