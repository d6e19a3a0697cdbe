"""What the rollout engine samples from: a prompt with its pre-sampled video frames and images.

The data pipeline (``megavrl.data``) decodes, samples and resizes the frames; the engine hands them
to vLLM unchanged, with the metadata vLLM's Qwen2.5-VL processor needs, so that vLLM and the
trainer see the same pixels and the same M-RoPE time positions.

A video reaches vLLM 0.32 as ``multi_modal_data={"video": [(frames, metadata)]}`` where
``frames`` is uint8 ``[T, H, W, 3]`` and ``metadata`` a dict of transformers' ``VideoMetadata``
fields (``fps``, ``total_num_frames``, ``frames_indices``, ``duration``, ``video_backend``) plus
``do_sample_frames`` (vLLM strips it before calling the HF processor). The HF processor derives
``second_per_grid_ts = temporal_patch_size / sampled_fps`` with
``sampled_fps = len(frames_indices) / total_num_frames * fps``, which sets the temporal M-RoPE
positions: the metadata must describe how the frames were sampled.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


@dataclass
class VideoInput:
    """Frames already sampled (and resized) by the data pipeline, and how they were sampled.

    frames: uint8 ``[T, H, W, 3]`` RGB.
    fps: frame rate of the source video (frames per second).
    frames_indices: index in the source video of each of the T frames.
    total_num_frames: frame count of the source video.
    duration: source length in seconds (defaults to total_num_frames / fps).
    """

    frames: np.ndarray
    fps: float
    frames_indices: list[int]
    total_num_frames: int
    duration: float | None = None

    @classmethod
    def from_frames(cls, frames: np.ndarray, sample_fps: float) -> VideoInput:
        """Frames taken at ``sample_fps`` frames per second, described as a video of their own."""
        t = int(frames.shape[0])
        return cls(frames=frames, fps=float(sample_fps), frames_indices=list(range(t)), total_num_frames=t)

    @property
    def sampled_fps(self) -> float:
        """Frames per second of ``frames`` (what the processor turns into time positions)."""
        return len(self.frames_indices) / self.total_num_frames * self.fps

    def metadata(self) -> dict[str, Any]:
        """The metadata dict vLLM's Qwen2.5-VL processor takes next to the frames."""
        duration = self.duration if self.duration is not None else self.total_num_frames / self.fps
        return {
            "fps": float(self.fps),
            "total_num_frames": int(self.total_num_frames),
            "frames_indices": [int(i) for i in self.frames_indices],
            "duration": float(duration),
            "video_backend": "megavrl",
            "do_sample_frames": False,
        }


@dataclass
class RolloutPrompt:
    """One prompt of a rollout step.

    prompt: chat-templated text holding one ``<|vision_start|><|video_pad|><|vision_end|>`` per video
        and one ``<|vision_start|><|image_pad|><|vision_end|>`` per image, in order; vLLM expands
        each pad token to the frames' token count. Or give ``prompt_token_ids`` instead (one pad id
        per video / image).
    videos: ``VideoInput`` items, or ``(frames, metadata_dict)`` pairs in vLLM's own format.
    images: uint8 ``[H, W, 3]`` arrays or PIL images.
    mm_processor_kwargs: extra kwargs for the HF processor of this prompt (override the engine's).
    """

    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    videos: Sequence[VideoInput | tuple[np.ndarray, Mapping[str, Any]]] = ()
    images: Sequence[Any] = ()
    mm_processor_kwargs: Mapping[str, Any] | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)  # carried through untouched (row id, answer...)


_VLLM_PROMPT_KEYS = {"prompt", "prompt_token_ids", "multi_modal_data", "mm_processor_kwargs"}


def as_rollout_prompt(item: RolloutPrompt | str | Mapping[str, Any]) -> RolloutPrompt:
    """Accept a ``RolloutPrompt``, a plain text prompt, a dict of ``RolloutPrompt`` fields, or a
    vLLM prompt dict (``prompt``/``prompt_token_ids``, ``multi_modal_data``, ``mm_processor_kwargs``,
    as :func:`vllm_prompt` builds it)."""
    if isinstance(item, RolloutPrompt):
        return item
    if isinstance(item, str):
        return RolloutPrompt(prompt=item)
    if isinstance(item, Mapping) and "multi_modal_data" in item and set(item) <= _VLLM_PROMPT_KEYS:
        mm = dict(item["multi_modal_data"] or {})
        unknown = set(mm) - {"video", "image"}
        if unknown:
            raise ValueError(f"unsupported modalities {sorted(unknown)} in multi_modal_data; use video and image")
        videos, images = mm.get("video", []), mm.get("image", [])
        videos = [videos] if isinstance(videos, tuple) else list(videos)
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        return RolloutPrompt(prompt=item.get("prompt"), prompt_token_ids=item.get("prompt_token_ids"),
                             videos=videos, images=images, mm_processor_kwargs=item.get("mm_processor_kwargs"))
    if isinstance(item, Mapping):
        unknown = set(item) - set(RolloutPrompt.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown rollout prompt keys {sorted(unknown)}; "
                             f"use {sorted(RolloutPrompt.__dataclass_fields__)}")
        return RolloutPrompt(**item)
    raise TypeError(f"a rollout prompt must be a RolloutPrompt, str or dict, not {type(item).__name__}")


def _video_item(video: VideoInput | tuple, where: str, pixel_multiple: int | None) -> tuple[np.ndarray, dict]:
    if isinstance(video, VideoInput):
        frames, metadata = video.frames, video.metadata()
    elif isinstance(video, tuple) and len(video) == 2:
        frames, metadata = video[0], {"do_sample_frames": False, **dict(video[1])}
    else:
        raise TypeError(f"{where}: a video must be a VideoInput or a (frames, metadata) pair, "
                        f"not {type(video).__name__}")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{where}: frames must be uint8 [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    missing = {"fps", "total_num_frames", "frames_indices"} - set(metadata)
    if missing:
        raise ValueError(f"{where}: video metadata lacks {sorted(missing)}")
    if len(metadata["frames_indices"]) != frames.shape[0]:
        raise ValueError(f"{where}: {frames.shape[0]} frames but {len(metadata['frames_indices'])} frames_indices")
    _check_pixels(frames.shape[1], frames.shape[2], where, pixel_multiple)
    return frames, metadata


def _check_pixels(height: int, width: int, where: str, pixel_multiple: int | None) -> None:
    if pixel_multiple and (height % pixel_multiple or width % pixel_multiple):
        raise ValueError(
            f"{where}: {height}x{width} px is not a multiple of {pixel_multiple} (patch_size * merge_size); "
            "resize frames in the data pipeline (so the trainer sees the same pixels) or set "
            "RolloutConfig.resize_in_vllm=True")


def to_vllm_prompt(item: RolloutPrompt, index: int, *, pixel_multiple: int | None,
                   mm_processor_kwargs: Mapping[str, Any], video_token_id: int | None = None,
                   image_token_id: int | None = None) -> dict[str, Any]:
    """The vLLM ``TextPrompt`` / ``TokensPrompt`` dict for one prompt.

    pixel_multiple: when set, frames and images must have sides divisible by it (vLLM is told not
    to resize them); None lets vLLM's processor resize.
    video_token_id, image_token_id: pad token ids, to check token-id prompts (one pad per item).
    """
    where = f"rollout prompt {index}"
    if (item.prompt is None) == (item.prompt_token_ids is None):
        raise ValueError(f"{where}: give exactly one of prompt and prompt_token_ids")
    out: dict[str, Any] = ({"prompt": item.prompt} if item.prompt is not None
                           else {"prompt_token_ids": list(item.prompt_token_ids)})
    for name, placeholder, token_id, items in (("video", "<|video_pad|>", video_token_id, item.videos),
                                               ("image", "<|image_pad|>", image_token_id, item.images)):
        if item.prompt is not None:
            found = item.prompt.count(placeholder)
        elif token_id is not None:
            found = list(item.prompt_token_ids).count(token_id)
        else:
            continue
        if found != len(items):
            raise ValueError(f"{where}: {len(items)} {name}(s) but {found} {placeholder} placeholder(s) "
                             "in the prompt; put exactly one per item (the chat template does)")
    mm: dict[str, Any] = {}
    if item.videos:
        mm["video"] = [_video_item(v, f"{where}, video {i}", pixel_multiple) for i, v in enumerate(item.videos)]
    if item.images:
        images = []
        for i, image in enumerate(item.images):
            if isinstance(image, np.ndarray):
                if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                    raise ValueError(f"{where}, image {i}: must be uint8 [H, W, 3], got {image.dtype} "
                                     f"{list(image.shape)}")
                _check_pixels(image.shape[0], image.shape[1], f"{where}, image {i}", pixel_multiple)
            else:  # PIL
                _check_pixels(image.height, image.width, f"{where}, image {i}", pixel_multiple)
            images.append(image)
        mm["image"] = images
    if mm:
        out["multi_modal_data"] = mm
        kwargs = {**mm_processor_kwargs, **(item.mm_processor_kwargs or {})}
        if kwargs:
            out["mm_processor_kwargs"] = kwargs
    return out


# ---------------------------------------------------------------------- from the data pipeline


def rollout_prompt(prepared, index: int | None = None, *, use_token_ids: bool = True,
                   pin_size: bool = True) -> RolloutPrompt:
    """The engine's input for one :class:`megavrl.data.prompt.PreparedPrompt` (the one adapter
    from the data pipeline to the rollout engine).

    - the prompt: token ids with one ``<|video_pad|>`` (vLLM expands it to
      ``prepared.num_video_tokens`` tokens, giving ``prepared.input_ids``), or the chat text with
      ``use_token_ids=False``;
    - the video: ``(frames, metadata)`` with frames uint8 ``[T, H, W, 3]``, the same pixels as
      ``prepared.frames``, and transformers ``VideoMetadata`` fields (``fps`` of the file,
      ``frames_indices``, ``total_num_frames``, ``duration``, ...). The Qwen2.5-VL processor derives
      ``second_per_grid_ts`` from them (``2 / sampled_fps``); without them, transformers 5 assumes
      24 fps and the M-RoPE time positions would differ from the trainer's;
    - ``mm_processor_kwargs``: no frame sampling, and a pixel range pinned to the frames' own size,
      so the processor's smart_resize leaves them untouched (it would otherwise resize frames
      outside its own min/max pixels, with torchvision's uint8 kernel, not the float one).
      ``pin_size=False`` leaves the size to the engine's processor config.
    ``meta`` carries the row id and ``index`` through the engine.
    """
    frames = prepared.frames.permute(0, 2, 3, 1).contiguous().numpy()
    height, width = prepared.frames.shape[-2:]
    kwargs: dict[str, Any] = {"do_sample_frames": False}
    if pin_size:
        kwargs["size"] = {"shortest_edge": int(height * width), "longest_edge": int(height * width)}
    return RolloutPrompt(prompt=None if use_token_ids else prepared.prompt,
                         prompt_token_ids=list(prepared.prompt_token_ids) if use_token_ids else None,
                         videos=[(frames, dict(prepared.video_metadata))], mm_processor_kwargs=kwargs,
                         meta={"id": prepared.sample.id, "index": index})


def vllm_prompt(prepared, *, use_token_ids: bool = True, pin_size: bool = True) -> dict[str, Any]:
    """The vLLM prompt dict of one prepared prompt, as the engine hands it to ``LLM.generate``
    (for tools and tests that call vLLM or the HF processor directly)::

        {"prompt_token_ids": [...],      # or "prompt": str with use_token_ids=False
         "multi_modal_data": {"video": [(frames, metadata)]},
         "mm_processor_kwargs": {"do_sample_frames": False, "size": {...}}}
    """
    item = rollout_prompt(prepared, use_token_ids=use_token_ids, pin_size=pin_size)
    return to_vllm_prompt(item, 0, pixel_multiple=None, mm_processor_kwargs={})
