"""The lazy HF safetensors reader (both on-disk layouts) and the TP slices it reads.

Loading into and exporting from a sharded Megatron model at TP=2 / PP=2 is tested, bit-exactly,
in tests/models/qwen2_5_vl/test_model.py (one torchrun launch shared with the parity checks).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from megavrl.checkpoint.hf_io import HFCheckpointReader
from megavrl.checkpoint.mapping import (AttentionGeometry, MappingContext, Split, assemble_shard, shard_hf_tensors,
                                        shard_pieces, to_published)


@pytest.mark.parametrize("fixture", ["tiny_hf_dir", "tiny_tied_hf_dir"])
def test_reader_answers_in_the_published_layout(fixture, request):
    hf_dir = request.getfixturevalue(fixture)
    disk = load_file(hf_dir / "model.safetensors")
    with HFCheckpointReader(hf_dir) as reader:
        assert sorted(reader.names()) == sorted(disk)
        for name, tensor in disk.items():
            published = to_published(name)
            assert reader.has(published) and reader.resolve(published) == name
            assert torch.equal(reader.read(published), tensor)
        w = reader.read("model.layers.1.mlp.down_proj.weight")
        assert torch.equal(reader.read("model.layers.1.mlp.down_proj.weight", 1, 128, 512), w[:, 128:512])
        assert torch.equal(reader.read("model.layers.1.mlp.down_proj.weight", 0, 3, 7), w[3:7])
        with pytest.raises(KeyError, match="model.layers.99.mlp.up_proj.weight"):
            reader.resolve("model.layers.99.mlp.up_proj.weight")


def test_sliced_reads_build_the_same_shards_as_full_tensors(tiny_hf_dir):
    """What a rank reads from disk (slices only) equals sharding the full tensors."""
    ctx = MappingContext(tp_size=2, vocab_size=728, padded_vocab_size=768, language=AttentionGeometry(4, 2, 64))
    names = {Split.QKV: ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                         "model.layers.0.self_attn.v_proj.weight"),
             Split.GATE_UP: ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"),
             Split.VOCAB: ("model.embed_tokens.weight",), Split.ROW: ("model.layers.0.self_attn.o_proj.weight",)}
    with HFCheckpointReader(tiny_hf_dir) as reader:
        for split, hf in names.items():
            full = [reader.read(n) for n in hf]
            for rank in range(2):
                pieces = shard_pieces(split, [t.shape for t in full], rank, ctx)
                lazy = assemble_shard(split, [reader.read(hf[p[0]], *p[1:]) for p in pieces], ctx)
                assert torch.equal(lazy, shard_hf_tensors(split, full, rank, ctx)), (split, rank)
