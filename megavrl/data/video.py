"""Video frame sampling: which frames, at what size, decoded with decord.

The rules are the Qwen team's (``qwen_vl_utils.vision_process`` 0.0.14, decord backend), so a
model sees the frames it was trained on:

- frames: ``duration * fps`` of them, clamped to ``[min_frames, max_frames]`` and to the number of
  frames in the clip, floored to a multiple of the temporal patch size (2), spread evenly over the
  clip (``linspace(first, last, n).round()``);
- size: each frame is resized (bicubic, antialiased, on float32, rounded back to uint8) to
  multiples of ``patch_size * merge_size`` (28), with ``min_pixels <= h * w <= max_pixels`` and
  the whole video within ``total_pixels`` (the per-frame cap becomes
  ``max(min(max_pixels, total_pixels / n * 2), 1.05 * min_pixels)``);
- an optional clip ``[start, end]`` in seconds restricts the frames to
  ``ceil(start * fps) .. floor(end * fps)``.

One deliberate difference: qwen-vl-utils silently caps ``max_pixels`` at 768 * 28 * 28; here a
larger ``max_pixels`` is honoured (with the default it is the same cap).

Frames come back as a ``torch.uint8`` tensor ``[T, C, H, W]`` (RGB), the layout of qwen-vl-utils and
of the Hugging Face processors; :func:`megavrl.rollout.inputs.rollout_prompt` hands vLLM the same pixels as
``[T, H, W, C]`` numpy.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import asdict, dataclass
from typing import List, Optional

from megavrl.log import get_logger

log = get_logger(__name__)

# The defaults of qwen_vl_utils.vision_process 0.0.14 (names kept so they can be compared).
PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
IMAGE_FACTOR = PATCH_SIZE * SPATIAL_MERGE_SIZE  # 28 pixels per merged patch side
FRAME_FACTOR = 2  # the temporal patch size: frame counts are multiples of it
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * IMAGE_FACTOR * IMAGE_FACTOR
VIDEO_MAX_PIXELS = 768 * IMAGE_FACTOR * IMAGE_FACTOR
MODEL_SEQ_LEN = 128000  # qwen-vl-utils reads it from the MODEL_SEQ_LEN environment variable
VIDEO_TOTAL_PIXELS = int(MODEL_SEQ_LEN * IMAGE_FACTOR * IMAGE_FACTOR * 0.9)
IMAGE_MIN_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR
IMAGE_MAX_PIXELS = 16384 * IMAGE_FACTOR * IMAGE_FACTOR
MAX_RATIO = 200


class VideoError(ValueError):
    """A video that cannot be used: missing, undecodable, too short, or a bad clip range.

    ``kind`` is the short category the skip report counts it under.
    """

    def __init__(self, message: str, kind: str = "bad_video"):
        super().__init__(message)
        self.kind = kind


# ------------------------------------------------------------------------------ pure rules


def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: Optional[int] = None,
                 max_pixels: Optional[int] = None) -> tuple[int, int]:
    """(height, width) rounded to multiples of ``factor`` with ``min_pixels <= h * w <= max_pixels``.

    The aspect ratio is kept as closely as possible. Same arithmetic as qwen-vl-utils.
    """
    max_pixels = max_pixels if max_pixels is not None else IMAGE_MAX_PIXELS
    min_pixels = min_pixels if min_pixels is not None else IMAGE_MIN_PIXELS
    if max_pixels < min_pixels:
        raise ValueError(f"max_pixels={max_pixels} must be >= min_pixels={min_pixels}")
    if min(height, width) <= 0:
        raise VideoError(f"frame size {height}x{width} is empty", "corrupt_video")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise VideoError(f"aspect ratio of a {height}x{width} frame exceeds {MAX_RATIO}", "bad_video")
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = floor_by_factor(height / beta, factor)
        w_bar = floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def smart_nframes(total_frames: int, video_fps: float, fps: float = FPS, min_frames: int = FPS_MIN_FRAMES,
                  max_frames: int = FPS_MAX_FRAMES, nframes: Optional[int] = None,
                  frame_factor: int = FRAME_FACTOR) -> int:
    """How many frames to sample from a clip of ``total_frames`` frames at ``video_fps``.

    ``nframes`` (a fixed count) overrides ``fps``. Raises VideoError when fewer than
    ``frame_factor`` frames can be taken.
    """
    if nframes is not None:
        n = round_by_factor(nframes, frame_factor)
    else:
        lo = ceil_by_factor(min_frames, frame_factor)
        hi = floor_by_factor(min(max_frames, total_frames), frame_factor)
        n = total_frames / video_fps * fps
        n = min(min(max(n, lo), hi), total_frames)
        n = floor_by_factor(n, frame_factor)
    if total_frames < frame_factor:
        raise VideoError(f"the clip has {total_frames} frame{'s' if total_frames != 1 else ''}, fewer than the "
                         f"{frame_factor} one temporal patch of the vision tower needs", "video_too_short")
    if not (frame_factor <= n <= total_frames):
        raise VideoError(f"cannot sample {n} frames from a clip of {total_frames} frames "
                         f"(need between {frame_factor} and {total_frames})", "video_too_short")
    return int(n)


def clip_frame_range(total_frames: int, video_fps: float, start: Optional[float] = None,
                     end: Optional[float] = None) -> tuple[int, int]:
    """First and last frame index (inclusive) of the clip ``[start, end]`` seconds (None: open)."""
    if video_fps <= 0:
        raise VideoError(f"the video reports fps={video_fps}; cannot place frames in time", "zero_duration")
    if total_frames <= 0:
        raise VideoError("the video has no frames", "zero_duration")
    if start is None and end is None:
        return 0, total_frames - 1
    max_duration = total_frames / video_fps
    first = math.ceil(max(0.0, min(start, max_duration)) * video_fps) if start is not None else 0
    if end is not None:
        last = min(math.floor(max(0.0, min(end, max_duration)) * video_fps), total_frames - 1)
    else:
        last = total_frames - 1
    if first >= last:
        raise VideoError(f"clip [{start}, {end}] s selects no frames of a {max_duration:.2f} s video "
                         f"({total_frames} frames at {video_fps:g} fps)", "timestamps_outside_video")
    return first, last


def frame_indices(first: int, last: int, n: int) -> List[int]:
    """``n`` evenly spread indices in ``[first, last]``: ``torch.linspace(first, last, n).round()``."""
    import torch

    return torch.linspace(first, last, n).round().long().tolist()


def frame_pixel_budget(nframes: int, min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                       total_pixels: int = VIDEO_TOTAL_PIXELS) -> int:
    """The per-frame pixel cap once the video's ``total_pixels`` budget is shared by ``nframes`` frames."""
    cap = max(VIDEO_MAX_PIXELS, max_pixels)
    budget = max(min(cap, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    return min(max_pixels, budget)


_SCRATCH = threading.local()


def scratch_buffer(name: str, shape, dtype):
    """A per-thread reusable tensor of ``shape`` (contents undefined).

    Fresh multi-megabyte tensors cost page faults on every allocation; the transient buffers of
    decoding and preprocessing are reused instead (one set per thread, grown when needed).
    """
    import torch

    numel = 1
    for n in shape:
        numel *= int(n)
    buffers = getattr(_SCRATCH, "buffers", None)
    if buffers is None:
        buffers = _SCRATCH.buffers = {}
    flat = buffers.get((name, dtype))
    if flat is None or flat.numel() < numel:
        flat = buffers[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return flat[:numel].view(*shape)


def resize_frames(frames, height: int, width: int):
    """Resize uint8 frames ``[T, C, H, W]`` to ``height x width`` exactly as qwen-vl-utils does.

    torchvision's tensor resize with bicubic + antialias: interpolate in float32, clamp to
    [0, 255], round, back to uint8. Returns new contiguous uint8 frames (the input's values when the
    size already matches).
    """
    import torch
    import torch.nn.functional as F

    if tuple(frames.shape[-2:]) == (height, width):
        return frames.contiguous()
    # One pass converts to float32 in the plain [T, C, H, W] layout; both float buffers are reused.
    source = scratch_buffer("resize_in", frames.shape, torch.float32)
    source.copy_(frames)
    out_shape = (*frames.shape[:2], height, width)
    out = scratch_buffer("resize_out", out_shape, torch.float32)
    try:
        torch.ops.aten._upsample_bicubic2d_aa.out(source, [height, width], False, None, None, out=out)
    except (AttributeError, RuntimeError, TypeError):  # the op's out= overload is internal to torch
        out = F.interpolate(source, size=[height, width], mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0, 255).round_().to(torch.uint8)


# ------------------------------------------------------------------------------ sampling


@dataclass
class VideoInfo:
    """What the container says about a video: frame count, frame rate, frame size (pixels)."""

    path: str
    total_frames: int
    video_fps: float
    height: int
    width: int

    @property
    def duration(self) -> float:
        """Seconds: frame count / fps, as qwen-vl-utils computes it."""
        return self.total_frames / self.video_fps if self.video_fps > 0 else 0.0


@dataclass
class SamplePlan:
    """Which frames of a video are taken and the size they are resized to (no pixels)."""

    info: VideoInfo
    frame_indices: List[int]
    clip_frames: int  # frames in the clip the indices are spread over
    resized_height: int
    resized_width: int
    start: Optional[float] = None
    end: Optional[float] = None

    @property
    def nframes(self) -> int:
        return len(self.frame_indices)

    @property
    def timestamps(self) -> List[float]:
        """Seconds from the start of the video of every sampled frame (index / video fps)."""
        return [i / self.info.video_fps for i in self.frame_indices]

    @property
    def sample_fps(self) -> float:
        """Sampled frames per second of the clip, as qwen-vl-utils and HF's ``VideoMetadata.sampled_fps``."""
        return self.nframes / max(self.clip_frames, 1e-6) * self.info.video_fps

    def grid_thw(self, patch_size: int = PATCH_SIZE, temporal_patch_size: int = FRAME_FACTOR) -> tuple[int, int, int]:
        t = (self.nframes + temporal_patch_size - 1) // temporal_patch_size
        return t, self.resized_height // patch_size, self.resized_width // patch_size

    def num_tokens(self, patch_size: int = PATCH_SIZE, temporal_patch_size: int = FRAME_FACTOR,
                   merge_size: int = SPATIAL_MERGE_SIZE) -> int:
        t, h, w = self.grid_thw(patch_size, temporal_patch_size)
        return t * h * w // (merge_size * merge_size)

    def summary(self) -> dict:
        """A JSON-ready description (what ``megavrl data inspect`` prints)."""
        t, h, w = self.grid_thw()
        return {
            "video": self.info.path,
            "video_fps": self.info.video_fps,
            "total_frames": self.info.total_frames,
            "duration": self.info.duration,
            "height": self.info.height,
            "width": self.info.width,
            "clip": [self.start, self.end],
            "clip_frames": self.clip_frames,
            "nframes": self.nframes,
            "frame_indices": list(self.frame_indices),
            "timestamps": [round(x, 6) for x in self.timestamps],
            "sample_fps": self.sample_fps,
            "resized_height": self.resized_height,
            "resized_width": self.resized_width,
            "grid_thw": [t, h, w],
            "num_video_tokens": self.num_tokens(),
            "second_per_grid_t": FRAME_FACTOR / self.sample_fps,
            "pixels_per_frame": self.resized_height * self.resized_width,
        }


@dataclass
class SampledVideo:
    """Decoded, resized frames of one video and where they came from.

    frames: ``torch.uint8 [T, C, H, W]`` RGB, T a multiple of the temporal patch size.
    """

    frames: "object"  # torch.Tensor; typed loosely so this module imports without torch
    plan: SamplePlan

    @property
    def frame_indices(self) -> List[int]:
        return self.plan.frame_indices

    @property
    def timestamps(self) -> List[float]:
        return self.plan.timestamps

    @property
    def sample_fps(self) -> float:
        return self.plan.sample_fps

    @property
    def duration(self) -> float:
        return self.plan.info.duration

    def hf_metadata(self) -> dict:
        """Fields of transformers' ``VideoMetadata`` (also what vLLM forwards to the HF processor).

        ``VideoMetadata(**m).sampled_fps`` equals :attr:`sample_fps`, so the processor derives the
        same ``second_per_grid_ts``.
        """
        info = self.plan.info
        return {
            "total_num_frames": self.plan.clip_frames,
            "fps": info.video_fps,
            "width": info.width,
            "height": info.height,
            "duration": info.duration,
            "video_backend": "decord",
            "frames_indices": list(self.plan.frame_indices),
        }


@dataclass
class FrameSampling:
    """How frames are sampled and sized (qwen-vl-utils' rules and defaults); shared by the
    ``data.video`` config section and :class:`VideoSampler`. ``check(prefix)`` refuses values that
    cannot work, naming each field as ``<prefix><field>``."""

    fps: float = FPS
    min_frames: int = FPS_MIN_FRAMES
    max_frames: int = FPS_MAX_FRAMES
    nframes: Optional[int] = None
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    total_pixels: int = VIDEO_TOTAL_PIXELS

    def check(self, prefix: str = "") -> None:
        p = prefix
        if self.nframes is None and not self.fps > 0:
            raise ValueError(f"{p}fps={self.fps} must be > 0 (or set {p}nframes)")
        if self.nframes is not None and self.nframes < 1:
            raise ValueError(f"{p}nframes={self.nframes} must be >= 1 (or None to sample by fps)")
        for name in ("min_frames", "min_pixels", "total_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{p}{name}={getattr(self, name)} must be >= 1")
        for low, high in (("min_frames", "max_frames"), ("min_pixels", "max_pixels")):
            if getattr(self, high) < getattr(self, low):
                raise ValueError(f"{p}{high}={getattr(self, high)} is below {p}{low}={getattr(self, low)}: "
                                 f"raise {p}{high} or lower {p}{low}")


@dataclass
class VideoSampler(FrameSampling):
    """Frame sampling settings; call it on a path to get a :class:`SampledVideo`.

    Fields (defaults are qwen-vl-utils'):
        fps: target sampled frames per second.
        min_frames, max_frames: bounds on the sampled frame count (before flooring to a multiple of
            ``temporal_patch_size``).
        nframes: a fixed frame count instead of ``fps`` (None: use fps).
        min_pixels, max_pixels: bounds on the pixels of one resized frame.
        total_pixels: pixel budget of the whole video (all sampled frames / temporal patch size).
        patch_size, merge_size, temporal_patch_size: the vision tower's, from the model config.
        num_threads: decord decoding threads per video (0: decord's automatic choice). One thread
            wastes the least CPU (decoding is largely sequential) and leaves the other cores to the
            dataset's other decoding workers; the pixels do not depend on it.
    """

    patch_size: int = PATCH_SIZE
    merge_size: int = SPATIAL_MERGE_SIZE
    temporal_patch_size: int = FRAME_FACTOR
    num_threads: int = 1

    def __post_init__(self) -> None:
        self.check()

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def settings(self) -> dict:
        return asdict(self)

    # -- planning (metadata only)

    def open(self, path: str):
        """A decord ``VideoReader`` for ``path``; raises VideoError when missing or undecodable."""
        if not os.path.isfile(path):
            raise VideoError(f"video {path!r} does not exist", "video_not_found")
        if os.path.getsize(path) == 0:
            raise VideoError(f"video {path!r} is an empty file", "corrupt_video")
        import decord

        try:
            return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=self.num_threads)
        except Exception as exc:  # decord raises its own DECORDError (and RuntimeError) types
            raise VideoError(f"video {path!r} could not be opened by decord: {_short(exc)}", "corrupt_video") from None

    def _reader_info(self, reader, path: str, with_size: bool) -> VideoInfo:
        total = len(reader)
        video_fps = float(reader.get_avg_fps())
        if total <= 0:
            raise VideoError(f"video {path!r} has no frames", "zero_duration")
        if not video_fps > 0 or not math.isfinite(video_fps):
            raise VideoError(f"video {path!r} reports fps={video_fps}", "zero_duration")
        height = width = 0
        if with_size:
            try:
                height, width = (int(x) for x in reader[0].shape[:2])
                reader.seek(0)
            except Exception as exc:
                raise VideoError(f"video {path!r}: first frame could not be decoded: {_short(exc)}", "corrupt_video") from None
        return VideoInfo(path=path, total_frames=total, video_fps=video_fps, height=height, width=width)

    def plan_info(self, info: VideoInfo, start: Optional[float] = None, end: Optional[float] = None) -> SamplePlan:
        """The sampling plan for a video described by ``info`` (pure arithmetic)."""
        try:
            first, last = clip_frame_range(info.total_frames, info.video_fps, start, end)
            clip_frames = last - first + 1
            n = smart_nframes(clip_frames, info.video_fps, fps=self.fps, min_frames=self.min_frames,
                              max_frames=self.max_frames, nframes=self.nframes, frame_factor=self.temporal_patch_size)
        except VideoError as exc:  # the arithmetic does not know the file: name it for the skip report
            raise VideoError(f"video {info.path!r}: {exc}", exc.kind) from None
        plan = SamplePlan(info=info, frame_indices=frame_indices(first, last, n), clip_frames=clip_frames,
                          resized_height=0, resized_width=0, start=start, end=end)
        if info.height and info.width:
            self._fill_size(plan)
        return plan

    def _fill_size(self, plan: SamplePlan) -> None:
        max_px = frame_pixel_budget(plan.nframes, self.min_pixels, self.max_pixels, self.total_pixels)
        try:
            plan.resized_height, plan.resized_width = smart_resize(
                plan.info.height, plan.info.width, factor=self.factor, min_pixels=self.min_pixels, max_pixels=max_px)
        except VideoError as exc:
            raise VideoError(f"video {plan.info.path!r}: {exc}", exc.kind) from None

    def plan(self, path: str, start: Optional[float] = None, end: Optional[float] = None) -> SamplePlan:
        """Frame indices, timestamps and resized size for ``path``, decoding only its first frame."""
        return self.plan_info(self._reader_info(self.open(path), path, with_size=True), start, end)

    # -- decoding

    def __call__(self, path: str, start: Optional[float] = None, end: Optional[float] = None) -> SampledVideo:
        """Decode and resize the sampled frames of ``path`` (optionally the clip [start, end] s)."""
        import torch

        reader = self.open(path)
        plan = self.plan_info(self._reader_info(reader, path, with_size=False), start, end)
        try:
            array = reader.get_batch(plan.frame_indices).asnumpy()  # [T, H, W, C] uint8
        except Exception as exc:
            raise VideoError(f"video {path!r}: frames {plan.frame_indices[0]}..{plan.frame_indices[-1]} "
                             f"could not be decoded: {_short(exc)}", "corrupt_video") from None
        del reader
        if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] != plan.nframes:
            raise VideoError(f"video {path!r} decoded to an array of shape {array.shape}, "
                             f"not [{plan.nframes}, H, W, 3]", "corrupt_video")
        plan.info.height, plan.info.width = int(array.shape[1]), int(array.shape[2])
        self._fill_size(plan)
        frames = torch.from_numpy(array).permute(0, 3, 1, 2)
        frames = resize_frames(frames, plan.resized_height, plan.resized_width)
        return SampledVideo(frames=frames, plan=plan)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
