"""Shared pieces of the vision-tower tests, and their torchrun worker.

    python -m torch.distributed.run --nproc-per-node 2 --module tests.models.qwen2_5_vl.vision_worker HF_DIR

Each rank builds the transformers reference and the Megatron tower at TP = world size, loads its
shard of the same checkpoint through the mapping table, and checks parity on every case of
``CASES`` (printing ``OK tp=<n> rank=<r> <case> max_abs_diff=<d>``), then that the gathered
shards export back to the exact HF tensors (``OK tp=<n> rank=<r> export``). Raises on any mismatch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

# fp32 parity threshold. Both sides do the same arithmetic in float32; they differ only in the
# order of sums (one fused QKV matmul, TP partial sums all-reduced, masked softmax over a whole
# frame instead of per-segment softmaxes, where masked logits underflow to exactly 0), which
# moves outputs of magnitude ~1 by ~1e-7 to 1e-6 after 4 blocks (measured: <= 4.5e-7). A real
# error moves them by >= 1e-2 with the sharpened attention below (measured: rotary rows/columns
# swapped 3.6e-2, interleaved rotate_half 3.6e-2, windows not reordered 9.6e-2; attention over
# frames in every block 9.4e-2), so 1e-5 separates the two with margin on both sides.
FP32_TOLERANCE = 1e-5

# (name, grid_thw rows). Tiny preset: patch 14, merge 2, window 56 px = 2x2 merge units = 4x4 patches.
CASES = [
    # 8 frames at 224x224: t=4, 16x16 patches per frame, 4x4 windows per frame; the
    # full-attention block sees a whole frame, the window blocks 16 patches.
    ("video", [[4, 16, 16]]),
    # an image whose merged grid (5x7) is not a multiple of the window (2x2): cut edge windows.
    ("image", [[1, 10, 14]]),
    # one image + one video in one sequence (grid_thw with 2 rows).
    ("image+video", [[1, 10, 14], [4, 16, 16]]),
]

# Random-init attention is nearly uniform, which would hide position and segment errors
# (they'd move outputs by ~1e-4 only): scale the QKV projection so attention is peaked.
QKV_SHARPEN = 4.0


def case_pixels(grid: list[list[int]], patch_dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (pixel_values [num_patches, patch_dim], grid_thw [n, 3]) for a case."""
    grid_thw = torch.tensor(grid, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    n = int(grid_thw.prod(dim=-1).sum())
    return torch.randn(n, patch_dim, generator=gen), grid_thw


def hf_vision_reference(hf_dir: str | Path, sharpen: float = QKV_SHARPEN):
    """(transformers vision tower in eval mode, its HF-named tensors as on disk, the HF config),
    with the QKV projection scaled by ``sharpen`` in the tower and the tensors alike."""
    from safetensors.torch import load_file
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = AutoConfig.from_pretrained(hf_dir)
    state = {}
    for file in sorted(Path(hf_dir).glob("*.safetensors")):
        state.update({k: v for k, v in load_file(file).items() if ".visual." in f".{k}"})
    for name in state:
        if ".attn.qkv." in name:
            state[name] = state[name] * sharpen
    prefix = "model.visual." if any(k.startswith("model.visual.") for k in state) else "visual."
    visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config,
                                                                 attn_implementation="eager")
    visual.load_state_dict({k[len(prefix):]: v for k, v in state.items()}, strict=True)
    return visual.eval().float(), state, config


def vision_mapping_context(hf_config, tp_size: int):
    """The mapping table's context for this checkpoint at ``tp_size``, as the loaders build it."""
    from megavrl.checkpoint.mapping import mapping_context
    from megavrl.models.qwen2_5_vl.config import build_configs

    return mapping_context(build_configs(hf_config, tp=tp_size))


def load_vision_weights(model, hf_state: dict, hf_config, tp_rank: int, tp_size: int) -> None:
    """Load HF vision tensors (published or transformers-5 names) into this TP rank's
    ``Qwen2_5_VisionModel`` through megavrl/checkpoint/mapping.py's VISION rows."""
    from megavrl.checkpoint.mapping import VISION_PREFIX, bind, hf_aliases, shard_hf_tensors

    ctx = vision_mapping_context(hf_config, tp_size)

    def hf_tensor(published):
        for name in hf_aliases(published):
            if name in hf_state:
                return hf_state[name]
        raise KeyError(f"{published} (or its transformers-5 name) is not in the checkpoint")

    shards = {}
    for name, param in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        binding = bind(VISION_PREFIX + name)
        shard = shard_hf_tensors(binding.row.split, [hf_tensor(h) for h in binding.hf_names], tp_rank, ctx,
                                 binding.row.component)
        assert shard.shape == param.shape, (name, tuple(shard.shape), tuple(param.shape))
        shards[name] = shard.clone()
    result = model.load_state_dict(shards, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    assert not missing and not result.unexpected_keys, (missing, result.unexpected_keys)


def build_megatron_vision(hf_config, hf_state: dict, tp_rank: int = 0, tp_size: int = 1, **vision_overrides):
    """A Megatron tower at TP = tp_size holding this rank's shard of ``hf_state``.

    vision_overrides replace fields of the HF vision config (e.g. fullatt_block_indexes)."""
    from megavrl.models.qwen2_5_vl.vision import Qwen2_5_VisionModel, vision_transformer_config

    vision_config = hf_config.vision_config.to_dict()
    vision_config.update(vision_overrides)
    model = Qwen2_5_VisionModel(vision_config, vision_transformer_config(vision_config,
                                                                         tensor_model_parallel_size=tp_size))
    load_vision_weights(model, hf_state, hf_config, tp_rank, tp_size)
    return model.eval()


def main(hf_dir: str) -> None:
    import torch.distributed as dist

    from megavrl.parallel import current_layout, destroy_distributed, init_distributed

    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    init_distributed(tp=world, pp=1)
    layout = current_layout()
    torch.set_num_threads(1)
    reference, state, config = hf_vision_reference(hf_dir)
    model = build_megatron_vision(config, state, layout.tp_rank, layout.tp)
    shard = model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0]
    assert shard == 3 * config.vision_config.hidden_size // layout.tp, shard  # heads really are split
    for name, grid in CASES:
        pixels, grid_thw = case_pixels(grid, model.sizes.patch_dim)
        with torch.no_grad():
            expected = reference(pixels, grid_thw=grid_thw).pooler_output
            got = model(pixels, grid_thw)
        diff = (got - expected).abs().max().item()
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        assert diff <= FP32_TOLERANCE, f"{name}: max |diff| {diff:.3e} > {FP32_TOLERANCE:g} at TP={layout.tp}"
        print(f"OK tp={layout.tp} rank={layout.rank} {name} max_abs_diff={diff:.3e}", flush=True)
    check_export(model, state, config)
    print(f"OK tp={layout.tp} rank={layout.rank} export", flush=True)
    dist.barrier()
    destroy_distributed()


def check_export(model, hf_state: dict, hf_config) -> None:
    """Megatron -> HF direction (converters, weight sync): gather every parameter's TP shards,
    merge them with the mapping table, and get back exactly the HF checkpoint's tensors."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megavrl.checkpoint.mapping import VISION_PREFIX, bind, hf_aliases, merge_shards, to_published

    group, tp = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    ctx = vision_mapping_context(hf_config, tp)
    exported = set()
    for name, param in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        shards = [torch.empty_like(param) for _ in range(tp)]
        dist.all_gather(shards, param.contiguous(), group=group)
        binding = bind(VISION_PREFIX + name)
        for published, tensor in zip(binding.hf_names, merge_shards(binding.row.split, shards, ctx,
                                                                      binding.row.component)):
            on_disk = next(hf_state[n] for n in hf_aliases(published) if n in hf_state)
            assert torch.equal(tensor, on_disk), f"{name} -> {published} does not round-trip"
            exported.add(published)
    on_disk = {to_published(n) for n in hf_state}
    assert exported == on_disk, sorted(on_disk ^ exported)[:5]  # every vision tensor, once


if __name__ == "__main__":
    main(sys.argv[1])
