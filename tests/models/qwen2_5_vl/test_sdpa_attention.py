"""SDPACoreAttention (torch's fused SDPA) against Megatron-Core's DotProductAttention with the
explicit masks it needs (causal_padding_mask, block_diagonal_mask), on random q/k/v, CPU.

Tolerance: FP32_TOLERANCE (1e-5) on outputs (magnitude up to ~4), and relative to the largest
entry on gradients (which reach ~10 with the peaked attention used here). Both sides compute the
same softmax(q k^T / sqrt(d)) v in float32; they differ in the order of the sums (SDPA's kernel
accumulates block by block with a running max, Megatron materialises the scores) and in how
masked logits vanish (-inf versus -10000, which underflows to exactly 0 after exp): measured
<= 2e-6 on outputs. A wrong mask, scale or head grouping moves them by >= 1e-2 (checked below).
"""
from __future__ import annotations

import pytest
import torch

from megavrl.models.qwen2_5_vl.language import causal_padding_mask, padding_mask
from megavrl.models.qwen2_5_vl.vision_geometry import block_diagonal_mask

FP32_TOLERANCE = 1e-5
HEAD_DIM = 16


@pytest.fixture(scope="module")
def megatron_tp1():
    import torch.distributed as dist

    from megavrl.parallel import destroy_distributed, init_distributed

    owned = not dist.is_initialized()
    init_distributed(tp=1, pp=1)
    yield
    if owned:
        destroy_distributed()


def _config(heads: int, groups: int, dtype=torch.float32, **overrides):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=1, hidden_size=heads * HEAD_DIM, num_attention_heads=heads, num_query_groups=groups,
                  kv_channels=HEAD_DIM, attention_dropout=0.0, masked_softmax_fusion=False,
                  attention_softmax_in_fp32=True, apply_query_key_layer_scaling=False, params_dtype=dtype,
                  bf16=dtype == torch.bfloat16)
    return TransformerConfig(**{**kwargs, **overrides})


def _both(config, mask_type):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megavrl.models.qwen2_5_vl.sdpa_attention import SDPACoreAttention

    return (DotProductAttention(config, 1, mask_type, "self"), SDPACoreAttention(config, 1, mask_type, "self"))


def _qkv(shape_q, shape_kv, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    # q and k x3: peaked attention, so that a wrong mask or scale shows far above the tolerance
    return [(scale * torch.randn(*shape, generator=gen)).to(dtype).requires_grad_()
            for scale, shape in ((3, shape_q), (3, shape_kv), (1, shape_kv))]


def _grads(out, inputs, weight):
    for x in inputs:
        x.grad = None
    (out * weight).sum().backward()
    return [x.grad.clone() for x in inputs]


def _max_diff(a, b):
    return (a - b).abs().max().item()


def _assert_grads_close(got, expected):
    for g, e in zip(got, expected):
        assert torch.isfinite(g).all()
        assert _max_diff(g, e) <= FP32_TOLERANCE * max(1.0, e.abs().max().item())


# 1 = real token. Rows of a batch of 4, sequence 12.
PADDINGS = {
    "none": [[1] * 12] * 4,
    "right": [[1] * 12, [1] * 7 + [0] * 5, [1] * 3 + [0] * 9, [1] * 12],
    "left": [[1] * 12, [0] * 5 + [1] * 7, [0] * 9 + [1] * 3, [0] * 5 + [1] * 7],
    "both sides and an empty row": [[0] * 2 + [1] * 8 + [0] * 2, [0] * 12, [1] * 12, [1] * 5 + [0] * 7],
    "holes": [[1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1], [1] * 12, [0] * 3 + [1] * 9, [1] * 4 + [0] * 8],
}


@pytest.mark.parametrize("groups", [4, 2, 1], ids=["MHA", "GQA-2", "MQA"])
@pytest.mark.parametrize("padding", list(PADDINGS), ids=list(PADDINGS))
def test_causal_with_key_padding_matches_megatron(megatron_tp1, padding, groups):
    """Text: SDPACoreAttention with the [B, 1, 1, S] key-padding mask equals DotProductAttention
    with the full causal+padding mask at every real query position, forward and backward, and
    padded positions (a query row that sees no key included) stay finite: nothing NaN reaches
    the loss or the gradients."""
    from megatron.core.transformer.enums import AttnMaskType

    heads, seq, batch = 4, 12, 4
    real = torch.tensor(PADDINGS[padding])
    reference, sdpa = _both(_config(heads, groups), AttnMaskType.padding_causal)
    q, k, v = _qkv((seq, batch, heads, HEAD_DIM), (seq, batch, groups, HEAD_DIM))
    expected = reference(q, k, v, causal_padding_mask(real))
    got = sdpa(q, k, v, padding_mask(real, seq, batch))
    assert got.shape == expected.shape == (seq, batch, heads * HEAD_DIM)
    assert torch.isfinite(got).all()
    at_real = real.T[:, :, None].bool()  # [S, B, 1]
    assert _max_diff(got * at_real, expected * at_real) <= FP32_TOLERANCE
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)) * at_real  # a loss on real tokens
    _assert_grads_close(_grads(got, (q, k, v), weight), _grads(expected, (q, k, v), weight))
    if padding in ("left", "holes"):  # keys before a real query are masked: the result changes
        unpadded = reference(q, k, v, causal_padding_mask(torch.ones_like(real)))
        assert _max_diff(expected * at_real, unpadded * at_real) > 100 * FP32_TOLERANCE


def test_full_mask_and_no_mask_match_megatron(megatron_tp1):
    """A ready [B, 1, S, S] mask (True = masked) is applied as given, as DotProductAttention does;
    no mask with a causal type is plain causal attention."""
    from megatron.core.transformer.enums import AttnMaskType

    heads, groups, seq, batch = 4, 2, 10, 2
    reference, sdpa = _both(_config(heads, groups), AttnMaskType.causal)
    q, k, v = _qkv((seq, batch, heads, HEAD_DIM), (seq, batch, groups, HEAD_DIM))
    real = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10])
    mask = causal_padding_mask(real)
    at_real = real.T[:, :, None].bool()
    assert _max_diff(sdpa(q, k, v, mask) * at_real, reference(q, k, v, mask) * at_real) <= FP32_TOLERANCE
    assert _max_diff(sdpa(q, k, v, None), reference(q, k, v, None)) <= FP32_TOLERANCE


def _packed(cu: torch.Tensor):
    from megatron.core.packed_seq_params import PackedSeqParams

    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


SEGMENTS = {
    "equal windows": [16, 16, 16, 16],
    "cut edge windows": [16, 4, 16, 4, 8, 2],
    "frames of two media": [24, 24, 6, 24, 1],
}


@pytest.mark.parametrize("groups", [2, 1], ids=["MHA", "GQA"])
@pytest.mark.parametrize("segments", list(SEGMENTS), ids=list(SEGMENTS))
def test_packed_segments_match_block_diagonal_mask(megatron_tp1, segments, groups):
    """Vision: attention inside each cu_seqlens segment ("thd", the tower's windows and frames)
    equals DotProductAttention with the block-diagonal mask, forward and backward."""
    from megatron.core.transformer.enums import AttnMaskType

    heads = 2
    lengths = torch.tensor(SEGMENTS[segments])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    total = int(cu[-1])
    reference, sdpa = _both(_config(heads, groups), AttnMaskType.no_mask)
    q, k, v = _qkv((total, heads, HEAD_DIM), (total, groups, HEAD_DIM), seed=2)
    expected = reference(q[:, None], k[:, None], v[:, None], block_diagonal_mask(cu)).squeeze(1)
    got = sdpa(q, k, v, None, packed_seq_params=_packed(cu))
    assert got.shape == expected.shape == (total, heads * HEAD_DIM)
    assert _max_diff(got, expected) <= FP32_TOLERANCE
    weight = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    _assert_grads_close(_grads(got, (q, k, v), weight), _grads(expected, (q, k, v), weight))
    whole = reference(q[:, None], k[:, None], v[:, None], None).squeeze(1)
    assert _max_diff(whole, expected) > 100 * FP32_TOLERANCE  # the segments really matter


def test_bf16_is_as_accurate_as_megatron(megatron_tp1):
    """bf16 inputs: SDPA keeps the softmax and the sums in fp32 (attention_softmax_in_fp32), so
    it is no farther from the fp32 result than DotProductAttention in bf16 (which rounds the
    scores and the probabilities to bf16)."""
    from megatron.core.transformer.enums import AttnMaskType

    heads, groups, seq, batch = 4, 2, 64, 2
    real = torch.ones(batch, seq, dtype=torch.long)
    real[1, :20] = 0
    q, k, v = _qkv((seq, batch, heads, HEAD_DIM), (seq, batch, groups, HEAD_DIM), seed=4)
    truth = _both(_config(heads, groups), AttnMaskType.padding_causal)[0](q, k, v, causal_padding_mask(real))
    reference, sdpa = _both(_config(heads, groups, torch.bfloat16), AttnMaskType.padding_causal)
    low = [x.detach().bfloat16() for x in (q, k, v)]
    got = sdpa(*low, padding_mask(real, seq, batch))
    expected = reference(*low, causal_padding_mask(real))
    assert got.dtype == expected.dtype == torch.bfloat16
    at_real = real.T[:, :, None].bool()
    err_sdpa = _max_diff(got.float() * at_real, truth * at_real)
    err_megatron = _max_diff(expected.float() * at_real, truth * at_real)
    assert err_sdpa <= max(err_megatron, 1e-2), (err_sdpa, err_megatron)


def test_attention_dropout_in_training_only(megatron_tp1):
    from megatron.core import tensor_parallel
    from megatron.core.transformer.enums import AttnMaskType

    heads, seq, batch = 2, 16, 2
    _, sdpa = _both(_config(heads, heads, attention_dropout=0.5), AttnMaskType.padding_causal)
    q, k, v = _qkv((seq, batch, heads, HEAD_DIM), (seq, batch, heads, HEAD_DIM), seed=5)
    mask = padding_mask(None, seq, batch)
    sdpa.eval()
    clean = sdpa(q, k, v, mask)
    _, no_dropout = _both(_config(heads, heads), AttnMaskType.padding_causal)
    assert torch.equal(clean, no_dropout(q, k, v, mask))
    sdpa.train()
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    dropped = sdpa(q, k, v, mask)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    assert torch.equal(dropped, sdpa(q, k, v, mask))  # drawn from Megatron's model-parallel stream
    assert _max_diff(dropped, clean) > 1e-2


def test_refusals_name_the_problem(megatron_tp1):
    from megatron.core.transformer.enums import AttnMaskType

    from megavrl.models.qwen2_5_vl.sdpa_attention import SDPACoreAttention

    with pytest.raises(ValueError, match="sliding-window"):
        SDPACoreAttention(_config(2, 2, window_size=(4, 0)), 1, AttnMaskType.causal, "self")
    sdpa = SDPACoreAttention(_config(2, 2), 1, AttnMaskType.no_mask, "self")
    q, k, v = _qkv((10, 2, HEAD_DIM), (10, 2, HEAD_DIM))
    with pytest.raises(ValueError, match="do not cover the 10 packed tokens"):
        sdpa(q, k, v, None, packed_seq_params=_packed(torch.tensor([0, 4, 8], dtype=torch.int32)))


def test_vision_tower_same_as_with_megatron_attention_and_masks(megatron_tp1, tiny_hf_dir):
    """The whole tower, default spec (SDPACoreAttention on packed segments) against the same
    spec on Megatron's DotProductAttention (block-diagonal masks): outputs and gradients."""
    import dataclasses

    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from megavrl.models.qwen2_5_vl.sdpa_attention import SDPACoreAttention
    from megavrl.models.qwen2_5_vl.vision import Qwen2_5_VisionModel, vision_layer_spec, vision_transformer_config
    from tests.models.qwen2_5_vl.vision_worker import CASES, case_pixels, hf_vision_reference, load_vision_weights

    _, state, config = hf_vision_reference(tiny_hf_dir)
    vc = config.vision_config
    spec = vision_layer_spec(use_te=False)
    attention = spec.submodules.self_attention
    assert attention.submodules.core_attention is SDPACoreAttention
    megatron_spec = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, self_attention=dataclasses.replace(attention, submodules=dataclasses.replace(
            attention.submodules, core_attention=DotProductAttention))))
    towers = []
    for layer_spec in (spec, megatron_spec):
        tower = Qwen2_5_VisionModel(vc, vision_transformer_config(vc), spec=layer_spec)
        load_vision_weights(tower, state, config, 0, 1)
        towers.append(tower.train())
    assert towers[0].packed_attention and not towers[1].packed_attention
    pixels, grid_thw = case_pixels(CASES[2][1], towers[0].sizes.patch_dim)  # image (cut windows) + video
    outs = [tower(pixels, grid_thw) for tower in towers]
    assert _max_diff(*outs) <= FP32_TOLERANCE
    weight = torch.randn(outs[0].shape, generator=torch.Generator().manual_seed(6))
    for out in outs:
        (out * weight).sum().backward()
    grads = [dict(tower.named_parameters()) for tower in towers]
    for name, p in grads[0].items():
        scale = p.grad.abs().max().item()
        assert _max_diff(p.grad, grads[1][name].grad) <= 1e-4 * max(scale, 1e-3), name
