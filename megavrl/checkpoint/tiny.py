"""Tiny random Qwen2.5-VL checkpoints, complete enough for transformers, vLLM and megavrl.

``make_tiny_model(out, preset)`` writes a Hugging Face directory: config.json,
generation_config.json, model.safetensors (random weights), a byte-level BPE tokenizer trained on
the fly that holds the Qwen special tokens, the Qwen2.5-VL chat template, and the image/video
processor configs. Nothing is downloaded; the same seed gives the same bytes.

The presets (their sizes: :data:`megavrl.models.qwen2_5_vl.args.TINY_PRESETS`) keep the properties
that matter for correctness tests of a real model:
- text head_dim 64 (vLLM's CPU attention rejects head_dim < 32), GQA with 2 KV heads, QKV bias,
  mrope_section summing to head_dim / 2;
- a vocabulary that is not a multiple of 128, so Megatron's vocab padding is exercised;
- a vision tower of depth 4 whose block 2 uses full attention and the others window attention,
  with a window (56 px = 2x2 merged patches) smaller than the grid of a typical test video;
- ``tiny`` has untied embeddings (as the 7B model), ``tiny-tied`` ties them (as the 3B model).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from megavrl.checkpoint.mapping import HF_OUTPUT, to_published
from megavrl.log import get_logger
from megavrl.models.qwen2_5_vl.args import TINY_PRESETS, TinyPreset

log = get_logger(__name__)

# Qwen2.5's special tokens, in Qwen's order. The vision ones are what the model config refers to.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The chat template published with Qwen/Qwen2.5-VL-*-Instruct.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Words the BPE trainer sees, so prompts of the synthetic tasks tokenize into a few pieces each.
_CORPUS_WORDS = (
    "the a an of in on at to from for with and or is are was were be this that what which when "
    "where who how video clip frame frames second seconds time times start end begin during after "
    "before event happens appear appears appeared disappear moves move moving shape shapes circle "
    "square triangle red green blue yellow white black orange purple color colour left right up "
    "down top bottom center question answer options option choose correct best describe find "
    "locate temporal grounding moment segment span give output format think reasoning reason "
    "step first then finally so because therefore the_answer_is A B C D E yes no none "
    "<think> </think> <answer> </answer> system user assistant You are a helpful assistant. "
    "Please provide the start and end time in seconds as 'start to end'."
).split()


def _corpus() -> list[str]:
    lines = [" ".join(_CORPUS_WORDS[i:i + 12]) for i in range(0, len(_CORPUS_WORDS), 6)]
    numbers = [f"{i}.{j} to {i + j}.{(i * j) % 10} ({chr(65 + i % 5)}) [{i}, {j}] {i}:{j:02d}"
               for i in range(60) for j in range(0, 10, 3)]
    return lines * 20 + numbers


def build_tokenizer(bpe_vocab_size: int):
    """A byte-level BPE ``Qwen2TokenizerFast`` trained on a small built-in corpus.

    Deterministic: the trainer sees the same corpus in the same order every time.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        errors="replace",
        split_special_tokens=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _round_up(x: int, multiple: int) -> int:
    return (x + multiple - 1) // multiple * multiple


def build_config(preset: TinyPreset, tokenizer):
    """The ``Qwen2_5_VLConfig`` for a preset and its tokenizer's special-token ids."""
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = preset.hidden_size // preset.num_attention_heads
    if sum(preset.mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {preset.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    # Like Qwen's 151936 > len(tokenizer): some rows of the embedding never see a token; an odd
    # multiple of 8 keeps the size off Megatron's 128 * TP padding multiple.
    vocab_size = _round_up(len(tokenizer), 8)
    if vocab_size % 128 == 0:
        vocab_size += 8
    text = dict(
        vocab_size=vocab_size, hidden_size=preset.hidden_size, intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers, num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=preset.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": preset.rope_theta,
                         "mrope_section": list(preset.mrope_section)},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=preset.tie_word_embeddings, use_cache=True)
    vision = dict(
        depth=preset.vision_depth, hidden_size=preset.vision_hidden_size,
        intermediate_size=preset.vision_intermediate_size, num_heads=preset.vision_num_heads, hidden_act="silu",
        in_channels=3, patch_size=preset.patch_size, spatial_merge_size=preset.spatial_merge_size,
        temporal_patch_size=preset.temporal_patch_size, tokens_per_second=preset.tokens_per_second,
        window_size=preset.vision_window_size, out_hidden_size=preset.hidden_size,
        fullatt_block_indexes=list(preset.vision_fullatt_block_indexes))
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=preset.tie_word_embeddings,
        architectures=["Qwen2_5_VLForConditionalGeneration"],
        dtype="float32",
    )


def build_processor(preset: TinyPreset, tokenizer):
    """Qwen2.5-VL processor with the published Qwen pixel limits and normalisation."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    common = dict(patch_size=preset.patch_size, temporal_patch_size=preset.temporal_patch_size,
                  merge_size=preset.spatial_merge_size,
                  image_mean=[0.48145466, 0.4578275, 0.40821073],
                  image_std=[0.26862954, 0.26130258, 0.27577711])
    image = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 1280, **common)
    video = Qwen2VLVideoProcessor(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28, **common)
    return Qwen2_5_VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video,
                               chat_template=CHAT_TEMPLATE)


def make_tiny_model(out: str | os.PathLike, preset: str = "tiny", seed: int = 0,
                    layout: str = "published", force: bool = False) -> Path:
    """Write a random tiny Qwen2.5-VL Hugging Face directory to ``out`` and return its path.

    layout: "published" names tensors as Qwen's released checkpoints do (``visual.*``,
    ``model.*``, ``lm_head.*``); "transformers" as transformers 5 saves them
    (``model.visual.*``, ``model.language_model.*``, ``lm_head.*``). Both load everywhere.
    The directory is built in a temporary sibling and renamed into place, so an interrupted
    call never leaves a half-written model behind. Files and directories get the modes the
    umask gives (0644 / 0755 under umask 022), like any file the user creates.
    """
    if preset not in TINY_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(TINY_PRESETS)}")
    if layout not in ("published", "transformers"):
        raise ValueError(f"layout must be 'published' or 'transformers', not {layout!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {str(out)!r} exists and is not a directory: choose another --out")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"output directory {str(out)!r} exists and is not empty: pass --force to "
                                  f"overwrite it, or choose another --out")
        shutil.rmtree(out)
    import torch  # after the argument checks, so that a refusal is instant
    from safetensors.torch import save
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    p = TINY_PRESETS[preset]
    tokenizer = build_tokenizer(p.bpe_vocab_size)
    config = build_config(p, tokenizer)

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop(HF_OUTPUT, None)
    if layout == "published":  # transformers' in-memory names -> the names of Qwen's released files
        state = {to_published(name): tensor for name, tensor in state.items()}

    out.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp (mode 0700) nor safetensors' save_file (0600): plain mkdir and open
    # follow the umask, so the model is as readable as any other file the user writes.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir()
    try:
        config.save_pretrained(tmp)
        (tmp / "model.safetensors").write_bytes(save(state, metadata={"format": "pt"}))
        eos = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
        GenerationConfig(bos_token_id=eos[1], eos_token_id=eos, pad_token_id=eos[1],
                         do_sample=False).save_pretrained(tmp)
        build_processor(p, tokenizer).save_pretrained(tmp)
        (tmp / "megavrl_tiny.json").write_text(json.dumps(
            {"preset": preset, "seed": seed, "layout": layout, "sizes": asdict(p)}, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(t.numel() for t in state.values())
    log.info("wrote tiny Qwen2.5-VL %r (%d parameters, vocab %d, %s layout) to %s",
             preset, n_params, config.text_config.vocab_size, layout, out)
    return out
