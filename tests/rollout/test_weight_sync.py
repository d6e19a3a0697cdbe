"""Weight sync into vLLM: bucketing and name rules, then in-place updates checked against transformers."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from megavrl.rollout import RolloutPrompt
from megavrl.rollout.weight_sync import check_hf_name, iter_buckets, pack_bucket, prepare_stream, unpack_bucket
from tests.rollout.helpers import hf_response_logprobs, hf_video_inputs, video_prompt

LOGPROB_ATOL = 1e-4  # see test_engine.py: fp32 numerics ~1e-6, real errors >= 1e-2


# ---- pure functions (no vLLM) -------------------------------------------------------------------

def test_iter_buckets_keeps_order_and_bounds_size():
    tensors = [(f"model.t{i}", torch.zeros(n, dtype=torch.float32)) for i, n in enumerate([10, 10, 30, 5, 1, 100])]
    buckets = list(iter_buckets(iter(tensors), bucket_bytes=80))  # 20 floats
    assert [[name for name, _ in b] for b in buckets] == [["model.t0", "model.t1"], ["model.t2"],
                                                          ["model.t3", "model.t4"], ["model.t5"]]
    with pytest.raises(ValueError):
        list(iter_buckets(iter(tensors), bucket_bytes=0))


def test_prepare_stream_casts_checks_names_and_drops_tied_lm_head():
    stream = [("model.embed_tokens.weight", torch.ones(2, 3, dtype=torch.float32).t()),
              ("lm_head.weight", torch.ones(3, 2))]
    skipped: list[str] = []
    out = list(prepare_stream(stream, dtype=torch.bfloat16, tied_embeddings=True, skipped=skipped))
    assert [n for n, _ in out] == ["model.embed_tokens.weight"] and skipped == ["lm_head.weight"]
    assert out[0][1].dtype == torch.bfloat16 and out[0][1].is_contiguous()
    assert len(list(prepare_stream(stream, dtype=torch.float32, tied_embeddings=False, skipped=[]))) == 2
    for good in ("visual.blocks.0.attn.qkv.weight", "model.language_model.norm.weight",
                 "model.visual.merger.mlp.0.bias"):
        check_hf_name(good)
    with pytest.raises(ValueError, match="decoder.layers.0.self_attention"):
        check_hf_name("decoder.layers.0.self_attention.linear_qkv.weight")  # a Megatron name


def test_pack_unpack_round_trip():
    """The CUDA IPC transport's packing, run on CPU: views come back bit-exact and aligned."""
    g = torch.Generator().manual_seed(0)
    bucket = [("model.a", torch.randn(3, 5, generator=g)), ("model.b", torch.randn(7, generator=g).bfloat16()),
              ("model.c", torch.arange(3, dtype=torch.int64)), ("model.d", torch.tensor(2.5)),
              ("model.e", torch.randn(4, 6, generator=g).t())]  # not contiguous
    buffer, specs = pack_bucket(bucket, "cpu")
    assert all(offset % 256 == 0 for *_, offset, _ in specs)
    for (name, original), (name2, view) in zip(bucket, unpack_bucket(buffer, specs)):
        assert name == name2 and view.dtype == original.dtype and view.shape == original.shape
        assert torch.equal(view, original)


# ---- vLLM ---------------------------------------------------------------------------------------

def _greedy(engine, video):
    prompts = [RolloutPrompt(prompt=video_prompt("what happens in the video"), videos=[video]),
               "<|im_start|>user\nname a color<|im_end|>\n<|im_start|>assistant\n"]
    return engine.generate(prompts, n=1, temperature=0.0, max_new_tokens=8, ignore_eos=True)


def _assert_same(a, b):
    for ga, gb in zip(a, b):
        assert ga.samples[0].token_ids == gb.samples[0].token_ids
        np.testing.assert_allclose(ga.samples[0].logprobs, gb.samples[0].logprobs, rtol=0, atol=1e-6)


def _assert_matches_transformers(groups, hf_dir: Path, video):
    group = groups[0]  # the video prompt
    inputs = hf_video_inputs(str(hf_dir), group.prompt.prompt, video)
    assert group.prompt_token_ids == inputs["input_ids"][0].tolist()
    ref = hf_response_logprobs(str(hf_dir), inputs, [group.samples[0].token_ids])[0]
    np.testing.assert_allclose(group.samples[0].logprobs, ref, rtol=0, atol=LOGPROB_ATOL)


def _shm_leftovers() -> list[str]:
    return sorted(str(p) for p in Path("/dev/shm").glob("megavrl-wsync-*"))


@pytest.fixture(scope="module")
def rerandomised_hf_dir(tmp_path_factory):
    """The ``tiny`` preset with other random weights (seed 1), same tokenizer and config."""
    from megavrl.checkpoint.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-seed1") / "hf", preset="tiny", seed=1)


@pytest.mark.vllm
def test_update_weights_round_trip(rollout_engine, tiny_hf_dir, rerandomised_hf_dir, test_video):
    from safetensors.torch import load_file

    leftovers = _shm_leftovers()
    original = _greedy(rollout_engine, test_video)  # engine started from the true weights
    random_state = load_file(Path(rerandomised_hf_dir) / "model.safetensors")
    true_state = load_file(Path(tiny_hf_dir) / "model.safetensors")
    try:
        # 50 kB buckets: q/k/v and gate/up of one layer land in different buckets
        stats = rollout_engine.update_weights(iter(random_state.items()), bucket_mb=0.05)
        assert stats.num_tensors == len(random_state) and stats.num_buckets > 50
        assert stats.bytes_moved == sum(t.numel() * t.element_size() for t in random_state.values())
        assert stats.params_not_updated == [] and stats.skipped == [] and stats.transport == "shm"
        assert stats.seconds > 0 and stats.mb_per_s > 0
        randomised = _greedy(rollout_engine, test_video)
        assert [g.samples[0].token_ids for g in randomised] != [g.samples[0].token_ids for g in original]
        # vision embeddings of this video were cached with the old weights: must not be reused
        _assert_matches_transformers(randomised, rerandomised_hf_dir, test_video)
    finally:
        stats = rollout_engine.update_weights(iter(true_state.items()))  # one 512 MB bucket
    assert stats.num_buckets == 1
    _assert_same(_greedy(rollout_engine, test_video), original)
    _assert_matches_transformers(original, tiny_hf_dir, test_video)
    assert _shm_leftovers() == leftovers  # bucket files removed


@pytest.mark.vllm
def test_partial_update_touches_only_what_is_sent(rollout_engine, tiny_hf_dir, test_video):
    from safetensors.torch import load_file

    true_lm_head = load_file(Path(tiny_hf_dir) / "model.safetensors")["lm_head.weight"]
    try:
        stats = rollout_engine.update_weights([("lm_head.weight", torch.zeros_like(true_lm_head))])
        assert stats.num_tensors == 1 and "language_model.lm_head.weight" not in stats.params_not_updated
        assert "language_model.model.embed_tokens.weight" in stats.params_not_updated
        vocab = rollout_engine.llm.llm_engine.model_config.get_vocab_size()
        for group in _greedy(rollout_engine, test_video):  # zero logits: uniform over the vocabulary
            np.testing.assert_allclose(group.samples[0].logprobs, -math.log(vocab), atol=1e-5)
    finally:
        rollout_engine.update_weights([("lm_head.weight", true_lm_head)])
    _assert_matches_transformers(_greedy(rollout_engine, test_video), tiny_hf_dir, test_video)


@pytest.mark.vllm
@pytest.mark.slow
def test_update_weights_tied_embeddings(tiny_tied_hf_dir, tmp_path_factory, test_video):
    """Tied model, transformers-5 names; the stream also carries lm_head.weight, which must be skipped."""
    from safetensors.torch import load_file

    from megavrl.checkpoint.tiny import make_tiny_model
    from megavrl.rollout import RolloutConfig, RolloutEngine
    from tests.rollout.conftest import ENGINE_SETTINGS

    other = make_tiny_model(tmp_path_factory.mktemp("tied-seed1") / "hf", preset="tiny-tied", seed=1,
                            layout="transformers")
    state = load_file(Path(other) / "model.safetensors")
    assert "lm_head.weight" not in state
    stream = [*state.items(), ("lm_head.weight", state["model.language_model.embed_tokens.weight"])]
    with RolloutEngine(tiny_tied_hf_dir, RolloutConfig(**ENGINE_SETTINGS)) as engine:
        assert engine.tied_embeddings
        _assert_matches_transformers(_greedy(engine, test_video), tiny_tied_hf_dir, test_video)
        stats = engine.update_weights(iter(stream), bucket_mb=0.05)
        assert stats.skipped == ["lm_head.weight"] and stats.params_not_updated == []
        _assert_matches_transformers(_greedy(engine, test_video), other, test_video)
