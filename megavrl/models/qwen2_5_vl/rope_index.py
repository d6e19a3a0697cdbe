"""M-RoPE position ids of Qwen2.5-VL: a pure function of token ids and vision grids.

Qwen2.5-VL rotates each query/key with three position ids (temporal, height, width; the
``mrope_section`` of the text config says how many rotary frequencies each gets). Text tokens
carry the same id on all three axes, counting up by one. The merged vision tokens of an image
or a video carry their (t, h, w) coordinate in the merged grid, offset by the position where
the vision block starts; a video's temporal coordinate is scaled by
``tokens_per_second * second_per_grid_t`` (seconds covered by one temporal patch), so that ids
follow time in seconds rather than frame indices.

``get_rope_index`` reproduces ``transformers.Qwen2_5_VLModel.get_rope_index`` (5.19) exactly:
left or right padding (``attention_mask``: padded positions get 0), batches with several
images/videos (grids consumed in order of appearance across the batch), text before, between
and after vision blocks. It needs no model: the data pipeline calls it when it builds prompts,
the Megatron model on every pipeline stage.

Where text resumes after a vision block (``convention``):
- "transformers" (default): transformers >= 5.3 advances by the spatial extent only,
  ``start + max(h, w) / merge``;
- "qwen": the original Qwen2.5-VL code, transformers <= 5.2 and vLLM 0.32 resume at
  ``max(all ids of the block) + 1``, which differs for videos whose scaled temporal extent
  exceeds their merged height and width. Use this one to score tokens that vLLM sampled.
"""
from __future__ import annotations

import itertools
from typing import Iterable

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def rope_index_kwargs(hf_config) -> dict:
    """The keyword arguments of :func:`get_rope_index` read from a ``Qwen2_5_VLConfig``."""
    vision = hf_config.vision_config
    return dict(image_token_id=hf_config.image_token_id, video_token_id=hf_config.video_token_id,
                spatial_merge_size=vision.spatial_merge_size, tokens_per_second=vision.tokens_per_second)


def mm_token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """Per-token modality, as the Qwen2.5-VL processor's ``mm_token_type_ids``: 0 text, 1 image, 2 video."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == image_token_id] = IMAGE
    types[input_ids == video_token_id] = VIDEO
    return types


def _vision_positions(start: int, grid_thw: torch.Tensor, merge: int, time_interval, device) -> torch.Tensor:
    """[3, t*h*w/merge^2] ids of one vision block starting at ``start`` (t scaled by time_interval)."""
    t, h, w = grid_thw[0].item(), grid_thw[1].item() // merge, grid_thw[2].item() // merge
    pos_t = (torch.arange(t, device=device) * time_interval).long()  # scale first, then truncate
    pos_h = torch.arange(h, device=device) + start
    pos_w = torch.arange(w, device=device) + start
    tt, hh, ww = torch.meshgrid(pos_t, pos_h, pos_w, indexing="ij")
    ids = torch.stack([tt, hh, ww], dim=0).reshape(3, -1)
    ids[0] += start
    return ids


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | Iterable[float] | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2,
    mm_token_type_ids: torch.Tensor | None = None,
    convention: str = "transformers",
) -> tuple[torch.Tensor, torch.Tensor]:
    """M-RoPE position ids and rope deltas of a batch.

    input_ids: [B, S] token ids (``<|image_pad|>`` / ``<|video_pad|>`` already expanded to one
        token per merged patch, as the processor does).
    image_grid_thw, video_grid_thw: [n, 3] patch grids (t, h, w before merging), in order of
        appearance over the whole batch (row 0 first).
    second_per_grid_ts: one value per video, seconds per temporal patch (processor output);
        default 1.0 each.
    attention_mask: [B, S], 1 for real tokens, 0 for padding (either side). Padding gets id 0.
    mm_token_type_ids: [B, S] modality per token; default derived from the two token ids.
    convention: "transformers" or "qwen" (see the module docstring).
    Returns (position_ids [3, B, S] of input_ids' dtype, rope_deltas [B, 1]): rope_deltas is
    ``max id + 1 - number of real tokens``, so a generated token at index i (0-based, counting real
    tokens) has id ``i + rope_delta`` on all three axes.
    """
    if convention not in ("transformers", "qwen"):
        raise ValueError(f"convention must be 'transformers' or 'qwen', not {convention!r}")
    if mm_token_type_ids is None:
        mm_token_type_ids = mm_token_types(input_ids, image_token_id, video_token_id)
    device = input_ids.device
    batch, seq = input_ids.shape
    position_ids = torch.zeros(3, batch, seq, dtype=input_ids.dtype, device=device)
    grids = {IMAGE: iter(image_grid_thw) if image_grid_thw is not None else None,
             VIDEO: iter(video_grid_thw) if video_grid_thw is not None else None}
    seconds = iter(second_per_grid_ts) if second_per_grid_ts is not None else itertools.repeat(1)
    deltas = []
    for b in range(batch):
        types = mm_token_type_ids[b]
        keep = attention_mask[b].bool() if attention_mask is not None else None
        if keep is not None:
            types = types[keep]
        pieces, pos = [], 0
        for modality, group in itertools.groupby(types.tolist()):
            length = len(list(group))
            if modality == TEXT:
                pieces.append(torch.arange(length, device=device).view(1, -1).expand(3, -1) + pos)
                pos += length
                continue
            source = grids.get(modality)
            grid = next(source, None) if source is not None else None
            if grid is None:
                kind = "image" if modality == IMAGE else "video"
                raise ValueError(f"row {b} has more {kind} blocks than {kind}_grid_thw rows")
            interval = tokens_per_second * next(seconds) if modality == VIDEO else 1
            block = _vision_positions(pos, grid, spatial_merge_size, interval, device)
            if block.shape[1] != length:
                raise ValueError(f"row {b}: a vision block has {length} placeholder tokens but its grid "
                                 f"{grid.tolist()} gives {block.shape[1]} merged patches")
            pieces.append(block)
            if convention == "transformers":
                pos += max(grid[1], grid[2]) // spatial_merge_size
            else:
                pos = int(block.max()) + 1
        ids = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long, device=device)
        if keep is not None:
            position_ids[:, b, keep] = ids.to(position_ids.dtype)
        else:
            position_ids[:, b] = ids.to(position_ids.dtype)
        n_real = ids.shape[1]
        deltas.append((ids.max() + 1 - n_real) if n_real else torch.tensor(0, device=device))
    rope_deltas = torch.tensor([int(d) for d in deltas], device=device).unsqueeze(1)
    return position_ids, rope_deltas


def get_rope_index_packed(
    input_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | Iterable[float] | None = None,
    **kwargs,
) -> torch.Tensor:
    """M-RoPE ids of sequences packed end to end in one row: [3, 1, T], each segment
    [cu_seqlens[i], cu_seqlens[i+1]) numbered as if it were alone (exactly :func:`get_rope_index`
    of the unpacked batch), not continuing from the segment before it.

    input_ids: [1, T] or [T]; cu_seqlens: [segments + 1], 0 first and T last; the grids and
    seconds in order of appearance over the row; kwargs: those of :func:`get_rope_index`.
    """
    row = input_ids.reshape(-1)
    bounds = [int(b) for b in cu_seqlens]
    if bounds[0] != 0 or bounds[-1] != row.numel():
        raise ValueError(f"cu_seqlens {bounds} do not cover the {row.numel()} packed tokens")
    lengths = [stop - start for start, stop in zip(bounds[:-1], bounds[1:])]
    longest = max(lengths, default=0)
    # The segments as the rows of a right-padded batch: grids are consumed in row order, which is
    # the order of appearance in the packed row.
    real = torch.arange(longest, device=row.device)[None, :] < torch.tensor(lengths, device=row.device)[:, None]
    ids = torch.zeros(len(lengths), longest, dtype=row.dtype, device=row.device)
    ids[real] = row
    positions, _ = get_rope_index(ids, image_grid_thw, video_grid_thw, second_per_grid_ts, real.long(), **kwargs)
    return positions[:, real].unsqueeze(1)


def text_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[3, B, S] ids of text-only rows: 0, 1, 2 ... over real tokens, 0 on padding."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) * attention_mask.long()
    return pos.unsqueeze(0).expand(3, -1, -1).contiguous()
