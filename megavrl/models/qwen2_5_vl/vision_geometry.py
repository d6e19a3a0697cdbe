"""Where each vision patch sits: rotary angles, attention windows and frame boundaries.

Pure functions of ``grid_thw`` and a few config sizes, no weights. They reproduce what
transformers' Qwen2.5-VL vision tower computes before its blocks (``get_vision_position_ids``,
``get_vision_attention_seqlens``, ``get_vision_window_index`` and the axial rotary embedding),
in the layout Megatron-Core's layers take.

Vocabulary (sizes in patches unless said otherwise):
- a *patch* is ``temporal_patch_size`` frames x ``patch_size`` x ``patch_size`` pixels; the
  processor emits an image or video as ``t * h * w`` patches, ``grid_thw`` row ``(t, h, w)``;
- a *merge unit* is the ``m x m`` block of patches (m = spatial_merge_size) that the merger
  folds into one LLM token; the processor already emits patches merge-unit by merge-unit;
- a *frame* here is one temporal slice (h * w patches): full-attention blocks attend within it;
- a *window* is a square of ``window_size // patch_size // m`` merge units per side inside one
  frame (smaller at the right/bottom edges); window-attention blocks attend within it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _grid_rows(grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be [num_images_or_videos, 3] (t, h, w), got shape {tuple(grid_thw.shape)}")
    return [(int(t), int(h), int(w)) for t, h, w in grid_thw.tolist()]


def patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch in the processor's merge-unit-major order: [num_patches, 2] long."""
    out = []
    for t, h, w in _grid_rows(grid_thw):
        if h % merge or w % merge:
            raise ValueError(f"grid h={h}, w={w} must be multiples of spatial_merge_size={merge}")
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # merge-unit-major: (block row, block col, row in block, col in block)
        rc = torch.stack([rows.permute(0, 2, 1, 3).reshape(-1), cols.permute(0, 2, 1, 3).reshape(-1)], dim=-1)
        out.append(rc.repeat(t, 1))
    return torch.cat(out, dim=0)


def rotary_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies of the axial 2D rope: head_dim / 4 of them, shared by rows and columns."""
    spatial_dim = head_dim // 2
    return 1.0 / (theta ** (torch.arange(0, spatial_dim, 2, dtype=torch.float32) / spatial_dim))


def rotary_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotation angles in radians, [num_patches, 1, 1, head_dim] float32, Megatron's layout.

    The first half of head_dim rotates with the row, then the column ([row, col]); the second
    half repeats the first, because Megatron's (non-interleaved) rotate_half, like transformers',
    pairs dimension i with i + head_dim / 2.
    """
    pos = positions.to(torch.float32)
    half = torch.cat([pos[:, :1] * inv_freq, pos[:, 1:2] * inv_freq], dim=-1)
    return torch.cat([half, half], dim=-1)[:, None, None, :]


def frame_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Cumulative patch counts at frame boundaries: [num_frames + 1] int32 (full attention)."""
    lengths = [h * w for t, h, w in _grid_rows(grid_thw) for _ in range(t)]
    return F.pad(torch.tensor(lengths, dtype=torch.int64).cumsum(0), (1, 0)).to(torch.int32)


def window_partition(grid_thw: torch.Tensor, merge: int, window_merge_units: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder merge units window by window.

    Returns (window_index, cu_window_seqlens): window_index [num_merge_units] long lists merge
    units (in processor order) window by window, each window row-major inside, windows row-major
    inside a frame, frames in order; cu_window_seqlens [num_windows + 1] int32 are the window
    boundaries counted in patches (merge units x m^2), as transformers' get_vision_window_index.
    """
    if window_merge_units < 1:
        raise ValueError(f"window of {window_merge_units} merge units per side: window_size must be at "
                         "least patch_size * spatial_merge_size pixels")
    indices, lengths, offset = [], [], 0
    k = window_merge_units
    for t, h, w in _grid_rows(grid_thw):
        gh, gw = h // merge, w // merge
        nh, nw = -(-gh // k), -(-gw // k)  # windows per column / row, the last ones may be cut
        units = torch.arange(t * gh * gw).view(t, gh, gw)
        padded = F.pad(units, (0, nw * k - gw, 0, nh * k - gh), value=-1)
        windows = padded.view(t, nh, k, nw, k).permute(0, 1, 3, 2, 4).reshape(t * nh * nw, k * k)
        keep = windows >= 0
        indices.append(windows[keep] + offset)
        lengths.append(keep.sum(dim=1))
        offset += t * gh * gw
    counts = torch.cat(lengths) * (merge * merge)
    cu = F.pad(counts.cumsum(0), (1, 0))
    return torch.cat(indices), cu.to(torch.int32)


def block_diagonal_mask(cu_seqlens: torch.Tensor, device=None) -> torch.Tensor:
    """Boolean attention mask [1, 1, S, S] for Megatron's local attention: True = masked.

    Position i may attend to j only when both lie in the same [cu[k], cu[k+1]) segment.
    (Megatron-Core's DotProductAttention fills True entries with -10000 before the softmax.)
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    segment = segment.to(device) if device is not None else segment
    return (segment[:, None] != segment[None, :])[None, None]


@dataclass
class VisionGeometry:
    """Everything the vision tower needs from grid_thw, in window order (see module docstring).

    window_index: [num_merge_units] long, processor order -> window order (of merge units);
    rotary: [num_patches, 1, 1, head_dim] float32 angles, already in window order;
    cu_frames / cu_windows: int32 segment boundaries in patches, in window order (a frame is a
        union of whole windows, so frame boundaries are the same in both orders).
    """

    window_index: torch.Tensor
    rotary: torch.Tensor
    cu_frames: torch.Tensor
    cu_windows: torch.Tensor

    @property
    def num_patches(self) -> int:
        return int(self.cu_frames[-1])

    @classmethod
    def from_grid(cls, grid_thw: torch.Tensor, *, spatial_merge_size: int, patch_size: int,
                  window_size: int, head_dim: int, rope_theta: float,
                  device: torch.device | str | None = None) -> "VisionGeometry":
        """window_size is in pixels (as in the HF config), the rest in patches or dimensions."""
        grid_cpu = grid_thw.detach().to("cpu", torch.int64)
        merge = spatial_merge_size
        window_index, cu_windows = window_partition(grid_cpu, merge, window_size // merge // patch_size)
        unit = merge * merge
        angles = rotary_angles(patch_positions(grid_cpu, merge), rotary_inv_freq(head_dim, rope_theta))
        angles = angles.view(-1, unit, *angles.shape[1:])[window_index].flatten(0, 1)
        return cls(window_index=window_index.to(device), rotary=angles.to(device),
                   cu_frames=frame_cu_seqlens(grid_cpu).to(device), cu_windows=cu_windows.to(device))
