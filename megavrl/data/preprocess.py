"""Qwen2.5-VL pixel preprocessing in plain torch: normalise and patchify frames and images.

Produces what transformers' ``Qwen2VLVideoProcessor`` / ``Qwen2VLImageProcessor`` (and so the
``Qwen2_5_VLProcessor``) produce for the same pixels, value for value:

- ``pixel_values_videos``: float32 ``[sum(t * h * w), C * temporal_patch * patch * patch]``, one row
  per patch, patches of a 2x2 merge unit adjacent (the vision tower's merger folds them);
- ``video_grid_thw``: long ``[num_videos, 3]``, (frames / temporal_patch, H / patch, W / patch);
- ``second_per_grid_ts``: float32 ``[num_videos]``, seconds one temporal patch spans
  (``temporal_patch_size / sample_fps``), which M-RoPE turns into time positions;
- ``pixel_values`` / ``image_grid_thw``: the same for still images (an image is its own frame
  repeated ``temporal_patch_size`` times, grid t = 1).

Normalisation is HF's fused form: ``(x - mean * 255) / (std * 255)`` on float32 pixel values
0..255, with the constants computed as HF computes them, so the results are bitwise equal.
Video frames must already be sized (:mod:`megavrl.data.video` resizes them); images are resized
here as the HF image processor does (torch's native uint8 bicubic-antialias kernel).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch

from megavrl.data.video import IMAGE_MIN_PIXELS, scratch_buffer, smart_resize

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionSpec:
    """Patch geometry and normalisation of the Qwen2.5-VL vision input (the HF processor config).

    ``video_min_pixels`` / ``video_max_pixels`` are the HF video processor's own resize bounds:
    used to tell vLLM's processor not to resize again (see ``megavrl.rollout.inputs.rollout_prompt``).
    """

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: List[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: List[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    rescale_factor: float = 1 / 255
    image_min_pixels: int = IMAGE_MIN_PIXELS
    image_max_pixels: int = 28 * 28 * 1280
    video_min_pixels: int = 128 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf_dir(cls, hf_dir: str) -> "VisionSpec":
        """Read the processor config of a Hugging Face Qwen2.5-VL directory.

        Understands transformers 5's ``processor_config.json`` (nested ``image_processor`` /
        ``video_processor``) and the published checkpoints' ``preprocessor_config.json`` (+ an
        optional ``video_preprocessor_config.json``). Missing values keep Qwen's defaults.
        """
        image: dict = {}
        video: dict = {}
        nested = os.path.join(hf_dir, "processor_config.json")
        if os.path.isfile(nested):
            with open(nested) as f:
                cfg = json.load(f)
            image = cfg.get("image_processor", {}) or {}
            video = cfg.get("video_processor", {}) or {}
        for name, target in (("preprocessor_config.json", image), ("video_preprocessor_config.json", video)):
            path = os.path.join(hf_dir, name)
            if os.path.isfile(path) and not target:
                with open(path) as f:
                    target.update(json.load(f))
        if not video:
            video = dict(image)
        spec = cls()
        src = image or video
        for key in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "rescale_factor"):
            if key in src:
                setattr(spec, key, src[key])
        spec.image_min_pixels, spec.image_max_pixels = _pixel_bounds(image, spec.image_min_pixels, spec.image_max_pixels)
        spec.video_min_pixels, spec.video_max_pixels = _pixel_bounds(video, spec.video_min_pixels, spec.video_max_pixels)
        return spec

    def _norm_constants(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        # HF's _fuse_mean_std_and_rescale_factor: float32 tensor * (1 / rescale_factor).
        mean = torch.tensor(self.image_mean, dtype=torch.float32, device=device) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.image_std, dtype=torch.float32, device=device) * (1.0 / self.rescale_factor)
        return mean, std

    def patch_norm_constants(self, channels: int = 3, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std per column of a patch row (columns ordered channel, time, row, col)."""
        mean, std = self._norm_constants(device)
        if mean.numel() == 1:
            mean, std = mean.expand(channels), std.expand(channels)
        per_channel = self.temporal_patch_size * self.patch_size * self.patch_size
        return mean.repeat_interleave(per_channel), std.repeat_interleave(per_channel)


def _pixel_bounds(cfg: dict, lo: int, hi: int) -> tuple[int, int]:
    size = cfg.get("size") or {}
    lo = cfg.get("min_pixels", size.get("shortest_edge", lo))
    hi = cfg.get("max_pixels", size.get("longest_edge", hi))
    return int(lo), int(hi)


@dataclass
class VideoFeatures:
    """Model inputs of one or more videos (see the module docstring for shapes)."""

    pixel_values_videos: torch.Tensor
    video_grid_thw: torch.Tensor
    second_per_grid_ts: torch.Tensor

    @property
    def num_patches(self) -> int:
        return int(self.pixel_values_videos.shape[0])


@dataclass
class ImageFeatures:
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor


def _as_tchw_uint8(frames) -> torch.Tensor:
    if not isinstance(frames, torch.Tensor):
        frames = torch.as_tensor(frames)
    if frames.dim() != 4:
        raise ValueError(f"frames must be [T, C, H, W], got shape {tuple(frames.shape)}")
    if frames.shape[1] not in (1, 3) and frames.shape[-1] in (1, 3):
        raise ValueError(f"frames of shape {tuple(frames.shape)} look channels-last; pass [T, C, H, W]")
    return frames


def patchify_normalize(frames: torch.Tensor, spec: VisionSpec) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalised patches ``[t * h * w, C * tp * p * p]`` and the grid (t, h, w) of one video.

    ``frames``: ``[T, C, H, W]`` uint8 (or float with values 0..255); H, W multiples of
    ``patch_size * merge_size``. A frame count that is not a multiple of the temporal patch size is
    padded by repeating the last frame, as HF does.
    """
    frames = _as_tchw_uint8(frames)
    num_frames, channels, height, width = frames.shape
    p, tp, m = spec.patch_size, spec.temporal_patch_size, spec.merge_size
    if height % (p * m) or width % (p * m):
        raise ValueError(f"frame size {height}x{width} is not a multiple of patch_size * merge_size = {p * m}; "
                         "resize the frames first (megavrl.data.video.smart_resize)")
    if pad := -num_frames % tp:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)], dim=0)
        num_frames += pad
    gt, gh, gw = num_frames // tp, height // p, width // p
    # Reorder while still uint8 (a quarter of the bytes of float32), then let the subtraction do the
    # cast to float32: the same float32 arithmetic as HF's normalize, in two passes.
    view = frames.reshape(gt, tp, channels, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    if frames.device.type == "cpu":
        flat = scratch_buffer("patchify", view.shape, frames.dtype)
    else:
        flat = torch.empty(view.shape, dtype=frames.dtype, device=frames.device)
    flat.copy_(view)
    flat = flat.view(gt * gh * gw, channels * tp * p * p)
    mean, std = spec.patch_norm_constants(channels, frames.device)
    if flat.is_floating_point():
        flat = flat.to(torch.float32)
    patches = torch.sub(flat, mean).div_(std)
    return patches, (gt, gh, gw)


def preprocess_video(frames, sample_fps: float, spec: Optional[VisionSpec] = None) -> VideoFeatures:
    """``pixel_values_videos``, ``video_grid_thw`` and ``second_per_grid_ts`` of one video.

    Args:
        frames: ``[T, C, H, W]`` uint8, already resized (e.g. ``SampledVideo.frames``).
        sample_fps: frames per second of the sampled frames (``SampledVideo.sample_fps``).
        spec: vision geometry and normalisation (default: Qwen2.5-VL's).
    """
    return preprocess_videos([frames], [sample_fps], spec)


def preprocess_videos(videos: Sequence, sample_fps: Sequence[float], spec: Optional[VisionSpec] = None) -> VideoFeatures:
    """Several videos, concatenated in order as the HF processor does."""
    spec = spec or VisionSpec()
    if len(videos) != len(sample_fps):
        raise ValueError(f"{len(videos)} videos but {len(sample_fps)} sample_fps values")
    patches, grids = [], []
    for frames in videos:
        flat, grid = patchify_normalize(frames, spec)
        patches.append(flat)
        grids.append(grid)
    for fps in sample_fps:
        if not fps > 0:
            raise ValueError(f"sample_fps={fps} must be > 0")
    return VideoFeatures(
        pixel_values_videos=patches[0] if len(patches) == 1 else torch.cat(patches, dim=0),
        video_grid_thw=torch.tensor(grids, dtype=torch.long),
        second_per_grid_ts=torch.tensor([spec.temporal_patch_size / fps for fps in sample_fps], dtype=torch.float32),
    )


def resize_image(image: torch.Tensor, spec: VisionSpec, min_pixels: Optional[int] = None,
                 max_pixels: Optional[int] = None) -> torch.Tensor:
    """Resize a uint8 ``[C, H, W]`` image as ``Qwen2VLImageProcessor`` does (smart_resize + bicubic)."""
    import torch.nn.functional as F

    height, width = image.shape[-2:]
    h, w = smart_resize(height, width, factor=spec.factor,
                        min_pixels=spec.image_min_pixels if min_pixels is None else min_pixels,
                        max_pixels=spec.image_max_pixels if max_pixels is None else max_pixels)
    if (h, w) == (height, width):
        return image
    # torchvision >= 0.2x resizes uint8 with torch's native uint8 antialiased kernel on CPU.
    return F.interpolate(image[None], size=[h, w], mode="bicubic", align_corners=False, antialias=True)[0]


def to_chw_uint8(image) -> torch.Tensor:
    """A PIL image, ``[H, W, C]`` numpy array or ``[C, H, W]`` tensor as an RGB uint8 ``[C, H, W]`` tensor."""
    try:
        from PIL import Image
    except ImportError:  # pillow is a dependency; keep the tensor path working without it
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        import numpy as np

        return torch.from_numpy(np.asarray(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    if not isinstance(image, torch.Tensor):
        image = torch.as_tensor(image)
        if image.dim() == 3 and image.shape[-1] in (1, 3, 4):
            image = image.permute(2, 0, 1)
    if image.dim() != 3:
        raise ValueError(f"an image must be [C, H, W], got shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] == 4:
        image = image[:3]
    return image.contiguous()


def preprocess_images(images: Sequence, spec: Optional[VisionSpec] = None, do_resize: bool = True,
                      min_pixels: Optional[int] = None, max_pixels: Optional[int] = None) -> ImageFeatures:
    """``pixel_values`` and ``image_grid_thw`` of still images (PIL, numpy HWC or tensor CHW, uint8)."""
    spec = spec or VisionSpec()
    patches, grids = [], []
    for image in images:
        chw = to_chw_uint8(image)
        if do_resize:
            chw = resize_image(chw, spec, min_pixels, max_pixels)
        # An image is a one-frame video whose frame fills the whole temporal patch.
        flat, grid = patchify_normalize(chw[None].expand(spec.temporal_patch_size, -1, -1, -1), spec)
        patches.append(flat)
        grids.append(grid)
    return ImageFeatures(pixel_values=torch.cat(patches, dim=0),
                         image_grid_thw=torch.tensor(grids, dtype=torch.long))
