"""The Qwen2.5-VL text decoder as a Megatron-Core ``GPTModel``: M-RoPE, GQA, QKV bias, RMSNorm,
SwiGLU, tied or untied output layer, vocabulary padded for TP.

Layer spec: :func:`megavrl.models.qwen2_5_vl.layer_spec.transformer_layer_spec` with a causal
mask type (Megatron's local modules on the CPU, Transformer Engine's on a GPU where TE imports;
the same parameter names on both).

Core attention: :class:`~megavrl.models.qwen2_5_vl.sdpa_attention.SDPACoreAttention` (torch's
fused SDPA) on the local spec, ``TEDotProductAttention`` on the TE spec. Both take mask type
``padding_causal`` and the [B, 1, 1, S] key-padding mask of :func:`padding_mask` (Megatron's
convention, True = padded) and apply causality themselves. A spec built on Megatron's own
``DotProductAttention`` would need the full bool [B, 1, S, S] of :func:`causal_padding_mask`
instead (:func:`takes_padding_mask` tells which). The TE path has not run yet (no GPU with TE
was available when it was written): check it with ``megavrl check-parity`` on the first GPU.
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megavrl.models.qwen2_5_vl.config import Qwen2_5_VLConfigs
from megavrl.models.qwen2_5_vl.layer_spec import transformer_layer_spec


def language_layer_spec(use_te: bool | None = None) -> ModuleSpec:
    """One decoder layer: pre-norm causal self-attention (GQA, QKV bias) and a gated MLP.

    use_te: Transformer Engine modules; default when TE imports and CUDA is available.
    """
    return transformer_layer_spec(AttnMaskType.padding_causal, use_te)


def build_language_model(configs: Qwen2_5_VLConfigs, pre_process: bool, post_process: bool,
                         parallel_output: bool = True, spec: ModuleSpec | None = None) -> GPTModel:
    """The text decoder of this pipeline stage (``pre_process``: holds the embedding;
    ``post_process``: holds the final norm and the output layer).

    parallel_output: logits stay split over the vocabulary across TP ranks (what
    :mod:`megavrl.rl.logprobs` consumes); False gathers the full (padded) vocabulary.
    """
    text = configs.text
    return GPTModel(
        config=configs.language,
        transformer_layer_spec=spec if spec is not None else language_layer_spec(),
        vocab_size=configs.padded_vocab_size,
        max_sequence_length=text.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=text.tie_word_embeddings,
        position_embedding_type="mrope",
        rotary_base=text.rope_theta,
    )


def causal_padding_mask(attention_mask: torch.Tensor | None, seq_len: int | None = None,
                        batch: int | None = None, device=None) -> torch.Tensor:
    """Megatron's attention mask, bool [B, 1, S, S], True = masked: a query never sees later
    keys nor padded keys (``attention_mask`` [B, S], 1 = real token; None = no padding).

    Padded query rows see nothing; their outputs are meaningless and must be ignored.
    """
    if attention_mask is None:
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu(1)
        return causal.view(1, 1, seq_len, seq_len).expand(batch, 1, seq_len, seq_len)
    b, s = attention_mask.shape
    causal = torch.ones(s, s, dtype=torch.bool, device=attention_mask.device).triu(1)
    padded_key = ~attention_mask.bool()
    return causal.view(1, 1, s, s) | padded_key.view(b, 1, 1, s)


def padding_mask(attention_mask: torch.Tensor | None, seq_len: int, batch: int, device=None) -> torch.Tensor:
    """Transformer Engine's key-padding mask, bool [B, 1, 1, S], True = padded."""
    if attention_mask is None:
        return torch.zeros(batch, 1, 1, seq_len, dtype=torch.bool, device=device)
    return ~attention_mask.bool().view(attention_mask.shape[0], 1, 1, attention_mask.shape[1])


def takes_padding_mask(gpt_model) -> bool:
    """Whether a built GPTModel's attention takes the [B, 1, 1, S] key-padding mask of
    :func:`padding_mask` (SDPACoreAttention, Transformer Engine) rather than the full [B, 1, S, S]
    mask of :func:`causal_padding_mask` (Megatron's DotProductAttention)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    layers = gpt_model.decoder.layers
    return not (len(layers) and isinstance(layers[0].self_attention.core_attention, DotProductAttention))
