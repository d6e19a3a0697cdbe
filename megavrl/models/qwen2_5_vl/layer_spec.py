"""The one transformer layer both Qwen2.5-VL towers are built from, as a Megatron-Core ``ModuleSpec``.

Pre-norm self-attention and a gated MLP, each followed by bias-dropout-add. The text decoder and
the vision blocks differ only in the attention mask type (causal with key padding vs packed
segments, no mask) and in their ``TransformerConfig`` (biases, activation, sizes).

Megatron's local modules on the CPU, Transformer Engine's on a GPU where TE imports. Both use
separate norm modules (``input_layernorm``, ``pre_mlp_layernorm``) instead of TE's norm-fused
linears, so the parameter names (``self_attention.linear_qkv``, ``self_attention.linear_proj``,
``mlp.linear_fc1``, ``mlp.linear_fc2``), and so the one mapping table in
:mod:`megavrl.checkpoint.mapping`, are the same on both. Core attention:
:class:`~megavrl.models.qwen2_5_vl.sdpa_attention.SDPACoreAttention` on the local spec,
``TEDotProductAttention`` on the TE spec.
"""
from __future__ import annotations

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megavrl.parallel.distributed import transformer_engine_available


def transformer_layer_spec(attn_mask_type: AttnMaskType, use_te: bool | None = None) -> ModuleSpec:
    """One pre-norm layer whose self-attention takes ``attn_mask_type``.

    use_te: Transformer Engine modules; default when TE imports and CUDA is available.
    """
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    if use_te is None:
        use_te = transformer_engine_available()
    if use_te:
        from megatron.core.extensions.transformer_engine import (TEColumnParallelLinear, TEDotProductAttention,
                                                                 TENorm, TERowParallelLinear)
        norm, column, row, core = TENorm, TEColumnParallelLinear, TERowParallelLinear, TEDotProductAttention
    else:
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        from megavrl.models.qwen2_5_vl.sdpa_attention import SDPACoreAttention

        norm, column, row, core = WrappedTorchNorm, ColumnParallelLinear, RowParallelLinear, SDPACoreAttention
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": attn_mask_type},
                submodules=SelfAttentionSubmodules(linear_qkv=column, core_attention=core, linear_proj=row,
                                                   q_layernorm=IdentityOp, k_layernorm=IdentityOp),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
            mlp_bda=get_bias_dropout_add,
        ),
    )
