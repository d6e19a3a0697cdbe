"""bench_actor_step's GPU mode: the model-FLOPs count of an actor step (language model + vision
tower, megavrl.models.qwen2_5_vl.flops), the video sequences it times, and a dry run of the whole
mode on the CPU."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.bench_actor_step import GPU_SHAPES, gpu_micro_batch, gpu_model_config, video_frame_count
from megavrl.models.qwen2_5_vl.flops import (actor_step_flops, lm_matmul_params, vision_encoder_params,
                                             vision_merger_params, vision_segments)
from tests.bench.test_results import _check_record

REPO = Path(__file__).resolve().parents[2]

# A language model small enough to count by hand: h=8, f=16, 2 layers, 2 heads of 4, 1 KV head.
LM = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
          vocab_size=10)
# Its vision tower: d=4, f=6, 3 blocks (block 1 full attention), 2x2-pixel patches, merge 2,
# 8-px windows = 2x2 merge units, out width 8.
VISION = dict(depth=3, hidden_size=4, intermediate_size=6, num_heads=2, patch_size=2, spatial_merge_size=2,
              temporal_patch_size=2, window_size=8, fullatt_block_indexes=[1], in_chans=3, out_hidden_size=8)
CFG = dict(LM, vision_config=VISION)


def test_text_only_flops_are_the_language_model_formula():
    # per layer: q 64 + k,v 2*8*4 + qkv biases 16 + o 64 = 208; MLP 3*8*16 = 384; norms 16 -> 608;
    # 2 layers + final norm 8 + output layer 80 = 1304
    assert lm_matmul_params(CFG) == 1304
    flops = actor_step_flops(CFG, n_seq=3, seq_len=10)
    # 6 * N * T + n_seq * 12 * L * h * S^2 / 2 = 6*1304*30 + 3*12*2*8*100/2 (the text-only formula)
    assert flops.language == 6 * 1304 * 30 + 28800 == 263520
    assert flops.vision == 0 and flops.total == 263520 and flops.vision_share == 0


def test_vision_segments_are_the_windows_and_frames_of_the_tower():
    # grid (t, h, w) = (2, 6, 4) patches: each frame is 3x2 merge units, cut into windows of 2x2 units
    # (16 patches) and 1x2 units (8 patches); a frame is 24 patches
    windows, frames = vision_segments(VISION, (2, 6, 4))
    assert sorted(windows) == [8, 8, 16, 16] and frames == [24, 24]


def test_video_flops_hand_computed():
    # N_enc = patch embedding 4*24 + 3 blocks * (4*16 + 3*4*6 + 7*4 + 2*6 = 176) = 624
    # N_mrg = norm 4 + 16*16 + 16 + 16*8 + 8 = 412
    assert vision_encoder_params(VISION) == 624 and vision_merger_params(VISION) == 412
    # P = 48 patches, 12 merged tokens; attention 4*d*(2 window blocks * (2*(16^2 + 8^2)) + 1 full * 2*24^2)
    # = 16 * (1280 + 1152) = 38912; encoder forward 2*624*48 + 38912 = 98816; merger forward 2*412*12 = 9888
    language = actor_step_flops(CFG, 3, 10).language
    frozen = actor_step_flops(CFG, 3, 10, (2, 6, 4), train_encoder=False, train_merger=True)
    assert frozen.language == language
    assert frozen.vision == 3 * (98816 + 3 * 9888) == 385440
    trained = actor_step_flops(CFG, 3, 10, (2, 6, 4), train_encoder=True, train_merger=True)
    assert trained.vision == 3 * (3 * 98816 + 3 * 9888) == 978336
    idle = actor_step_flops(CFG, 3, 10, (2, 6, 4), train_encoder=False, train_merger=False)
    assert idle.vision == 3 * (98816 + 9888)
    assert frozen.vision_share == pytest.approx(385440 / (385440 + 263520))


def test_parameter_counts_match_transformers_modules():
    """The counts behind the formula equal the parameters of transformers' Qwen2.5-VL modules."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = GPU_SHAPES["tiny"]
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))

    def count(*modules):
        return sum(p.numel() for m in modules for p in m.parameters())

    visual, text = model.model.visual, model.model.language_model
    assert vision_encoder_params(cfg["vision_config"]) == count(visual.patch_embed, visual.blocks)
    assert vision_merger_params(cfg["vision_config"]) == count(visual.merger)
    assert lm_matmul_params(cfg) == count(text.layers, text.norm, model.lm_head)


def test_published_shapes_are_cut_with_their_full_attention_blocks():
    cfg = gpu_model_config("Qwen2.5-VL-7B", num_layers=8, vision_depth=8)
    assert cfg["num_hidden_layers"] == 8 and cfg["vision_config"]["depth"] == 8
    assert cfg["vision_config"]["fullatt_block_indexes"] == [7]
    assert gpu_model_config("Qwen2.5-VL-3B", 0, 4)["vision_config"]["fullatt_block_indexes"] == []
    full = gpu_model_config("Qwen2.5-VL-3B")
    assert full["num_hidden_layers"] == 36 and full["vision_config"]["fullatt_block_indexes"] == [7, 15, 23, 31]
    assert gpu_model_config("tiny", 8, 8)["vision_config"]["depth"] == 4  # never more than published
    assert GPU_SHAPES["Qwen2.5-VL-3B"]["vision_config"]["depth"] == 32  # the table is not modified


def test_video_frame_count_gives_about_the_share():
    vision = GPU_SHAPES["Qwen2.5-VL-3B"]["vision_config"]
    # 280x364 px = 10x13 = 130 merged tokens per 2 frames
    assert video_frame_count(4096, 0.5, (280, 364), vision) == 32  # 16 * 130 = 2080 tokens
    assert video_frame_count(2048, 0.5, (280, 364), vision) == 16
    assert video_frame_count(2048, 0.0, (280, 364), vision) == 0
    assert video_frame_count(256, 0.01, (280, 364), vision) == 2  # at least one temporal patch
    with pytest.raises(ValueError, match="multiples of 28"):
        video_frame_count(2048, 0.5, (280, 360), vision)


def test_micro_batch_holds_the_video_prompt_and_the_response():
    cfg = GPU_SHAPES["tiny"]
    batch, info = gpu_micro_batch(cfg, 256, 0.5, (280, 364))
    assert info["video_frames"] == 2 and info["video_grid_thw"] == (1, 20, 26) and info["video_tokens"] == 130
    assert info["prompt_text_tokens"] == 82 and info["response_tokens"] == 256 - 130 - 82
    assert batch["input_ids"].shape == (1, 256) and bool(batch["attention_mask"].all())
    assert int((batch["input_ids"] == cfg["video_token_id"]).sum()) == 130
    assert int(batch["loss_mask"].sum()) == info["response_tokens"]
    assert batch["pixel_values_videos"].shape == (520, 3 * 2 * 14 * 14)
    assert batch["video_grid_thw"].tolist() == [[1, 20, 26]]
    # M-RoPE: the video's height/width ids span its merged grid, text after it counts on from there
    video = (batch["input_ids"][0] == cfg["video_token_id"])
    pos = batch["position_ids"][:, 0]
    assert int(pos[1, video].max() - pos[1, video].min()) == 9 and int(pos[2, video].max() - pos[2, video].min()) == 12
    assert pos[0, -1] < 256  # the rope delta is negative after a video

    text, info = gpu_micro_batch(cfg, 256, 0.0, (280, 364))
    assert info["video_tokens"] == 0 and info["video_grid_thw"] is None and "pixel_values_videos" not in text
    assert torch.equal(text["position_ids"][:, 0], torch.arange(256).expand(3, 256))
    with pytest.raises(ValueError, match="leaves no response"):
        gpu_micro_batch(cfg, 256, 1.0, (280, 364))


@pytest.mark.slow
def test_gpu_mode_dry_run_on_cpu_writes_mfu_figures(tmp_path):
    """The GPU mode's code path end to end (tiny shapes, float32, CPU mode over gloo)."""
    cmd = [sys.executable, "-m", "bench.bench_actor_step", "--gpu", "--gpu-shapes", "tiny", "--gpu-dtype", "float32",
           "--gpu-seq-lens", "256", "--gpu-tokens-per-step", "512", "--warmup", "1", "--steps", "1",
           "--results-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads((tmp_path / "actor_step_gpu_mfu_tiny.json").read_text())
    _check_record(rec)
    assert [f["notes"]["recompute"] for f in rec["figures"]] == [False, True]
    for f in rec["figures"]:
        notes = f["notes"]
        assert f["unit"] == "% MFU" and f["value"] > 0 and f["baseline"] == 50.0
        assert notes["video_tokens"] == 130 and notes["text_tokens"] == 126 and notes["sequences_per_step"] == 2
        assert 0 < notes["vision_flops_share"] < 1 and notes["tflops"] > 0 and notes["seconds_per_step"] > 0
        assert notes["vision_encoder"] == "frozen" and notes["vision_merger"] == "trained"
        assert "peak_memory_gib" in notes
    assert rec["machine"]["device"] and rec["config"]["gpu_video_share"] == 0.5
