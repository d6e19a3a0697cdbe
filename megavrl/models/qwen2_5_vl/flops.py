"""Model FLOPs of a Qwen2.5-VL training step: the language model and the vision tower.

What MFU (model FLOPs utilisation) divides by the step time and the device's peak. Counted from
the sizes of a HF config (the flat ``config.json`` form: text sizes at the top, the vision tower's
under ``vision_config``), so any published size is counted without building the model:

    flops = actor_step_flops(cfg, n_seq=8, seq_len=4096, video_grid_thw=(16, 20, 26))
    mfu = flops.total / seconds_per_step / peak_flops

Model FLOPs, not hardware FLOPs: recomputed activations are not counted. ``bench/bench_actor_step.py``
reports the MFU of the actor step with it; tests/bench/test_actor_step_flops.py checks the counts
by hand and against transformers' modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megavrl.models.qwen2_5_vl.vision_geometry import frame_cu_seqlens, window_partition


def lm_matmul_params(cfg: dict) -> int:
    """Parameters of the decoder layers and the output layer (the matmul weights a token passes)."""
    h, f, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    attn = h * h + 2 * h * kv + (h + 2 * kv) + h * h  # q, k, v (+ biases), o
    mlp = 3 * h * f
    return L * (attn + mlp + 2 * h) + h + cfg["vocab_size"] * h  # + norms, final norm, output layer


def vision_encoder_params(vision: dict) -> int:
    """Parameters a patch passes in the vision encoder: patch embedding (a C*T*P*P -> d matmul, no
    bias) and ``depth`` blocks of qkv (+ bias), proj (+ bias), gated MLP d -> 2f -> d (+ biases), 2 norms."""
    d, f = vision["hidden_size"], vision["intermediate_size"]
    patch_dim = vision["in_chans"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    block = 4 * d * d + 3 * d * f + 7 * d + 2 * f
    return d * patch_dim + vision["depth"] * block


def vision_merger_params(vision: dict) -> int:
    """Parameters a merged token passes in the merger: RMSNorm(d), m^2*d -> m^2*d -> out (+ biases)."""
    d, unit, out = vision["hidden_size"], vision["spatial_merge_size"] ** 2, vision["out_hidden_size"]
    return d + (unit * d) ** 2 + unit * d + unit * d * out + out


def vision_segments(vision: dict, grid_thw: tuple[int, int, int]) -> tuple[list[int], list[int]]:
    """Lengths in patches of the attention segments of one video: (windows, frames), as the tower
    cuts them (:mod:`megavrl.models.qwen2_5_vl.vision_geometry`)."""
    grid = torch.tensor([grid_thw])
    merge = vision["spatial_merge_size"]
    _, cu_windows = window_partition(grid, merge, vision["window_size"] // merge // vision["patch_size"])
    cu_frames = frame_cu_seqlens(grid)
    return (cu_windows[1:] - cu_windows[:-1]).tolist(), (cu_frames[1:] - cu_frames[:-1]).tolist()


@dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one actor step, split into the language model and the vision tower."""

    language: float
    vision: float

    @property
    def total(self) -> float:
        return self.language + self.vision

    @property
    def vision_share(self) -> float:
        return self.vision / self.total


def actor_step_flops(cfg: dict, n_seq: int, seq_len: int, video_grid_thw: tuple[int, int, int] | None = None,
                     train_encoder: bool = False, train_merger: bool = True) -> StepFlops:
    """Model FLOPs of one training step over ``n_seq`` sequences of ``seq_len`` tokens, each with one
    video of ``video_grid_thw`` (t, h, w) patches (None: text only, the tower idle).

    Language model (every token, forward + backward; causal attention counts half of the S^2
    score and value matmuls):

        6 * N * n_seq * S + n_seq * 12 * L * h * S^2 / 2

    N = lm_matmul_params (decoder layers and output layer, not the embedding lookup), L layers, h
    hidden size. Vision tower, per sequence (P = t*h*w patches, U = P / m^2 merged tokens, d the
    vision width; a segment of l patches costs 4 * d * l^2 in QK^T and AV):

        encoder forward  F = 2 * N_enc * P + 4 * d * (sum over window blocks of sum_windows l^2
                                                      + sum over full blocks of sum_frames l^2)
        encoder          k_enc * F,             k_enc = 3 when it trains, 1 when frozen (forward only)
        merger           k_mrg * 2 * N_mrg * U, k_mrg = 3 when it trains, 1 when frozen

    N_enc = vision_encoder_params, N_mrg = vision_merger_params, windows and frames from
    vision_segments. Backward = 2x forward throughout (the 6N convention, also for the first
    layers whose input gradient is not needed); recomputed activations are not counted (model
    FLOPs, not hardware FLOPs).
    """
    n = lm_matmul_params(cfg)
    language = 6 * n * n_seq * seq_len + n_seq * 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq_len ** 2 / 2
    if video_grid_thw is None:
        return StepFlops(language=language, vision=0.0)
    vision = cfg["vision_config"]
    t, h, w = video_grid_thw
    patches = t * h * w
    windows, frames = vision_segments(vision, video_grid_thw)
    full_blocks = len(vision["fullatt_block_indexes"])
    window_blocks = vision["depth"] - full_blocks
    attention = 4 * vision["hidden_size"] * (window_blocks * sum(x * x for x in windows)
                                             + full_blocks * sum(x * x for x in frames))
    encoder = (3 if train_encoder else 1) * (2 * vision_encoder_params(vision) * patches + attention)
    merged = patches // vision["spatial_merge_size"] ** 2
    merger = (3 if train_merger else 1) * 2 * vision_merger_params(vision) * merged
    return StepFlops(language=language, vision=n_seq * (encoder + merger))


FLOPS_FORMULA = ("MFU = (6*N*n_seq*S + n_seq*12*L*h*S^2/2 + n_seq*(k_enc*(2*N_enc*P + 4*d*sum_blocks sum_segments "
                 "l^2) + k_mrg*2*N_mrg*P/m^2)) / seconds / peak, k = 3 trained, 1 frozen (megavrl.models.qwen2_5_vl."
                 "flops.actor_step_flops)")
