"""The ``model`` section of the config: which checkpoint to train, in which dtype, what is frozen."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class ModelConfig:
    hf_dir: Optional[str] = None
    """Hugging Face Qwen2.5-VL directory (config, tokenizer, processor, safetensors)."""
    megatron_ckpt: Optional[str] = None
    """Megatron distributed checkpoint to start from instead of hf_dir's weights (hf_dir still
    supplies config, tokenizer and processor)."""
    dtype: str = "auto"
    """float32 | bfloat16 | float16 | auto (bfloat16 on GPU, float32 on CPU)."""
    freeze_vision: bool = False
    freeze_projector: bool = False
    recompute_activations: bool = False
    """Megatron full activation recomputation (saves memory, costs ~1/3 more compute)."""
