"""The data section of the config: datasets, video sampling, prompts, loader settings.

Plain dataclasses (OmegaConf structured-config compatible), so ``megavrl.config`` nests :class:`DataConfig` as
its ``data`` section; :func:`load_data_config` reads a standalone YAML file (either the section
itself or a full config with a ``data:`` key).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

from megavrl.data.prompt import PromptConfig
from megavrl.data.video import FrameSampling, VideoSampler

FORMATS = ("megavrl", "charades_sta", "activitynet_captions", "nextgqa", "mvbench", "temporal_r1")
_SAMPLING = re.compile(r"^(all|(first|end|random):(\d+(?:\.\d+)?%?))$")


@dataclass
class DatasetSpec:
    """One annotation file.

    Fields:
        json_path: the annotation file (json, jsonl, or Charades-STA txt).
        data_folder: directory the rows' video paths are relative to ("" = json_path's directory).
        format: megavrl | charades_sta | activitynet_captions | nextgqa | mvbench | temporal_r1.
        sampling: which rows to keep: "all", "first:N", "end:N", "random:N" (N rows, or "N%").
            random is drawn with the data seed, so it is the same on every rank and every run.
        weight: rows per epoch relative to the file's (after sampling): 0.5 keeps a random half
            every epoch, 2.0 shows each row twice (fractions drawn per epoch).
        name: for logs and skip reports (default: the file name).
        video_ext: appended to bare video ids (charades, activitynet, nextgqa).
    """

    json_path: str = ""
    data_folder: str = ""
    format: str = "megavrl"
    sampling: str = "all"
    weight: float = 1.0
    name: Optional[str] = None
    video_ext: str = ".mp4"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"dataset {self.json_path!r}: format={self.format!r} is not one of {', '.join(FORMATS)}")
        if not _SAMPLING.match(str(self.sampling)):
            raise ValueError(f"dataset {self.json_path!r}: sampling={self.sampling!r} is not all, first:N, end:N "
                             "or random:N (N a count or a percentage such as 10%)")
        if not self.weight > 0:
            raise ValueError(f"dataset {self.json_path!r}: weight={self.weight} must be > 0")

    @property
    def display_name(self) -> str:
        return self.name or os.path.basename(self.json_path) or "dataset"

    @property
    def folder(self) -> str:
        return self.data_folder or os.path.dirname(os.path.abspath(self.json_path))


@dataclass
class VideoConfig(FrameSampling):
    """Frame sampling (defaults: qwen-vl-utils'). See :class:`megavrl.data.video.VideoSampler`.

    ``decode_threads``: decord threads per video (0: decord's automatic choice).
    """

    decode_threads: int = 1

    def __post_init__(self) -> None:
        self.check("data.video.")  # the sampler checks too, but only once a dataset is built

    def sampler(self, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2) -> VideoSampler:
        return VideoSampler(fps=self.fps, min_frames=self.min_frames, max_frames=self.max_frames,
                            nframes=self.nframes, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                            total_pixels=self.total_pixels, patch_size=patch_size, merge_size=merge_size,
                            temporal_patch_size=temporal_patch_size, num_threads=self.decode_threads)


@dataclass
class DataConfig:
    """Datasets to train (``train``) and evaluate (``val``) on, and how rows become model inputs.

    Fields:
        train, val: lists of :class:`DatasetSpec`, mixed in one shuffled stream per epoch.
        video: frame sampling; prompt: chat prompt construction.
        shuffle: shuffle the mixed rows every epoch (seed + epoch); seed: the data seed.
        num_workers: background threads decoding videos; prefetch: prepared prompts kept ready
            per worker.
        timestamp_tolerance: seconds a span may overshoot the video's end (clamped); beyond, skipped.
        check_videos_exist: drop rows whose video file is missing while reading (cheap stat).
        source: the YAML file this came from (set by load_data_config, for error messages).
    """

    train: List[DatasetSpec] = field(default_factory=list)
    val: List[DatasetSpec] = field(default_factory=list)
    video: VideoConfig = field(default_factory=VideoConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    shuffle: bool = True
    seed: int = 0
    num_workers: int = 2
    prefetch: int = 2
    timestamp_tolerance: float = 1.0
    check_videos_exist: bool = True
    source: Optional[str] = None

    def __post_init__(self) -> None:
        self.train = [_as(DatasetSpec, d) for d in self.train]
        self.val = [_as(DatasetSpec, d) for d in self.val]
        self.video = _as(VideoConfig, self.video)
        self.prompt = _as(PromptConfig, self.prompt)
        if self.num_workers < 0 or self.prefetch < 1:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0 and data.prefetch={self.prefetch} >= 1")

    @classmethod
    def from_dict(cls, data: dict, source: Optional[str] = None) -> "DataConfig":
        data = dict(data or {})
        if "datasets" in data and "train" not in data:  # a flat list of datasets means training data
            data["train"] = data.pop("datasets")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source or 'data config'}: unknown keys {unknown}; expected some of {sorted(known)}")
        if source is not None:
            data["source"] = source
        return cls(**data)


def _as(cls, value: Any):
    if isinstance(value, cls):
        return value
    if hasattr(value, "items"):  # dict or OmegaConf DictConfig
        value = {k: v for k, v in value.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {unknown}; expected some of {sorted(known)}")
        return cls(**value)
    raise TypeError(f"expected a mapping for {cls.__name__}, got {type(value).__name__}")


def load_data_config(path: str) -> DataConfig:
    """Read a data config YAML (the ``data`` section itself, or a file with a ``data:`` key).

    Relative ``json_path`` / ``data_folder`` are relative to the current directory, as in every
    megavrl config.
    """
    import yaml

    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    if "data" in raw and isinstance(raw["data"], dict):
        raw = raw["data"]
    return DataConfig.from_dict(raw, source=path)
