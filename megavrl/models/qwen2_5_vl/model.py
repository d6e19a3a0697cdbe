"""Qwen2.5-VL in Megatron-Core: one pipeline stage of vision tower + text decoder.

    configs = build_configs(hf_dir, tp=layout.tp, pp=layout.pp)
    model = Qwen2_5_VLModel(configs)               # this rank's stage and TP shard
    load_hf_weights(model, hf_dir)                 # megavrl.checkpoint.hf_io
    logits = model(input_ids, attention_mask=mask, pixel_values_videos=..., video_grid_thw=...,
                   second_per_grid_ts=...)        # last stage: [B, S, padded_vocab / TP]

Data flow on the first stage: text embeddings [S, B, H] <- the vision tower's merged embeddings
written at the ``<|image_pad|>`` / ``<|video_pad|>`` positions (images first, then videos, each
in order of appearance) -> decoder layers of the stage. Later stages receive hidden states
through ``set_input_tensor`` (Megatron's pipeline schedule calls it). Every stage needs the
M-RoPE position ids: computed from ``input_ids`` and the grids with
:func:`megavrl.models.qwen2_5_vl.rope_index.get_rope_index` unless passed in.
"""
from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule

from megavrl.models.qwen2_5_vl.config import Qwen2_5_VLConfigs
from megavrl.models.qwen2_5_vl.language import (build_language_model, causal_padding_mask, padding_mask,
                                                takes_padding_mask)
from megavrl.models.qwen2_5_vl.rope_index import get_rope_index, get_rope_index_packed


class Qwen2_5_VLModel(MegatronModule):
    """One pipeline stage of Qwen2.5-VL.

    Args:
        configs: from :func:`megavrl.models.qwen2_5_vl.config.build_configs`.
        pre_process / post_process: whether this stage holds the embedding (and the vision
            tower) / the final norm and output layer; default from Megatron's parallel state.
        parallel_output: keep logits split over the vocabulary across TP ranks (default).
        freeze_vision: the vision encoder (patch embedding and blocks) gets no gradients.
        freeze_projector: the merger (vision -> text width projector) gets no gradients.
        rope_convention: how position ids are computed when not passed in (see
            :mod:`megavrl.models.qwen2_5_vl.rope_index`): "qwen" (default) matches vLLM's rollouts
            and the data pipeline's default; "transformers" matches transformers 5.19 (the parity
            check uses it). They differ only for text after a video whose scaled temporal extent
            exceeds its merged height and width.

    Submodules: ``vision_model`` (first stage only, else None) and ``language_model`` (GPTModel);
    their parameter names are the Megatron side of :mod:`megavrl.checkpoint.mapping`.
    """

    def __init__(self, configs: Qwen2_5_VLConfigs, pre_process: bool | None = None,
                 post_process: bool | None = None, parallel_output: bool = True,
                 freeze_vision: bool = False, freeze_projector: bool = False,
                 rope_convention: str = "qwen", language_spec=None, vision_spec=None):
        super().__init__(config=configs.language)
        if pre_process is None:
            pre_process = parallel_state.is_pipeline_first_stage()
        if post_process is None:
            post_process = parallel_state.is_pipeline_last_stage()
        self.configs = configs
        self.pre_process, self.post_process = pre_process, post_process
        self.rope_convention = rope_convention
        self.image_token_id, self.video_token_id = configs.image_token_id, configs.video_token_id
        self.vision_model = None
        if pre_process:
            from megavrl.models.qwen2_5_vl.vision import Qwen2_5_VisionModel

            self.vision_model = Qwen2_5_VisionModel(configs.hf_config.vision_config, configs.vision,
                                                    spec=vision_spec, freeze_vision=freeze_vision,
                                                    freeze_projector=freeze_projector)
        self.language_model = build_language_model(configs, pre_process, post_process,
                                                   parallel_output=parallel_output, spec=language_spec)
        self.padding_mask_attention = takes_padding_mask(self.language_model)
        # Megatron's schedules read these from the model.
        self.model_type = self.language_model.model_type
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights

    @property
    def layer_offset(self) -> int:
        """Global index of this stage's first text layer."""
        layers = self.language_model.decoder.layers
        return layers[0].layer_number - 1 if len(layers) else 0

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                     second_per_grid_ts: torch.Tensor | None = None) -> torch.Tensor:
        """[3, B, S] M-RoPE ids (see rope_index.get_rope_index)."""
        pos, _ = get_rope_index(input_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask,
                                convention=self.rope_convention, **self.configs.rope_index_kwargs())
        return pos

    def packed_position_ids(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                            image_grid_thw: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                            second_per_grid_ts: torch.Tensor | None = None) -> torch.Tensor:
        """[3, 1, T] M-RoPE ids of sequences packed in one row: each segment's own ids (see
        rope_index.get_rope_index_packed)."""
        return get_rope_index_packed(input_ids, cu_seqlens, image_grid_thw, video_grid_thw, second_per_grid_ts,
                                     convention=self.rope_convention, **self.configs.rope_index_kwargs())

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
              image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
              video_grid_thw: torch.Tensor | None = None, vision_token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """First stage: text embeddings with the vision embeddings spliced in. [S, B, H].

        vision_token_mask: [B, S] bool, True where a placeholder token is a real image/video slot
            (the prompt). Placeholder ids a model *generated* in its response are ordinary tokens,
            embedded as text, exactly as the rollout engine treats them. None: every placeholder.
        """
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [S, B, H]
        visual = []
        for pixels, grid, token in ((pixel_values, image_grid_thw, self.image_token_id),
                                    (pixel_values_videos, video_grid_thw, self.video_token_id)):
            mask = input_ids == token
            if vision_token_mask is not None:
                mask = mask & vision_token_mask.bool()
            n_tokens = int(mask.sum())
            if pixels is None:
                if n_tokens:
                    raise ValueError(f"input_ids hold {n_tokens} placeholder tokens (id {token}) but no pixels")
                continue
            if grid is None:
                raise ValueError("pixel values given without their grid_thw")
            features = self.vision_model(pixels, grid)
            if features.shape[0] != n_tokens:
                raise ValueError(f"the vision tower gave {features.shape[0]} embeddings for {n_tokens} "
                                 f"placeholder tokens (id {token}) in input_ids")
            visual.append((mask, features))
        if not visual:
            return emb
        emb = emb.transpose(0, 1).clone()  # [B, S, H]: row-major order = order of appearance
        for mask, features in visual:
            emb[mask] = features.to(emb.dtype)
        return emb.transpose(0, 1).contiguous()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None, second_per_grid_ts: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, runtime_gather_output: bool | None = None,
                vision_token_mask: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        """input_ids [B, S]; attention_mask [B, S] (1 = real token, HF convention) or a ready
        Megatron mask (True = masked: the [B, 1, 1, S] key padding of language.padding_mask, or a
        full [B, 1, S, S] mask, not on the TE spec), None for no padding; position_ids [3, B, S]
        or None to compute them; pixel_values / pixel_values_videos [patches, C*T*P*P] and their
        grid_thw [n, 3] (first stage); second_per_grid_ts [num_videos] seconds per temporal patch.

        Returns on the last stage logits [B, S, padded_vocab / TP] (or the full padded vocabulary
        with runtime_gather_output=True), or per-token losses [B, S] when labels are given; on
        other stages the hidden states [S, B, H] for the next stage. vision_token_mask: see
        :meth:`embed` (RL sequences pass it with explicit position_ids, because sampled responses
        may contain placeholder ids that are not vision slots).

        packed_seq_params: Megatron's ``PackedSeqParams`` (``qkv_format="thd"``) for sequences packed
        end to end in one row (input_ids [1, T], see :mod:`megavrl.rl.packing`): attention stays
        inside each [cu_seqlens[i], cu_seqlens[i+1]); no attention_mask; position_ids [3, 1, T]
        hold each sequence's own ids (computed per segment when None).
        """
        batch, seq = input_ids.shape
        if packed_seq_params is not None:
            if batch != 1 or attention_mask is not None:
                raise ValueError(f"packed sequences are one row (input_ids [1, T], got {tuple(input_ids.shape)}) "
                                 "whose segments come from packed_seq_params: pass no attention_mask")
            if position_ids is None:
                position_ids = self.packed_position_ids(input_ids, packed_seq_params.cu_seqlens_q, image_grid_thw,
                                                        video_grid_thw, second_per_grid_ts)
            return self._decode(input_ids, position_ids, None, pixel_values, image_grid_thw, pixel_values_videos,
                                video_grid_thw, vision_token_mask, labels, runtime_gather_output, packed_seq_params)
        hf_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if position_ids is None:
            position_ids = self.position_ids(input_ids, hf_mask, image_grid_thw, video_grid_thw, second_per_grid_ts)
        if attention_mask is None or attention_mask.dim() == 2:
            make_mask = padding_mask if self.padding_mask_attention else causal_padding_mask
            attention_mask = make_mask(hf_mask, seq, batch, device=input_ids.device)
        return self._decode(input_ids, position_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                            video_grid_thw, vision_token_mask, labels, runtime_gather_output, None)

    def _decode(self, input_ids, position_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                video_grid_thw, vision_token_mask, labels, runtime_gather_output, packed_seq_params):
        decoder_input = None
        if self.pre_process:
            decoder_input = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                       vision_token_mask)
        return self.language_model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                   decoder_input=decoder_input, labels=labels,
                                   runtime_gather_output=runtime_gather_output, packed_seq_params=packed_seq_params)


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "pixel_values", "image_grid_thw",
                "pixel_values_videos", "video_grid_thw", "second_per_grid_ts", "vision_token_mask",
                "packed_seq_params")


@torch.no_grad()
def pipeline_forward(model: Qwen2_5_VLModel, batch: dict, gather_vocab: bool = False) -> torch.Tensor | None:
    """Forward one batch through all pipeline stages with Megatron's schedule (forward only).

    batch: the model's forward arguments (``MODEL_INPUTS``; other keys are ignored), the same on
        every stage. Returns the logits [B, S, padded_vocab / TP] (full padded vocabulary with
        gather_vocab=True) on the last stage, None on the others. Call it on every rank.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    inputs = {k: batch[k] for k in MODEL_INPUTS if batch.get(k) is not None}
    batch_size, seq = inputs["input_ids"].shape

    def step(data_iterator, stage_model):
        out = stage_model(**next(data_iterator), runtime_gather_output=gather_vocab or None)
        return out, lambda output, non_loss_data=True: output

    was_training = model.training
    model.eval()
    try:
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([inputs]), model=[model], num_microbatches=1,
            seq_length=seq, micro_batch_size=batch_size, forward_only=True, collect_non_loss_data=True)
    finally:
        model.train(was_training)
    return outputs[0] if model.post_process else None
