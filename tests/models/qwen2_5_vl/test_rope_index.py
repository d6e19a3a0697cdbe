"""M-RoPE position ids equal transformers' get_rope_index exactly (and vLLM's with convention="qwen")."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megavrl.models.qwen2_5_vl.rope_index import get_rope_index, rope_index_kwargs, text_position_ids

IMG, VID, VS, VE = 901, 902, 903, 904  # token ids of the synthetic cases
MERGE = 2


def _hf_rope_index(config, **inputs):
    """transformers' own implementation, called without building a model."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    class _NoWeights:
        get_rope_index = Qwen2_5_VLModel.get_rope_index
        get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids

        def __init__(self, config):
            self.config = config

    return _NoWeights(config).get_rope_index(**inputs)


def _hf_config(tokens_per_second=2):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS,
                            vision_end_token_id=VE,
                            vision_config=dict(spatial_merge_size=MERGE, tokens_per_second=tokens_per_second))


def _block(token, grid):
    t, h, w = grid
    return [VS] + [token] * (t * h * w // MERGE ** 2) + [VE]


def _synthetic_batch(padding_side):
    """Three rows: image+video+text, video-only with a long clip, text-only; padded."""
    rng = np.random.default_rng(0)
    text = lambda n: rng.integers(1, 800, n).tolist()  # noqa: E731
    img_grids = [(1, 4, 6), (1, 2, 2), (1, 6, 4)]
    vid_grids = [(3, 4, 4), (8, 2, 4), (2, 4, 2)]
    rows = [
        text(5) + _block(IMG, img_grids[0]) + text(3) + _block(VID, vid_grids[0]) + text(4)
        + _block(IMG, img_grids[1]) + text(2),
        _block(VID, vid_grids[1]) + text(7) + _block(VID, vid_grids[2]) + _block(IMG, img_grids[2]) + text(1),
        text(9),
    ]
    seq = max(map(len, rows)) + 2
    ids = torch.zeros(len(rows), seq, dtype=torch.long)
    mask = torch.zeros(len(rows), seq, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(seq - len(r), seq) if padding_side == "left" else slice(0, len(r))
        ids[i, sl] = torch.tensor(r)
        mask[i, sl] = 1
    return dict(input_ids=ids, attention_mask=mask, image_grid_thw=torch.tensor(img_grids),
                video_grid_thw=torch.tensor(vid_grids),
                second_per_grid_ts=torch.tensor([1.0, 0.75, 2 / 3], dtype=torch.float32))


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_equals_transformers_on_mixed_synthetic_batch(padding_side):
    config = _hf_config()
    inputs = _synthetic_batch(padding_side)
    types = torch.zeros_like(inputs["input_ids"])
    types[inputs["input_ids"] == IMG], types[inputs["input_ids"] == VID] = 1, 2
    ref_pos, ref_delta = _hf_rope_index(config, mm_token_type_ids=types, **inputs)
    pos, delta = get_rope_index(**inputs, **rope_index_kwargs(config))
    assert pos.shape == (3, 3, inputs["input_ids"].shape[1]) and pos.dtype == ref_pos.dtype
    assert torch.equal(pos, ref_pos)
    assert torch.equal(delta, ref_delta)
    # A text-only row is counted 0, 1, 2 ... over its real tokens, like text_position_ids.
    text_row = text_position_ids(inputs["attention_mask"])[:, 2]
    assert torch.equal(pos[:, 2], text_row)


def test_equals_transformers_on_processor_output(tiny_hf_dir):
    """A batch of 2 built by the real processor: text + image + video + text, and video + text, left-padded."""
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(tiny_hf_dir)
    processor = AutoProcessor.from_pretrained(tiny_hf_dir)
    processor.tokenizer.padding_side = "left"
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)
    video = rng.integers(0, 255, (6, 56, 56, 3), dtype=np.uint8)
    messages = [
        [{"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "image"},
                                      {"type": "text", "text": "and"}, {"type": "video"},
                                      {"type": "text", "text": "the answer"}]}],
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "describe the clip"}]}],
    ]
    texts = [processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    batch = processor(text=texts, images=[image], videos=[video, video[:2]], padding=True, return_tensors="pt")
    batch["second_per_grid_ts"] = torch.tensor([1.0, 0.5])  # temporal scaling that is not a no-op
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "image_grid_thw", "video_grid_thw",
                                    "second_per_grid_ts")}
    ref_pos, ref_delta = _hf_rope_index(config, mm_token_type_ids=batch["mm_token_type_ids"], **inputs)
    pos, delta = get_rope_index(**inputs, **rope_index_kwargs(config))
    assert torch.equal(pos, ref_pos) and torch.equal(delta, ref_delta)
    # The derived modality types are the processor's.
    pos2, _ = get_rope_index(**inputs, **rope_index_kwargs(config), mm_token_type_ids=batch["mm_token_type_ids"])
    assert torch.equal(pos2, pos)


def test_conventions_differ_after_videos_longer_than_wide():
    inputs = _synthetic_batch("left")
    kw = rope_index_kwargs(_hf_config())
    hf_pos, _ = get_rope_index(**inputs, **kw)
    qwen_pos, _ = get_rope_index(**inputs, **kw, convention="qwen")
    # Text-only rows agree; rows whose clips span more temporal ids than merged rows/columns
    # (3 steps x 2 s/step vs 2x2, 8 steps x 1.5 vs 1x2) resume text at different ids.
    assert torch.equal(hf_pos[:, 2], qwen_pos[:, 2])
    assert not torch.equal(hf_pos[:, 0], qwen_pos[:, 0]) and not torch.equal(hf_pos[:, 1], qwen_pos[:, 1])
    with pytest.raises(ValueError, match="convention"):
        get_rope_index(**inputs, **kw, convention="other")


def test_refuses_grids_that_do_not_match_the_placeholders():
    inputs = _synthetic_batch("left")
    kw = rope_index_kwargs(_hf_config())
    with pytest.raises(ValueError, match="placeholder tokens"):
        get_rope_index(**{**inputs, "image_grid_thw": torch.tensor([[1, 4, 4], [1, 2, 2], [1, 6, 4]])}, **kw)
    with pytest.raises(ValueError, match="more video blocks"):
        get_rope_index(**{**inputs, "video_grid_thw": inputs["video_grid_thw"][:1]}, **kw)


@pytest.mark.slow
@pytest.mark.vllm
def test_qwen_convention_equals_vllm():
    """convention="qwen" gives vLLM 0.32's M-RoPE positions (what rollouts were sampled with)."""
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as VllmQwen

    inputs = _synthetic_batch("left")
    kw = rope_index_kwargs(_hf_config())
    pos, delta = get_rope_index(**inputs, **kw, convention="qwen")
    grids = {IMG: iter(inputs["image_grid_thw"].tolist()), VID: iter(inputs["video_grid_thw"].tolist())}
    seconds = iter(inputs["second_per_grid_ts"].tolist())
    for b in range(2):  # the rows with vision blocks
        tokens = inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
        feats = []
        for i, tok in enumerate(tokens):
            if tok in (IMG, VID) and (i == 0 or tokens[i - 1] != tok):
                t, h, w = next(grids[tok])
                factor = next(seconds) * kw["tokens_per_second"] if tok == VID else 1.0
                feats.append((i, t, h // MERGE, w // MERGE, factor))

        class _Dummy:
            def iter_mm_grid_thw(self, mm_features):
                return iter(mm_features)

        ref, ref_delta = VllmQwen.get_mrope_input_positions(_Dummy(), tokens, feats)
        assert torch.equal(pos[:, b, inputs["attention_mask"][b].bool()], ref.to(pos.dtype))
        assert delta[b].item() == ref_delta


def test_packed_ids_restart_in_every_segment():
    """Sequences packed end to end in one row get exactly their own ids (as in a padded batch),
    vision blocks included, not ids continuing from the segment before."""
    from megavrl.models.qwen2_5_vl.rope_index import get_rope_index_packed

    config = _hf_config()
    inputs = _synthetic_batch("right")
    padded, _ = get_rope_index(**inputs, **rope_index_kwargs(config))
    real = inputs["attention_mask"].bool()
    lengths = real.sum(dim=1)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).int()
    packed = get_rope_index_packed(inputs["input_ids"][real][None], cu, inputs["image_grid_thw"],
                                   inputs["video_grid_thw"], inputs["second_per_grid_ts"], **rope_index_kwargs(config))
    assert packed.shape == (3, 1, int(lengths.sum()))
    assert torch.equal(packed[:, 0], padded[:, real])
    assert packed[:, 0, lengths[0]].tolist() == [0, 0, 0]  # the second sequence starts over
    with pytest.raises(ValueError, match="do not cover"):
        get_rope_index_packed(inputs["input_ids"][real], cu[:-1], inputs["image_grid_thw"], inputs["video_grid_thw"],
                              inputs["second_per_grid_ts"], **rope_index_kwargs(config))
