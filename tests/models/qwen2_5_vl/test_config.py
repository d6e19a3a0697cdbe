"""HF config -> Megatron configs: sizes read from the config, both config forms, clear refusals."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from megavrl.checkpoint.mapping import mapping_context
from megavrl.models.qwen2_5_vl.args import TextSizes
from megavrl.models.qwen2_5_vl.config import build_configs, load_hf_config, padded_vocab_size


def _flat_published_config(nested: dict) -> dict:
    """The config.json form of Qwen's published checkpoints: text sizes at the top level,
    rope_scaling.mrope_section, rope_theta, in_chans in the vision config."""
    d = dict(nested)
    text = d.pop("text_config")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                "num_key_value_heads", "rms_norm_eps", "vocab_size", "max_position_embeddings", "hidden_act"):
        d[key] = text[key]
    d["rope_theta"] = text["rope_parameters"]["rope_theta"]
    d["rope_scaling"] = {"type": "mrope", "mrope_section": text["rope_parameters"]["mrope_section"]}
    vision = {k: v for k, v in d["vision_config"].items() if k not in ("rope_parameters", "in_channels")}
    d["vision_config"] = dict(vision, in_chans=3)
    return d


def test_sizes_come_from_the_hf_config(tiny_hf_dir):
    cfg = build_configs(tiny_hf_dir, tp=2, pp=2)
    lang = cfg.language
    assert (lang.num_layers, lang.hidden_size, lang.num_attention_heads, lang.num_query_groups) == (4, 256, 4, 2)
    assert (lang.kv_channels, lang.ffn_hidden_size, lang.layernorm_epsilon) == (64, 512, 1e-6)
    assert lang.normalization == "RMSNorm" and lang.gated_linear_unit and lang.activation_func is F.silu
    assert lang.add_qkv_bias and not lang.add_bias_linear
    assert lang.mrope_section == [8, 12, 12] and cfg.text.rope_theta == 1e6
    assert (lang.tensor_model_parallel_size, lang.pipeline_model_parallel_size) == (2, 2)
    if not torch.cuda.is_available():  # fusions that do not run on the CPU are off
        assert not (lang.bias_activation_fusion or lang.masked_softmax_fusion or lang.bias_dropout_fusion
                    or lang.gradient_accumulation_fusion or lang.persist_layer_norm or lang.apply_rope_fusion)
    assert cfg.vocab_size == 728 and cfg.padded_vocab_size == 768 and not cfg.text.tie_word_embeddings
    v = cfg.vision_sizes
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size) == (4, 128, 2, 256, 256)
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.window_size) == (14, 2, 2, 56)
    assert v.fullatt_block_indexes == (2,) and cfg.hf_config.vision_config.tokens_per_second == 2
    assert cfg.vision.num_layers == 4 and cfg.vision.tensor_model_parallel_size == 2
    ctx = mapping_context(cfg)
    assert (ctx.tp_size, ctx.padded_vocab_size, ctx.language.num_query_groups, ctx.vision.num_heads) == (2, 768, 2, 2)
    assert cfg.rope_index_kwargs()["video_token_id"] == cfg.video_token_id


def test_tied_preset(tiny_tied_hf_dir):
    assert build_configs(tiny_tied_hf_dir).text.tie_word_embeddings


def test_flat_published_form_gives_the_same_sizes(tiny_hf_dir, tmp_path):
    nested = json.loads((tiny_hf_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(_flat_published_config(nested)))
    assert TextSizes.from_hf(load_hf_config(tmp_path)) == TextSizes.from_hf(load_hf_config(tiny_hf_dir))
    assert TextSizes.from_hf(load_hf_config(_flat_published_config(nested))) == TextSizes.from_hf(
        load_hf_config(tiny_hf_dir))


def test_vocab_padding_is_megatrons():
    assert padded_vocab_size(728, 1) == 768 and padded_vocab_size(728, 2) == 768
    assert padded_vocab_size(151936, 4) == 152064 and padded_vocab_size(768, 4) == 1024


@pytest.mark.parametrize("tp,pp,message", [
    (4, 1, "num_query_groups=2 is not divisible by tensor_model_parallel_size=4"),
    (3, 1, "num_attention_heads=4 is not divisible by tensor_model_parallel_size=3"),
    (1, 3, "num_layers=4 is not divisible by pipeline_model_parallel_size=3"),
])
def test_refuses_layouts_that_do_not_divide(tiny_hf_dir, tp, pp, message):
    with pytest.raises(ValueError, match=message):
        build_configs(tiny_hf_dir, tp=tp, pp=pp)


def test_refuses_another_model_type(tmp_path, tiny_hf_dir):
    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    with pytest.raises(ValueError, match=r"model_type='qwen2'; megavrl supports 'qwen2_5_vl'"):
        build_configs(tmp_path)
    with pytest.raises(ValueError, match=r"model_type='llava'"):
        load_hf_config(dict(cfg, model_type="llava"))
