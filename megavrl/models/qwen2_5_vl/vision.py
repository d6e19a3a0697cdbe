"""The Qwen2.5-VL vision tower in Megatron-Core, tensor-parallel.

Same function as transformers' ``Qwen2_5_VisionTransformerPretrainedModel``: pixel patches ->
patch embedding -> ``depth`` pre-norm transformer blocks (RMSNorm, attention with QKV bias and
2D rotary embedding, SwiGLU MLP with bias), most of them attending inside windows and the
``fullatt_block_indexes`` ones inside whole frames -> 2x2 patch merger -> LLM-width tokens.

Built from Megatron-Core parts: a ``TransformerBlock`` of ``TransformerLayer``s from a
``ModuleSpec`` (local spec on CPU, Transformer Engine on GPU when it imports), Megatron's
``ColumnParallelLinear`` / ``RowParallelLinear`` for the merger. Under TP, attention heads, the
MLP's intermediate dimension and the merger's hidden dimension are split across ranks; the patch
embedding and the norms are replicated. The output is complete (all-reduced) on every TP rank.

The tower runs on the first pipeline stage only; its whole input is one sequence (batch 1, in
Megatron's [s, b, h] layout) of every patch of every image and video of the micro-batch.

Attention segments: packed-sequence ("thd") boundaries, cu_seqlens of the windows or of the
frames, which both core attentions of the specs take: SDPACoreAttention (local spec, torch's
fused SDPA batched over equal-length segments) and Transformer Engine's. Neither builds an
[S, S] mask. (A spec on Megatron's DotProductAttention gets block-diagonal boolean masks
[1, 1, S, S] instead: O(S^2) memory and time.)
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig

from megavrl.log import get_logger
from megavrl.models.qwen2_5_vl.args import VISION_ACTIVATIONS, VISION_NORM_EPS, VisionSizes
from megavrl.models.qwen2_5_vl.layer_spec import transformer_layer_spec
from megavrl.models.qwen2_5_vl.vision_geometry import VisionGeometry, block_diagonal_mask

log = get_logger(__name__)

def vision_transformer_config(hf_vision_config: Any, *, tensor_model_parallel_size: int = 1,
                              params_dtype: torch.dtype = torch.float32, fused_kernels: bool | None = None,
                              **overrides) -> TransformerConfig:
    """The Megatron ``TransformerConfig`` of the vision blocks, derived from the HF vision config.

    tensor_model_parallel_size: TP size of the job (heads, MLP and merger are split this way).
    params_dtype: dtype of the weights; torch.bfloat16 / float16 also turn on Megatron's bf16 / fp16.
    fused_kernels: the bias+SwiGLU and bias+dropout+add fusions (TorchScript); default on with
        CUDA, off on the CPU. The masked-softmax fusion stays off (it needs Megatron's compiled
        CUDA extension, and the TE path does not use it) and so does RoPE fusion (TE's fused
        packed-sequence RoPE restarts positions per segment; vision positions are 2D, per patch).
    overrides: any other TransformerConfig field (e.g. recompute_granularity="full",
        recompute_method="uniform", recompute_num_layers=1, use_cpu_initialization=True).

    The vision tower is never pipeline-split (it lives on the first stage) and never uses sequence
    parallelism (its sequence is not padded to a multiple of TP), so those are fixed here.
    """
    s = VisionSizes.from_hf(hf_vision_config)
    tp = tensor_model_parallel_size
    for what, n in (("num_heads", s.num_heads), ("intermediate_size", s.intermediate_size),
                    ("merger width (hidden_size * spatial_merge_size^2)", s.merged_dim)):
        if n % tp:
            raise ValueError(f"vision {what}={n} is not divisible by tensor_model_parallel_size={tp}; "
                             "choose a TP size that divides it")
    if fused_kernels is None:
        fused_kernels = torch.cuda.is_available()
    kwargs = dict(
        num_layers=s.depth, hidden_size=s.hidden_size, ffn_hidden_size=s.intermediate_size,
        num_attention_heads=s.num_heads, num_query_groups=s.num_heads, kv_channels=s.head_dim,
        normalization="RMSNorm", layernorm_epsilon=VISION_NORM_EPS,
        gated_linear_unit=True, activation_func=VISION_ACTIVATIONS[s.hidden_act],
        add_bias_linear=True, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0,
        apply_query_key_layer_scaling=False, attention_softmax_in_fp32=True,
        rotary_interleaved=False, apply_rope_fusion=False,
        bias_activation_fusion=fused_kernels and s.hidden_act in ("silu", "swish"),
        bias_dropout_fusion=fused_kernels, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, sequence_parallel=False,
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def vision_layer_spec(use_te: bool | None = None) -> ModuleSpec:
    """The ``ModuleSpec`` of one vision block: pre-norm self-attention (no mask type: the segments
    come as packed-sequence boundaries) and a gated MLP, with the decoder layer's parameter names.

    use_te: Transformer Engine modules (GPU); default when it imports and CUDA is available.
    """
    return transformer_layer_spec(AttnMaskType.no_mask, use_te)


class PatchEmbed(torch.nn.Module):
    """Conv3d patch embedding without bias, replicated on every TP rank.

    Its weight keeps the Conv3d shape [hidden, C, T, P, P] of the HF checkpoint; since the kernel
    equals the stride and pixel_values come already cut into patches, it runs as one matmul.
    """

    def __init__(self, sizes: VisionSizes, dtype: torch.dtype):
        super().__init__()
        kernel = (sizes.temporal_patch_size, sizes.patch_size, sizes.patch_size)
        self.proj = torch.nn.Conv3d(sizes.in_channels, sizes.hidden_size, kernel_size=kernel, stride=kernel,
                                    bias=False, dtype=dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[num_patches, C*T*P*P] -> [num_patches, hidden]."""
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.reshape(weight.shape[0], -1))


class PatchMerger(MegatronModule):
    """RMSNorm each patch, concatenate the m x m patches of a merge unit, then
    Linear -> GELU -> Linear to the LLM width. fc1 is column-parallel, fc2 row-parallel."""

    def __init__(self, config: TransformerConfig, sizes: VisionSizes):
        super().__init__(config=config)
        self.merged_dim = sizes.merged_dim
        self.ln_q = torch.nn.RMSNorm(sizes.hidden_size, eps=VISION_NORM_EPS, dtype=config.params_dtype)
        self.linear_fc1 = tensor_parallel.ColumnParallelLinear(
            sizes.merged_dim, sizes.merged_dim, config=config, init_method=config.init_method,
            bias=True, gather_output=False, skip_bias_add=False)
        self.linear_fc2 = tensor_parallel.RowParallelLinear(
            sizes.merged_dim, sizes.out_hidden_size, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_patches, 1, hidden] (merge units contiguous) -> [num_patches / m^2, out_hidden]."""
        x = self.ln_q(hidden_states).reshape(-1, 1, self.merged_dim)
        x, _ = self.linear_fc1(x)
        x, _ = self.linear_fc2(F.gelu(x))
        return x.squeeze(1)


class Qwen2_5_VisionModel(MegatronModule):
    """Qwen2.5-VL vision tower: ``forward(pixel_values, grid_thw) -> [num_patches / m^2, out_hidden]``.

    Args:
        hf_vision_config: ``Qwen2_5_VLVisionConfig`` (or the full ``Qwen2_5_VLConfig``, or a dict).
        config: the Megatron config of the blocks, from :func:`vision_transformer_config`.
        spec: the layer ``ModuleSpec``; default :func:`vision_layer_spec` (TE when available).
        freeze_vision: patch embedding and transformer blocks get requires_grad=False and run
            without autograd (saves their activations).
        freeze_projector: the merger (the projector into the LLM width) gets requires_grad=False.
        Both flags together freeze the whole tower.

    Parameter names (Megatron side of the checkpoint mapping): ``patch_embed.proj.weight``,
    ``decoder.layers.{i}.{input_layernorm, self_attention.linear_qkv, self_attention.linear_proj,
    pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2}.*``, ``merger.{ln_q, linear_fc1, linear_fc2}.*``.
    """

    def __init__(self, hf_vision_config: Any, config: TransformerConfig, spec: ModuleSpec | None = None,
                 freeze_vision: bool = False, freeze_projector: bool = False):
        super().__init__(config=config)
        self.sizes = VisionSizes.from_hf(hf_vision_config)
        if config.num_layers != self.sizes.depth or config.hidden_size != self.sizes.hidden_size:
            raise ValueError(f"TransformerConfig (num_layers={config.num_layers}, hidden_size={config.hidden_size}) "
                             f"does not match the HF vision config (depth={self.sizes.depth}, hidden_size="
                             f"{self.sizes.hidden_size}); build it with vision_transformer_config()")
        if config.sequence_parallel or config.pipeline_model_parallel_size != 1:
            raise ValueError("the vision tower runs without sequence parallelism on one pipeline stage: "
                             "build its config with vision_transformer_config()")
        spec = spec if spec is not None else vision_layer_spec()
        self.packed_attention = _uses_packed_attention(spec)
        self.patch_embed = PatchEmbed(self.sizes, config.params_dtype)
        self.decoder = TransformerBlock(config=config, spec=spec, post_layer_norm=False,
                                        pre_process=True, post_process=True)
        self.merger = PatchMerger(config, self.sizes)
        self.full_attention_layers = frozenset(self.sizes.fullatt_block_indexes)
        self.freeze(freeze_vision=freeze_vision, freeze_projector=freeze_projector)
        s = self.sizes
        log.info("vision tower: %d blocks (full attention in %s, else %d-px windows), hidden %d, %d heads over "
                 "TP %d, attention %s%s%s", s.depth, sorted(self.full_attention_layers), s.window_size,
                 s.hidden_size, s.num_heads, config.tensor_model_parallel_size,
                 getattr(_core_attention(spec), "__name__", "custom") + (
                     " on packed segments" if self.packed_attention else " with block-diagonal masks"),
                 ", encoder frozen" if freeze_vision else "", ", merger frozen" if freeze_projector else "")

    def freeze(self, freeze_vision: bool, freeze_projector: bool) -> None:
        """Set requires_grad=False on the encoder (patch embedding + blocks) and/or the merger."""
        self.encoder_frozen = freeze_vision
        for module, frozen in ((self.patch_embed, freeze_vision), (self.decoder, freeze_vision),
                               (self.merger, freeze_projector)):
            for p in module.parameters():
                p.requires_grad_(not frozen)

    def set_input_tensor(self, input_tensor) -> None:
        """The tower is never a later pipeline stage: there is no input tensor to receive."""

    def geometry(self, grid_thw: torch.Tensor, device=None) -> VisionGeometry:
        s = self.sizes
        return VisionGeometry.from_grid(grid_thw, spatial_merge_size=s.spatial_merge_size, patch_size=s.patch_size,
                                        window_size=s.window_size, head_dim=s.head_dim, rope_theta=s.rope_theta,
                                        device=device)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values: [num_patches, C*T*P*P] as the Qwen processor emits them (any float dtype).
        grid_thw: [num_images_or_videos, 3] int, (t, h, w) in patches per image or video.
        Returns [num_patches / spatial_merge_size^2, out_hidden_size] in params dtype, one row per
        LLM vision token, in the processor's order (image/video after image/video, as the
        <|image_pad|>/<|video_pad|> tokens of the prompt)."""
        s = self.sizes
        if pixel_values.dim() != 2 or pixel_values.shape[1] != s.patch_dim:
            raise ValueError(f"pixel_values must be [num_patches, {s.patch_dim}] (C*T*P*P = {s.in_channels}*"
                             f"{s.temporal_patch_size}*{s.patch_size}*{s.patch_size}), got {tuple(pixel_values.shape)}")
        if grid_thw.shape[0] == 0 and pixel_values.shape[0] == 0:  # no image or video in this batch
            return pixel_values.new_zeros(0, s.out_hidden_size, dtype=self.patch_embed.proj.weight.dtype)
        geo = self.geometry(grid_thw, device=pixel_values.device)
        if geo.num_patches != pixel_values.shape[0]:
            raise ValueError(f"grid_thw {grid_thw.tolist()} describes {geo.num_patches} patches but pixel_values "
                             f"has {pixel_values.shape[0]}")
        unit = s.spatial_merge_size ** 2
        with torch.no_grad() if self.encoder_frozen else nullcontext():
            x = self.patch_embed(pixel_values)
            # Window order: merge units window by window, so every window (and frame) is contiguous.
            x = x.view(-1, unit, x.shape[-1])[geo.window_index].reshape(-1, 1, x.shape[-1])
            x = self._blocks(x, geo)
        merged = self.merger(x)
        return merged[torch.argsort(geo.window_index)]

    def _blocks(self, hidden_states: torch.Tensor, geo: VisionGeometry) -> torch.Tensor:
        """Run the transformer layers on [S, 1, hidden], each with its attention segments."""
        if self.packed_attention:
            def packed(cu):
                cu, longest = cu.to(torch.int32), int((cu[1:] - cu[:-1]).max())
                return dict(attention_mask=None, packed_seq_params=PackedSeqParams(
                    qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest, max_seqlen_kv=longest))
            full, window = packed(geo.cu_frames), packed(geo.cu_windows)
        else:
            device = hidden_states.device
            full = dict(attention_mask=block_diagonal_mask(geo.cu_frames, device))
            window = dict(attention_mask=block_diagonal_mask(geo.cu_windows, device))
        rotary = geo.rotary
        recompute = self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled()
        for i, layer in enumerate(self.decoder.layers):
            segments = full if i in self.full_attention_layers else window
            if recompute:
                hidden_states = tensor_parallel.checkpoint(
                    _layer_forward(layer, segments), self.config.distribute_saved_activations, hidden_states, rotary)
            else:
                hidden_states = _layer_forward(layer, segments)(hidden_states, rotary)
        return hidden_states


def _layer_forward(layer, segments: dict):
    def run(hidden_states, rotary):
        out, _ = layer(hidden_states, rotary_pos_emb=rotary, **segments)
        return out
    return run


def _core_attention(spec: ModuleSpec) -> type:
    core = spec.submodules.self_attention.submodules.core_attention
    return core.module if isinstance(core, ModuleSpec) else core


def _uses_packed_attention(spec: ModuleSpec) -> bool:
    """SDPACoreAttention and Transformer Engine's attention take segments as packed-sequence
    boundaries; Megatron's DotProductAttention only takes a mask."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    core = _core_attention(spec)
    return not (isinstance(core, type) and issubclass(core, DotProductAttention))
