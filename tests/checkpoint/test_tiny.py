"""The tiny presets are real Qwen2.5-VL checkpoints for transformers: model, tokenizer, processor."""
import json

import numpy as np
import pytest
import torch

from megavrl.checkpoint.tiny import SPECIAL_TOKENS, make_tiny_model
from megavrl.models.qwen2_5_vl.args import TINY_PRESETS


def write_mp4(path, frames=16, height=120, width=160, fps=8):
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[:, (i * 7) % (width - 20):(i * 7) % (width - 20) + 20] = (255, 0, 0)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.mark.parametrize("fixture", ["tiny_hf_dir", "tiny_tied_hf_dir"])
def test_preset_runs_in_transformers_on_a_decoded_video(fixture, request, tmp_path):
    import decord
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    hf_dir = request.getfixturevalue(fixture)
    processor = AutoProcessor.from_pretrained(hf_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir).eval()
    cfg = model.config
    assert cfg.text_config.hidden_size // cfg.text_config.num_attention_heads == 64
    assert cfg.text_config.num_key_value_heads == 2
    assert sum(cfg.text_config.rope_parameters["mrope_section"]) == 32
    assert cfg.vision_config.depth >= 2 and len(cfg.vision_config.fullatt_block_indexes) == 1
    assert cfg.text_config.vocab_size % 128 != 0
    tied = fixture == "tiny_tied_hf_dir"
    assert cfg.tie_word_embeddings is tied
    assert (model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()) is tied
    tok = processor.tokenizer
    for t in SPECIAL_TOKENS:
        assert len(tok.encode(t)) == 1, t
    assert cfg.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")

    frames = decord.VideoReader(str(write_mp4(tmp_path / "v.mp4"))).get_batch(list(range(0, 16, 2))).asnumpy()
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "When does it move?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    inputs = processor(text=[text], videos=[torch.from_numpy(frames).permute(0, 3, 1, 2)], return_tensors="pt",
                       videos_kwargs={"do_sample_frames": False})
    t, h, w = inputs["video_grid_thw"][0].tolist()
    # A window of 56 px is 2x2 merged patches: the grid must be larger for window attention to matter.
    assert h // 2 > cfg.vision_config.window_size // 28 and w // 2 > cfg.vision_config.window_size // 28
    n_video_tokens = int((inputs["input_ids"] == cfg.video_token_id).sum())
    assert n_video_tokens == t * h * w // 4
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], cfg.text_config.vocab_size)
    assert torch.isfinite(logits).all()


def test_same_seed_same_bytes_and_refusals(tmp_path):
    a = make_tiny_model(tmp_path / "a", "tiny", seed=3)
    b = make_tiny_model(tmp_path / "b", "tiny", seed=3)
    c = make_tiny_model(tmp_path / "c", "tiny", seed=4)
    for name in ["model.safetensors", "tokenizer.json", "config.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert json.loads((a / "megavrl_tiny.json").read_text())["seed"] == 3
    with pytest.raises(FileExistsError, match="--force"):
        make_tiny_model(a, "tiny")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_tiny_model(tmp_path / "d", "huge")
    assert set(TINY_PRESETS) >= {"tiny", "tiny-tied"}


def test_published_layout_names(tiny_hf_dir, tiny_tied_hf_dir):
    from safetensors import safe_open

    with safe_open(tiny_hf_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "visual.patch_embed.proj.weight" in names and "model.embed_tokens.weight" in names
    assert "lm_head.weight" in names
    with safe_open(tiny_tied_hf_dir / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.visual.patch_embed.proj.weight" in names and "lm_head.weight" not in names


def test_cli_make_tiny_model(tmp_path):
    from megavrl.cli import main

    assert main(["make-tiny-model", "--out", str(tmp_path / "m"), "--preset", "tiny-tied", "--seed", "1"]) == 0
    assert (tmp_path / "m" / "config.json").is_file()
