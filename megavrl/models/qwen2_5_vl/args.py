"""The sizes of Qwen2.5-VL: dataclasses of numbers, read from the HF config, and the tiny presets.

Every size of a real model is read from its HF config (``config.json``), never written down per
model size:

    text = TextSizes.from_hf(hf_config)                    # decoder layers, widths, heads, M-RoPE ...
    vision = VisionSizes.from_hf(hf_config.vision_config)  # depth, widths, patch/merge sizes, windows ...

The Megatron ``TransformerConfig``s are derived from these in :mod:`.config` (text) and
:mod:`.vision` (vision tower); :mod:`.flops` counts a training step's FLOPs from the same sizes.
The tiny presets (:data:`TINY_PRESETS`) are the debug models every test and demo builds with
``megavrl make-tiny-model`` (:mod:`megavrl.checkpoint.tiny`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch.nn.functional as F

# HF's vision blocks and merger use RMSNorm with a fixed epsilon (not read from the config).
VISION_NORM_EPS = 1e-6
# Used by transformers when the vision config names no rope_theta (the published configs don't).
DEFAULT_VISION_ROPE_THETA = 10000.0

VISION_ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu,
                      "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass(frozen=True)
class TextSizes:
    """Sizes of the text decoder, read from the HF config. Field names follow Megatron's."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    ffn_hidden_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...]
    tie_word_embeddings: bool
    max_position_embeddings: int
    initializer_range: float
    hidden_act: str

    @classmethod
    def from_hf(cls, hf_config) -> "TextSizes":
        text = getattr(hf_config, "text_config", None) or hf_config
        rope = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
                    or getattr(hf_config, "rope_scaling", None) or {})
        if "mrope_section" not in rope:
            raise ValueError("HF config has no mrope_section (looked in text_config.rope_parameters and "
                             "rope_scaling): not a Qwen2.5-VL config")
        theta = rope.get("rope_theta", getattr(text, "rope_theta", None))
        if theta is None:
            raise ValueError("HF config has no rope_theta")
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        mrope = tuple(int(x) for x in rope["mrope_section"])
        if 2 * sum(mrope) != head_dim:
            raise ValueError(f"mrope_section {list(mrope)} must sum to head_dim / 2 = {head_dim // 2}")
        return cls(
            num_layers=int(text.num_hidden_layers), hidden_size=int(text.hidden_size),
            num_attention_heads=heads, num_query_groups=int(getattr(text, "num_key_value_heads", None) or heads),
            kv_channels=head_dim, ffn_hidden_size=int(text.intermediate_size), vocab_size=int(text.vocab_size),
            rms_norm_eps=float(text.rms_norm_eps), rope_theta=float(theta), mrope_section=mrope,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            max_position_embeddings=int(getattr(text, "max_position_embeddings", 32768)),
            initializer_range=float(getattr(text, "initializer_range", 0.02)),
            hidden_act=str(getattr(text, "hidden_act", "silu")))


@dataclass(frozen=True)
class VisionSizes:
    """The sizes of a Qwen2.5-VL vision tower, read from its HF vision config. Units: patches,
    pixels for window_size, channels for the hidden sizes."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    window_size: int
    out_hidden_size: int
    fullatt_block_indexes: tuple[int, ...]
    hidden_act: str
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch in pixel_values: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def merged_dim(self) -> int:
        """Width of the merger's input: hidden_size for each of the m^2 patches of a merge unit."""
        return self.hidden_size * self.spatial_merge_size ** 2

    @classmethod
    def from_hf(cls, hf_vision_config: Any) -> "VisionSizes":
        """From a ``Qwen2_5_VLVisionConfig``, a full ``Qwen2_5_VLConfig`` or the dict of either
        (``config.json``'s ``vision_config``; the published files say ``in_chans``)."""
        cfg = hf_vision_config
        if not isinstance(cfg, Mapping):
            cfg = getattr(cfg, "vision_config", cfg)
            cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)
        elif "vision_config" in cfg:
            cfg = cfg["vision_config"]
            cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg

        def need(key):
            if key not in cfg:
                raise ValueError(f"vision config has no {key!r} (keys: {sorted(cfg)})")
            return cfg[key]

        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", DEFAULT_VISION_ROPE_THETA))
        sizes = cls(
            depth=int(need("depth")), hidden_size=int(need("hidden_size")),
            intermediate_size=int(need("intermediate_size")), num_heads=int(need("num_heads")),
            in_channels=int(cfg.get("in_channels", cfg.get("in_chans", 3))),
            patch_size=int(need("patch_size")), temporal_patch_size=int(need("temporal_patch_size")),
            spatial_merge_size=int(need("spatial_merge_size")), window_size=int(need("window_size")),
            out_hidden_size=int(need("out_hidden_size")),
            fullatt_block_indexes=tuple(int(i) for i in need("fullatt_block_indexes")),
            hidden_act=str(cfg.get("hidden_act", "silu")), rope_theta=float(theta))
        if sizes.hidden_size % sizes.num_heads:
            raise ValueError(f"vision hidden_size={sizes.hidden_size} is not divisible by num_heads={sizes.num_heads}")
        if sizes.hidden_act not in VISION_ACTIVATIONS:
            raise ValueError(f"vision hidden_act={sizes.hidden_act!r} is not supported; "
                             f"use one of {sorted(VISION_ACTIVATIONS)}")
        bad = [i for i in sizes.fullatt_block_indexes if not 0 <= i < sizes.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} are outside the {sizes.depth} vision blocks")
        return sizes


# ---------------------------------------------------------------------------------------------
# Tiny presets
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TinyPreset:
    """Sizes of a tiny Qwen2.5-VL, the debug model of the tests and demos (written by
    :func:`megavrl.checkpoint.tiny.make_tiny_model`). Field names follow the HF config."""

    # text
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    mrope_section: tuple[int, int, int] = (8, 12, 12)
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bpe_vocab_size: int = 1000  # tokens learned by BPE, special tokens come on top
    # vision
    vision_depth: int = 4
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 256
    vision_num_heads: int = 2
    vision_fullatt_block_indexes: tuple[int, ...] = (2,)
    vision_window_size: int = 56
    tokens_per_second: int = 2
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    extra: dict = field(default_factory=dict)


TINY_PRESETS: dict[str, TinyPreset] = {
    "tiny": TinyPreset(),
    "tiny-tied": TinyPreset(tie_word_embeddings=True),
    # ~30M parameters: wide and deep enough that a CPU step is dominated by matmuls, not per-op
    # overheads, as it is at real sizes (the benchmarks' default).
    "small": TinyPreset(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=2, vision_hidden_size=256, vision_intermediate_size=512,
                        vision_num_heads=4),
}
