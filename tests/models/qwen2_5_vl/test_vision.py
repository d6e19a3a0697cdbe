"""The Megatron-Core Qwen2.5-VL vision tower against transformers' (CPU, fp32, tiny preset).

Reference: ``Qwen2_5_VisionTransformerPretrainedModel`` loaded from the tiny checkpoint; its
``pooler_output`` (merged tokens, original patch order) is what the tower must reproduce.
Tolerance: ``FP32_TOLERANCE`` (1e-5) in vision_worker.py, where the reason is written down.
"""
from __future__ import annotations

import pytest
import torch

from tests.models.qwen2_5_vl.vision_worker import (CASES, FP32_TOLERANCE, build_megatron_vision, case_pixels,
                                                   hf_vision_reference, load_vision_weights)


@pytest.fixture(scope="module")
def megatron_tp1():
    """torch.distributed + Megatron parallel state at world 1, torn down after this module if
    this module set it up."""
    import torch.distributed as dist

    from megavrl.parallel import destroy_distributed, init_distributed

    owned = not dist.is_initialized()
    init_distributed(tp=1, pp=1)
    yield
    if owned:
        destroy_distributed()


@pytest.fixture(scope="module")
def reference(tiny_hf_dir):
    return hf_vision_reference(tiny_hf_dir)


@pytest.fixture(scope="module")
def tower(megatron_tp1, reference):
    _, state, config = reference
    return build_megatron_vision(config, state)


def _run_both(reference, tower, grid):
    visual = reference[0]
    pixels, grid_thw = case_pixels(grid, tower.sizes.patch_dim)
    with torch.no_grad():
        return tower(pixels, grid_thw), visual(pixels, grid_thw=grid_thw).pooler_output


# ---------------------------------------------------------------------------------------------
# geometry: the pure functions against transformers' own helpers

@pytest.mark.parametrize("grid", [[[4, 16, 16]], [[1, 10, 14]], [[1, 10, 14], [2, 4, 6], [4, 16, 16]], [[1, 2, 2]]])
def test_geometry_matches_transformers(grid):
    from transformers.vision_utils import (get_vision_cu_seqlens, get_vision_position_ids,
                                           get_vision_window_index)

    from megavrl.models.qwen2_5_vl.vision_geometry import (frame_cu_seqlens, patch_positions,
                                                           rotary_angles, rotary_inv_freq, window_partition)

    grid_thw = torch.tensor(grid)
    index, cu_windows = window_partition(grid_thw, merge=2, window_merge_units=2)  # 56 px // 2 // 14
    hf_index, hf_cu_windows = get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=56, patch_size=14)
    assert torch.equal(index, hf_index)
    assert torch.equal(cu_windows, hf_cu_windows)
    assert torch.equal(frame_cu_seqlens(grid_thw), get_vision_cu_seqlens(grid_thw))
    positions = patch_positions(grid_thw, merge=2)
    assert torch.equal(positions, get_vision_position_ids(grid_thw, 2))
    # transformers' axial rope: cos/sin of [row * f, col * f] repeated twice over head_dim
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionRotaryEmbedding
    from transformers import Qwen2_5_VLVisionConfig

    rope = Qwen2_5_VLVisionRotaryEmbedding(Qwen2_5_VLVisionConfig(hidden_size=128, num_heads=2))
    cos, sin = rope(torch.zeros(1), positions)
    angles = rotary_angles(positions, rotary_inv_freq(64, 10000.0)).squeeze(1).squeeze(1)
    torch.testing.assert_close(angles.cos(), cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(angles.sin(), sin, rtol=0, atol=1e-6)


def test_block_diagonal_mask_is_megatron_convention():
    from megavrl.models.qwen2_5_vl.vision_geometry import block_diagonal_mask

    mask = block_diagonal_mask(torch.tensor([0, 2, 5], dtype=torch.int32))
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.bool
    allowed = ~mask[0, 0]  # True = masked (Megatron's attention_mask_func fills True with -10000)
    assert allowed[:2, :2].all() and allowed[2:, 2:].all()
    assert not allowed[:2, 2:].any() and not allowed[2:, :2].any()


# ---------------------------------------------------------------------------------------------
# forward parity at TP=1, in this process

@pytest.mark.parametrize("name,grid", CASES, ids=[c[0] for c in CASES])
def test_parity_with_transformers_tp1(reference, tower, name, grid):
    got, expected = _run_both(reference, tower, grid)
    merge_units = sum(t * h * w for t, h, w in grid) // 4
    assert got.shape == expected.shape == (merge_units, reference[2].vision_config.out_hidden_size)
    diff = (got - expected).abs().max().item()
    assert diff <= FP32_TOLERANCE, f"{name}: max |diff| {diff:.3e} > {FP32_TOLERANCE:g}"
    assert expected.abs().max().item() > 0.1  # not a comparison of near-zero tensors


def test_images_and_videos_are_independent_in_one_call(tower):
    """One call over an image and a video gives, row for row, the two separate calls: the model
    can run every image and video of a micro-batch in one sequence (attention never crosses a frame)."""
    (_, image), (_, video), (_, both) = CASES
    image_px, image_grid = case_pixels(image, tower.sizes.patch_dim, seed=1)
    video_px, video_grid = case_pixels(video, tower.sizes.patch_dim, seed=2)
    with torch.no_grad():
        together = tower(torch.cat([image_px, video_px]), torch.cat([image_grid, video_grid]))
        apart = torch.cat([tower(image_px, image_grid), tower(video_px, video_grid)])
    assert (together - apart).abs().max().item() <= FP32_TOLERANCE


def test_window_and_full_attention_both_matter(megatron_tp1, reference):
    """The parity above can't pass vacuously: attending to whole frames in every block, or to
    windows in every block, changes the output by far more than the tolerance."""
    _, state, config = reference
    grid = CASES[0][1]  # video, 16x16 patches per frame, 4x4-patch windows
    depth = config.vision_config.depth
    with torch.no_grad():
        expected = _run_both(reference, build_megatron_vision(config, state), grid)[1]
        for override in (list(range(depth)), []):
            variant = build_megatron_vision(config, state, fullatt_block_indexes=override)
            diff = (_run_both(reference, variant, grid)[0] - expected).abs().max().item()
            assert diff > 100 * FP32_TOLERANCE, f"fullatt_block_indexes={override} changed output by {diff:.3e} only"


# ---------------------------------------------------------------------------------------------
# backward: the tower trains like transformers' (what GRPO needs when the ViT is not frozen)

def test_gradients_match_transformers(megatron_tp1, reference, tiny_hf_dir):
    from megavrl.models.qwen2_5_vl.vision import Qwen2_5_VisionModel, vision_transformer_config

    visual, state, config = hf_vision_reference(tiny_hf_dir)  # a private copy: we train it
    visual.train()
    grid = CASES[2][1]  # image + video
    pixels, grid_thw = case_pixels(grid, 3 * 2 * 14 * 14)
    weights = torch.randn(sum(t * h * w for t, h, w in grid) // 4, config.vision_config.out_hidden_size,
                          generator=torch.Generator().manual_seed(3))
    (visual(pixels, grid_thw=grid_thw).pooler_output * weights).sum().backward()
    hf_grads = {n: p.grad for n, p in visual.named_parameters()}

    vc = config.vision_config
    for overrides in ({}, dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)):
        tower = Qwen2_5_VisionModel(vc, vision_transformer_config(vc, **overrides))
        load_vision_weights(tower, state, config, 0, 1)
        tower.train()
        (tower(pixels, grid_thw) * weights).sum().backward()
        grads = {n: p.grad for n, p in tower.named_parameters()}
        nh, hd = vc.num_heads, vc.hidden_size // vc.num_heads
        qkv_hf = hf_grads["blocks.1.attn.qkv.weight"].reshape(3, nh, hd, -1).transpose(0, 1).reshape(3 * nh * hd, -1)
        pairs = [(grads["patch_embed.proj.weight"], hf_grads["patch_embed.proj.weight"]),
                 (grads["decoder.layers.1.self_attention.linear_qkv.weight"], qkv_hf),
                 (grads["decoder.layers.2.mlp.linear_fc2.bias"], hf_grads["blocks.2.mlp.down_proj.bias"]),
                 (grads["decoder.layers.0.input_layernorm.weight"], hf_grads["blocks.0.norm1.weight"]),
                 (grads["merger.linear_fc1.weight"], hf_grads["merger.mlp.0.weight"])]
        for got, expected in pairs:
            scale = expected.abs().max().item()
            assert scale > 0
            assert (got - expected).abs().max().item() <= 1e-4 * scale, overrides


def test_freeze_flags(megatron_tp1, reference):
    from megavrl.models.qwen2_5_vl.vision import Qwen2_5_VisionModel, vision_transformer_config

    vc = reference[2].vision_config
    config = vision_transformer_config(vc)

    def trainable(**flags):
        model = Qwen2_5_VisionModel(vc, config, **flags)
        return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}, model

    assert trainable()[0] == {"patch_embed", "decoder", "merger"}
    assert trainable(freeze_projector=True)[0] == {"patch_embed", "decoder"}
    assert trainable(freeze_vision=True, freeze_projector=True)[0] == set()
    names, model = trainable(freeze_vision=True)
    assert names == {"merger"}
    # a frozen encoder runs without autograd; the merger still gets its gradients
    pixels, grid_thw = case_pixels([[1, 4, 4]], model.sizes.patch_dim)
    model.train()
    model(pixels, grid_thw).sum().backward()
    assert model.merger.linear_fc1.weight.grad is not None
    assert all(p.grad is None for p in model.decoder.parameters())


# ---------------------------------------------------------------------------------------------
# configuration and input checks

def test_sizes_from_published_config_dict():
    """The published config.json's vision_config says in_chans and names no rope_theta."""
    from megavrl.models.qwen2_5_vl.args import VisionSizes
    from megavrl.models.qwen2_5_vl.vision import vision_transformer_config

    published = {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                 "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                 "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                 "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2}
    sizes = VisionSizes.from_hf({"vision_config": published})
    assert (sizes.in_channels, sizes.rope_theta, sizes.head_dim, sizes.patch_dim) == (3, 10000.0, 80, 1176)
    config = vision_transformer_config(published, tensor_model_parallel_size=4)
    assert (config.num_layers, config.ffn_hidden_size, config.num_query_groups, config.kv_channels) == \
        (32, 3420, 16, 80)
    assert config.gated_linear_unit and config.add_bias_linear and config.add_qkv_bias
    assert config.normalization == "RMSNorm" and config.layernorm_epsilon == 1e-6
    with pytest.raises(ValueError, match="intermediate_size=3420 is not divisible by tensor_model_parallel_size=8"):
        vision_transformer_config(published, tensor_model_parallel_size=8)


def test_bad_inputs_are_named(tower):
    pixels, grid_thw = case_pixels([[1, 4, 4]], tower.sizes.patch_dim)
    with pytest.raises(ValueError, match=r"pixel_values must be \[num_patches, 1176\]"):
        tower(pixels[:, :100], grid_thw)
    with pytest.raises(ValueError, match="describes 32 patches but pixel_values has 16"):
        tower(pixels, torch.tensor([[2, 4, 4]]))
    with pytest.raises(ValueError, match="multiples of spatial_merge_size=2"):
        tower(torch.zeros(15, tower.sizes.patch_dim), torch.tensor([[1, 3, 5]]))


# ---------------------------------------------------------------------------------------------
# TP=2 under torchrun

@pytest.mark.distributed
def test_parity_with_transformers_tp2(tiny_hf_dir):
    from tests.parallel.torchrun import run_torchrun

    proc = run_torchrun(["-m", "tests.models.qwen2_5_vl.vision_worker", str(tiny_hf_dir)], nproc=2, timeout=240)
    for rank in (0, 1):
        for name, _ in CASES:
            assert f"OK tp=2 rank={rank} {name} " in proc.stdout, proc.stdout + proc.stderr[-4000:]
        assert f"OK tp=2 rank={rank} export" in proc.stdout, proc.stdout + proc.stderr[-4000:]
