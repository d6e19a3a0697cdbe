"""HF Qwen2.5-VL config -> the Megatron-Core configs of the language model and the vision tower.

Every size is read from the HF config (``config.json`` through ``AutoConfig``; both the nested
``text_config`` form that transformers 5 writes and the flat form of Qwen's published checkpoints,
with ``rope_scaling.mrope_section``), never written down per model size.

    cfg = build_configs("/path/to/Qwen2.5-VL-7B-Instruct", tp=2, pp=1)
    cfg.language            # megatron TransformerConfig of the text decoder
    cfg.vision              # megatron TransformerConfig of the vision blocks (vision.py builds it)
    cfg.text                # TextSizes (args.py): layers, widths, heads, vocabulary, M-RoPE ...
    cfg.vision_sizes        # VisionSizes (args.py): depth, hidden, heads, patch/merge sizes, windows ...
    cfg.padded_vocab_size   # vocab padded to a multiple of 128 * TP, as Megatron pads it
"""
from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from megavrl.models.qwen2_5_vl.args import TextSizes, VisionSizes

SUPPORTED_MODEL_TYPE = "qwen2_5_vl"
VOCAB_DIVISIBLE_BY = 128  # Megatron's --make-vocab-size-divisible-by default, multiplied by TP


def require_hf_dir(path: str | os.PathLike, what: str = "Hugging Face directory") -> None:
    """Raise a :class:`megavrl.errors.UserError` naming ``what`` unless ``path`` is a local
    directory with a ``config.json``. Called before transformers sees the path: given a path that
    does not exist, transformers takes it for a Hub repo id and retries the network for a while."""
    from pathlib import Path

    from megavrl.errors import UserError

    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {str(path)!r} does not exist: give a Hugging Face Qwen2.5-VL directory "
                        f"(make a tiny one with `megavrl make-tiny-model --out DIR`)")
    if not path.is_dir():
        raise UserError(f"{what} {str(path)!r} is not a directory: give a Hugging Face Qwen2.5-VL directory")
    if not (path / "config.json").is_file():
        raise UserError(f"{what} {str(path)!r} has no config.json: give a Hugging Face Qwen2.5-VL directory")


def load_hf_config(source: Any):
    """A ``Qwen2_5_VLConfig`` from a HF directory, a config dict, or a config object.

    Refuses any other ``model_type`` with a message naming it, and a path that is not a local
    HF directory (:func:`require_hf_dir`). A directory's ``config.json`` is parsed once per process
    (validation, the prompt builder, the actor and the reference model share it); each caller gets
    its own copy, and a rewritten file is parsed again.
    """
    from transformers import PretrainedConfig

    if isinstance(source, (str, os.PathLike)):
        require_hf_dir(source)
        path = os.path.join(os.path.realpath(source), "config.json")
        stat = os.stat(path)
        cfg = copy.deepcopy(_parse_hf_dir(os.path.dirname(path), (stat.st_mtime_ns, stat.st_size)))
    elif isinstance(source, dict):
        from transformers import Qwen2_5_VLConfig

        if source.get("model_type", SUPPORTED_MODEL_TYPE) != SUPPORTED_MODEL_TYPE:
            raise ValueError(f"HF config has model_type={source['model_type']!r}; megavrl supports "
                             f"{SUPPORTED_MODEL_TYPE!r} (Qwen2.5-VL) only")
        cfg = Qwen2_5_VLConfig(**{k: v for k, v in source.items() if k != "model_type"})
    elif isinstance(source, PretrainedConfig):
        cfg = source
    else:
        raise TypeError(f"expected a HF directory, a config dict or a PretrainedConfig, not {type(source).__name__}")
    if getattr(cfg, "model_type", None) != SUPPORTED_MODEL_TYPE:
        raise ValueError(f"HF config has model_type={getattr(cfg, 'model_type', None)!r}; megavrl supports "
                         f"{SUPPORTED_MODEL_TYPE!r} (Qwen2.5-VL) only")
    return cfg


@functools.lru_cache(maxsize=8)
def _parse_hf_dir(directory: str, stamp: tuple[int, int]):
    """``AutoConfig`` of a local HF directory, after checking its model type; ``stamp`` (mtime, size
    of config.json) keys the cache."""
    from transformers import AutoConfig

    model_type = _peek_model_type(directory)
    if model_type is not None and model_type != SUPPORTED_MODEL_TYPE:
        raise ValueError(f"{directory}: config.json has model_type={model_type!r}; megavrl supports "
                         f"{SUPPORTED_MODEL_TYPE!r} (Qwen2.5-VL) only")
    return AutoConfig.from_pretrained(directory)


def _peek_model_type(directory) -> str | None:
    import json
    from pathlib import Path

    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("model_type")


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    """Round up to a multiple of ``divisible_by * tp``, as Megatron pads its vocabulary."""
    multiple = divisible_by * tp
    return (vocab_size + multiple - 1) // multiple * multiple


def check_tp_pp(text: TextSizes, tp: int, pp: int, vision_heads: int | None = None,
                options: tuple[str, str] | None = None) -> None:
    """Refuse layouts the model cannot be split into, naming the size that does not fit (the one
    check for the converter, the model builder and config validation).

    vision_heads: the vision tower's heads, split over the same TP ranks.
    options: the names the user set TP and PP with (e.g. ``("parallel.tp", "parallel.pp")``), added
        to the message next to Megatron's names, with the HF name of the KV groups.
    """
    tp_name = "tensor_model_parallel_size" + (f" ({options[0]})" if options else "")
    pp_name = "pipeline_model_parallel_size" + (f" ({options[1]})" if options else "")
    groups = "num_query_groups" + (" (num_key_value_heads)" if options else "")
    sizes = [("num_attention_heads", text.num_attention_heads), (groups, text.num_query_groups),
             ("ffn_hidden_size", text.ffn_hidden_size)]
    if vision_heads is not None:
        sizes.append(("vision num_heads", vision_heads))
    for what, n in sizes:
        if n % tp:
            raise ValueError(f"{what}={n} is not divisible by {tp_name}={tp}: choose a TP size that divides it")
    if text.num_layers % pp:
        raise ValueError(f"num_layers={text.num_layers} is not divisible by {pp_name}={pp}: "
                         f"choose a PP size that divides it")


def language_transformer_config(text: TextSizes, *, tp: int = 1, pp: int = 1,
                                params_dtype: torch.dtype = torch.float32, fused_kernels: bool | None = None,
                                **overrides) -> "TransformerConfig":  # noqa: F821
    """The Megatron ``TransformerConfig`` of the text decoder.

    fused_kernels: bias+SwiGLU and bias+dropout+add fusions; default on with CUDA, off on the CPU
        (they do not run there). Masked-softmax, RoPE, gradient-accumulation fusions and persistent
        layer norm stay off (they need Apex / compiled extensions; RoPE fusion has no M-RoPE path).
    overrides: any other TransformerConfig field (recompute_granularity, sequence_parallel, ...).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    check_tp_pp(text, tp, pp)
    if text.hidden_act not in ("silu", "swish"):
        raise ValueError(f"text hidden_act={text.hidden_act!r} is not supported (Qwen2.5-VL uses silu)")
    if fused_kernels is None:
        fused_kernels = torch.cuda.is_available()
    kwargs = dict(
        num_layers=text.num_layers, hidden_size=text.hidden_size, num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_query_groups, kv_channels=text.kv_channels, ffn_hidden_size=text.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=text.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, add_qkv_bias=True,
        mrope_section=list(text.mrope_section), rotary_interleaved=False,
        hidden_dropout=0.0, attention_dropout=0.0, init_method_std=text.initializer_range,
        apply_query_key_layer_scaling=False, attention_softmax_in_fp32=True,
        bias_activation_fusion=fused_kernels, bias_dropout_fusion=fused_kernels, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=False,
        params_dtype=params_dtype, pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


@dataclass(frozen=True)
class Qwen2_5_VLConfigs:
    """Everything needed to build the Megatron Qwen2.5-VL at one (TP, PP) layout."""

    hf_config: Any = field(repr=False)
    text: TextSizes
    vision_sizes: VisionSizes
    language: Any  # TransformerConfig
    vision: Any  # TransformerConfig
    tp: int
    pp: int
    padded_vocab_size: int

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def image_token_id(self) -> int:
        return int(self.hf_config.image_token_id)

    @property
    def video_token_id(self) -> int:
        return int(self.hf_config.video_token_id)

    def rope_index_kwargs(self) -> dict:
        from megavrl.models.qwen2_5_vl.rope_index import rope_index_kwargs

        return rope_index_kwargs(self.hf_config)


def build_configs(hf: Any, tp: int = 1, pp: int = 1, params_dtype: torch.dtype = torch.float32,
                  fused_kernels: bool | None = None, language_overrides: dict | None = None,
                  vision_overrides: dict | None = None) -> Qwen2_5_VLConfigs:
    """Read the HF config (directory, dict or config object) and derive both Megatron configs.

    Raises ValueError for another model type or a TP/PP that does not divide the sizes.
    """
    from megavrl.models.qwen2_5_vl.vision import vision_transformer_config

    hf_config = load_hf_config(hf)
    text = TextSizes.from_hf(hf_config)
    language = language_transformer_config(text, tp=tp, pp=pp, params_dtype=params_dtype,
                                           fused_kernels=fused_kernels, **(language_overrides or {}))
    vision_sizes = VisionSizes.from_hf(hf_config.vision_config)
    if vision_sizes.out_hidden_size != text.hidden_size:
        raise ValueError(f"vision out_hidden_size={vision_sizes.out_hidden_size} differs from the text "
                         f"hidden_size={text.hidden_size}")
    vision_overrides = dict(vision_overrides or {})
    vision_overrides.setdefault("use_cpu_initialization", not torch.cuda.is_available())
    vision = vision_transformer_config(hf_config.vision_config, tensor_model_parallel_size=tp,
                                       params_dtype=params_dtype, fused_kernels=fused_kernels, **vision_overrides)
    return Qwen2_5_VLConfigs(hf_config=hf_config, text=text, vision_sizes=vision_sizes, language=language,
                             vision=vision, tp=tp, pp=pp, padded_vocab_size=padded_vocab_size(text.vocab_size, tp))
