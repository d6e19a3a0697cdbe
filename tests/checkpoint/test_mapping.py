"""The split rules of the HF<->Megatron mapping table, as pure functions (no processes)."""
from __future__ import annotations

import pytest
import torch

from megavrl.checkpoint.mapping import (ROWS, AttentionGeometry, MappingContext, Split, bind, hf_aliases,
                                        hf_shapes_from_shard, match_megatron_name, merge_shards,
                                        shard_hf_tensors, to_published)

NH, NG, D, H = 8, 4, 3, 5  # query heads, KV groups, head dim, hidden


def _ctx(tp, vocab=13, padded=16):
    return MappingContext(tp_size=tp, vocab_size=vocab, padded_vocab_size=padded,
                          language=AttentionGeometry(NH, NG, D), vision=AttentionGeometry(4, 4, D))


def _rand(*shape):
    return torch.randn(*shape)


def _reference_qkv(q, k, v, nh, ng, d):
    """Megatron's TP=1 linear_qkv, written out: per query group, its query heads then k then v."""
    per = nh // ng
    rows = []
    for g in range(ng):
        rows += [q[(g * per + j) * d:(g * per + j + 1) * d] for j in range(per)]
        rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
    return torch.cat(rows, dim=0)


def _cases():
    q, k, v = _rand(NH * D, H), _rand(NG * D, H), _rand(NG * D, H)
    qb, kb, vb = _rand(NH * D), _rand(NG * D), _rand(NG * D)
    vq, vk, vv = _rand(4 * D, H), _rand(4 * D, H), _rand(4 * D, H)
    return [
        (Split.REPLICATED, [_rand(H)], "language"),
        (Split.COLUMN, [_rand(8, H)], "language"),
        (Split.COLUMN, [_rand(8)], "language"),
        (Split.ROW, [_rand(H, 8)], "language"),
        (Split.VOCAB, [_rand(13, H)], "language"),
        (Split.GATE_UP, [_rand(8, H), _rand(8, H)], "language"),
        (Split.GATE_UP, [_rand(8), _rand(8)], "vision"),
        (Split.QKV, [q, k, v], "language"),
        (Split.QKV, [qb, kb, vb], "language"),
        (Split.QKV_FUSED, [torch.cat([vq, vk, vv])], "vision"),
    ]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_every_rule_round_trips_bit_exactly(tp):
    ctx = _ctx(tp)
    for split, hf, comp in _cases():
        shards = [shard_hf_tensors(split, hf, r, ctx, comp) for r in range(tp)]
        assert len({s.shape for s in shards}) == 1, split  # equal shapes: all_gather-able
        back = merge_shards(split, shards, ctx, comp)
        assert len(back) == len(hf) and all(torch.equal(a, b) for a, b in zip(back, hf)), (split, tp)
        assert hf_shapes_from_shard(split, shards[0].shape, ctx, comp) == [tuple(t.shape) for t in hf], split


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layouts_are_megatrons(tp):
    ctx = _ctx(tp)
    q, k, v = _rand(NH * D, H), _rand(NG * D, H), _rand(NG * D, H)
    full = _reference_qkv(q, k, v, NH, NG, D)
    shards = [shard_hf_tensors(Split.QKV, [q, k, v], r, ctx) for r in range(tp)]
    assert all(torch.equal(s, c) for s, c in zip(shards, full.chunk(tp)))  # rank r: groups r*NG/tp...
    # The vision tower's fused HF qkv is q, k, v stacked.
    vq, vk, vv = _rand(4 * D, H), _rand(4 * D, H), _rand(4 * D, H)
    fused = [shard_hf_tensors(Split.QKV_FUSED, [torch.cat([vq, vk, vv])], r, ctx, "vision") for r in range(tp)]
    assert torch.equal(torch.cat(fused), _reference_qkv(vq, vk, vv, 4, 4, D))
    gate, up = _rand(8, H), _rand(8, H)
    for r in range(tp):
        fc1 = shard_hf_tensors(Split.GATE_UP, [gate, up], r, ctx)
        assert torch.equal(fc1, torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]))
    emb = _rand(13, H)
    vocab = torch.cat([shard_hf_tensors(Split.VOCAB, [emb], r, ctx) for r in range(tp)])
    assert vocab.shape == (16, H) and torch.equal(vocab[:13], emb) and not vocab[13:].any()


def test_vocab_shard_that_is_all_padding():
    ctx = _ctx(4, vocab=5, padded=16)  # rank 2 and 3 hold padding rows only
    emb = _rand(5, H)
    shards = [shard_hf_tensors(Split.VOCAB, [emb], r, ctx) for r in range(4)]
    assert [s.shape[0] for s in shards] == [4] * 4 and not shards[3].any()
    assert torch.equal(merge_shards(Split.VOCAB, shards, ctx)[0], emb)


def test_refuses_sizes_tp_does_not_divide():
    with pytest.raises(ValueError, match="num_query_groups=4 is not divisible by tensor_model_parallel_size=8"):
        shard_hf_tensors(Split.QKV, [_rand(NH * D, H), _rand(NG * D, H), _rand(NG * D, H)], 0, _ctx(8, padded=16))


def test_table_names():
    megatron = [r.megatron for r in ROWS]
    assert len(set(megatron)) == len(megatron)
    row, layer = match_megatron_name("language_model.decoder.layers.3.self_attention.linear_qkv.bias")
    assert row.split is Split.QKV and layer == 3
    b = bind("language_model.decoder.layers.1.mlp.linear_fc1.weight", layer_offset=2)
    assert b.hf_names == ("model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight")
    assert bind("vision_model.decoder.layers.1.self_attention.linear_qkv.weight", layer_offset=2).hf_names == ("visual.blocks.1.attn.qkv.weight",)  # vision never offset
    assert bind("language_model.output_layer.weight", tie_word_embeddings=True).hf_names == ("model.embed_tokens.weight",)
    with pytest.raises(KeyError, match="no row"):
        match_megatron_name("language_model.decoder.layers.0.unknown.weight")
    assert hf_aliases("model.norm.weight") == ("model.norm.weight", "model.language_model.norm.weight")
    assert hf_aliases("visual.merger.ln_q.weight")[1] == "model.visual.merger.ln_q.weight"
    assert to_published("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert to_published("model.visual.blocks.0.norm1.weight") == "visual.blocks.0.norm1.weight"
    assert to_published("lm_head.weight") == "lm_head.weight"
