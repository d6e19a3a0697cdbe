"""Synthetic video tasks: small mp4 files in which known events happen at known times.

Each video shows a few coloured shapes (circle, square, triangle, diamond) on a dark background;
each shape appears at a known frame, possibly moves in one direction, and vanishes at a known
frame. Exactly one shape (the *mover*) moves in a direction no other shape moves in, so these
questions have one right answer:

- tvg: "the red circle is on screen" -> ``timestamps`` [appear, vanish] in seconds;
- mcq: "Which colour was the shape that moved left?" -> options A-D (colours), ``answer`` a letter;
- gqa: "Which shape moved left?" -> options A-D (shapes), ``answer`` and the mover's span as
  ``timestamps``.

Events are short and spread over the whole video: each lasts 1/16 to 3/16 of it (easy; shorter when
harder) and starts anywhere, with start and end on a grid of ``grid`` seconds (0.5 s by default, so
that sampling at 2 frames per second sees every boundary). Then no answer given without looking
scores well: the best constant span scores mIoU about 12 on tvg (``blind_baseline`` in
``megavrl.eval.metrics``; ``tests/data/test_synth.py`` bounds it), and the answer letters are
uniform over the options (a constant letter scores about 1/4). Distractors are other shapes, in
other colours, on screen at other times.

Difficulty: easy (1 distractor, clean), medium (2 distractors, shorter events, light noise), hard
(4 distractors, the shortest events, strong noise, smaller shapes).

``write_synthetic_dataset(out, ...)`` writes ``out/videos/synth_00000.mp4 ...``,
``out/train.jsonl`` and ``out/val.jsonl`` (rows of all requested tasks, in the megavrl row
schema, video paths relative to ``out``), ``out/data.yaml`` (a config layer, ``data: {train, val}``,
listing both files with ``out`` as given) and ``out/manifest.json`` (the settings). Everything is a function of the
seed: the same arguments give the same bytes.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megavrl.log import get_logger

log = get_logger(__name__)

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
    "white": (240, 240, 240), "orange": (250, 140, 20), "purple": (160, 60, 200), "cyan": (40, 220, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond")
DIRECTIONS: Dict[str, Tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
TASKS = ("tvg", "mcq", "gqa")


@dataclass(frozen=True)
class Difficulty:
    distractors: int
    min_len: float  # event length as a fraction of the video
    max_len: float
    noise: float  # std of per-pixel Gaussian noise (0..255 scale)
    size: float  # shape size as a fraction of the frame height


DIFFICULTIES: Dict[str, Difficulty] = {
    "easy": Difficulty(distractors=1, min_len=1 / 16, max_len=5 / 32, noise=0.0, size=0.25),
    "medium": Difficulty(distractors=2, min_len=1 / 32, max_len=1 / 8, noise=8.0, size=0.2),
    "hard": Difficulty(distractors=4, min_len=1 / 32, max_len=3 / 32, noise=20.0, size=0.15),
}


@dataclass
class Event:
    """One shape's life: visible on frames [start, end), moving from (x0, y0) to (x1, y1) (top-left, px)."""

    shape: str
    color: str
    start: int
    end: int
    x0: float
    y0: float
    x1: float
    y1: float
    direction: Optional[str]  # None: static

    def position(self, frame: int) -> Tuple[int, int]:
        f = 0.0 if self.end - 1 <= self.start else (frame - self.start) / (self.end - 1 - self.start)
        return int(round(self.x0 + f * (self.x1 - self.x0))), int(round(self.y0 + f * (self.y1 - self.y0)))


def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a shape."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c = size / 2
    if shape == "circle":
        return (xx - c) ** 2 + (yy - c) ** 2 <= c * c
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "triangle":  # apex up
        return (yy >= size * 0.05) & (np.abs(xx - c) <= (yy / size) * c)
    if shape == "diamond":
        return np.abs(xx - c) + np.abs(yy - c) <= c
    raise ValueError(f"unknown shape {shape!r}")


def plan_events(rng: np.random.Generator, frames: int, width: int, height: int, level: Difficulty,
                grid: int = 1) -> List[Event]:
    """The mover first (a direction nobody else takes), then static or differently moving distractors.

    Each event lasts ``level.min_len``..``level.max_len`` of the video and starts anywhere in it,
    both rounded to whole steps of ``grid`` frames (at least one step)."""
    count = 1 + level.distractors
    colors = rng.choice(list(COLORS), size=count, replace=False).tolist()
    size = min(max(8, int(round(level.size * height))), width, height)
    directions = list(DIRECTIONS)
    mover_dir = directions[int(rng.integers(len(directions)))]
    others = [d for d in directions if d != mover_dir]
    events = []
    grid = max(1, min(grid, frames // 2))
    steps = frames // grid  # a final partial step (frames not a multiple of grid) stays unused
    for k in range(count):
        length = min(max(int(round(steps * rng.uniform(level.min_len, level.max_len))), 1), steps) * grid
        length = max(length, 2)
        start = int(rng.integers(0, (frames - length) // grid + 1)) * grid
        direction = mover_dir if k == 0 else (others[int(rng.integers(len(others)))] if rng.random() < 0.5 else None)
        x0, y0, x1, y1 = _path(rng, direction, width, height, size)
        events.append(Event(shape=SHAPES[int(rng.integers(len(SHAPES)))], color=colors[k], start=start,
                            end=start + length, x0=x0, y0=y0, x1=x1, y1=y1, direction=direction))
    return events


def _path(rng, direction: Optional[str], width: int, height: int, size: int) -> Tuple[float, float, float, float]:
    span_x, span_y = width - size, height - size
    x, y = rng.uniform(0, span_x), rng.uniform(0, span_y)
    if direction is None:
        return x, y, x, y
    dx, dy = DIRECTIONS[direction]
    # travel at least half the free space along the direction, starting from the opposite side
    if dx:
        a, b = (rng.uniform(0.0, 0.25) * span_x, rng.uniform(0.75, 1.0) * span_x)
        x0, x1 = (a, b) if dx > 0 else (b, a)
        return x0, y, x1, y
    a, b = (rng.uniform(0.0, 0.25) * span_y, rng.uniform(0.75, 1.0) * span_y)
    y0, y1 = (a, b) if dy > 0 else (b, a)
    return x, y0, x, y1


CLOCK_LEVELS = 96
"""How much brighter (0..255 grey levels) the background of the last frame is than the first's."""


def render_frames(events: Sequence[Event], frames: int, width: int, height: int, level: Difficulty,
                  rng: np.random.Generator, clock: bool = True) -> np.ndarray:
    """uint8 [frames, height, width, 3] RGB.

    With ``clock``, the background brightens linearly from the first frame to the last (by
    ``CLOCK_LEVELS``): every patch of a frame shows when the frame is, as a burnt-in timestamp
    would. A small model can then read an event's time from the pixels where it happens,
    instead of having to learn to read it from the positions alone (which the tiny demo model
    does not learn in minutes).
    """
    background = np.array([24, 24, 28], dtype=np.int16) + rng.integers(-6, 7, size=3).astype(np.int16)
    masks = {}
    size = min(max(8, int(round(level.size * height))), width, height)
    noise_bank = None
    if level.noise > 0:  # a few noise fields reused in turn: much cheaper than fresh noise every frame
        noise_bank = rng.normal(0.0, level.noise, size=(4, height, width, 3)).astype(np.int16)
    out = np.empty((frames, height, width, 3), dtype=np.uint8)
    for f in range(frames):
        tick = int(round(CLOCK_LEVELS * f / max(frames - 1, 1))) if clock else 0
        img = np.broadcast_to(background + tick, (height, width, 3)).copy()
        for ev in events:
            if not ev.start <= f < ev.end:
                continue
            mask = masks.get(ev.shape)
            if mask is None:
                mask = masks[ev.shape] = shape_mask(ev.shape, size)
            x, y = ev.position(f)
            img[y:y + size, x:x + size][mask] = COLORS[ev.color]
        if noise_bank is not None:
            img += noise_bank[f % len(noise_bank)]
        np.clip(img, 0, 255, out=img)
        out[f] = img
    return out


def write_mp4(path: str, frames: np.ndarray, fps: int, codec: str = "libx264") -> None:
    """Encode RGB uint8 frames [T, H, W, 3] (H, W even) into an mp4 with PyAV, deterministically."""
    import av

    _, height, width, _ = frames.shape
    tmp = path + ".tmp"
    with av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1  # single-threaded encoders are bit-for-bit reproducible
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "crf": "18", "bframes": "0"}
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def _letters(n: int) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


def _place(answer: str, others: Sequence[str], slot: Optional[int], rng: np.random.Generator) -> List[str]:
    """The options: ``others`` in order with ``answer`` inserted at ``slot`` (random when None)."""
    slot = int(rng.integers(len(others) + 1)) if slot is None else slot
    return list(others[:slot]) + [answer] + list(others[slot:])


def answer_slots(seed: int, index: int, k: int = 4) -> Dict[str, int]:
    """The option position of the right answer of video ``index``'s mcq and gqa rows.

    Each block of ``k`` consecutive videos takes every position once, in a random order of its
    own, so that every letter is the answer about equally often on any split (train and val are
    runs of consecutive videos): a constant letter scores about 1/k, with no luck of the draw.
    """
    block = index // k
    return {task: int(np.random.default_rng([seed, block, salt]).permutation(k)[index % k])
            for salt, task in ((1, "mcq"), (2, "gqa"))}


def make_rows(video_id: str, video: str, events: Sequence[Event], tasks: Sequence[str], fps: int, frames: int,
              rng: np.random.Generator, difficulty: str, slots: Optional[Dict[str, int]] = None) -> List[dict]:
    """Rows of the requested tasks for one video (megavrl schema); ``slots``: see ``answer_slots``."""
    slots = slots or {}
    duration = frames / fps
    span = lambda ev: [round(ev.start / fps, 3), round(ev.end / fps, 3)]  # noqa: E731
    mover = events[0]
    meta = {"difficulty": difficulty, "synthetic": True}
    rows = []
    for task in tasks:
        if task == "tvg":
            ev = events[int(rng.integers(len(events)))]
            rows.append({"id": f"{video_id}_tvg", "video": video, "task": "tvg",
                         "question": f"the {ev.color} {ev.shape} is on screen", "timestamps": span(ev),
                         "duration": duration, "meta": meta})
        elif task == "mcq":
            present = [e.color for e in events[1:]]
            absent = [c for c in COLORS if c != mover.color and c not in present]
            pool = (present + list(rng.permutation(absent)))[:3]
            options = _place(mover.color, [pool[i] for i in rng.permutation(len(pool))], slots.get("mcq"), rng)
            rows.append({"id": f"{video_id}_mcq", "video": video, "task": "mcq",
                         "question": f"Which colour was the shape that moved {mover.direction}?",
                         "options": options, "answer": _letters(4)[options.index(mover.color)], "duration": duration,
                         "meta": meta})
        elif task == "gqa":
            others = [SHAPES[i] for i in rng.permutation(len(SHAPES)) if SHAPES[i] != mover.shape]
            options = _place(mover.shape, others, slots.get("gqa"), rng)
            rows.append({"id": f"{video_id}_gqa", "video": video, "task": "gqa",
                         "question": f"Which shape moved {mover.direction}?", "options": options,
                         "answer": _letters(len(options))[options.index(mover.shape)], "timestamps": span(mover),
                         "duration": duration, "meta": meta})
        else:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return rows


@dataclass
class SynthSettings:
    tasks: Tuple[str, ...] = TASKS
    n: int = 32
    seed: int = 0
    difficulty: str = "easy"
    fps: int = 8
    seconds: float = 8.0
    width: int = 160
    height: int = 120
    val_fraction: float = 0.125
    codec: str = "libx264"
    grid: float = 0.5  # event starts and ends fall on multiples of this many seconds (0: any frame)
    clock: bool = True  # the background brightens with time (see render_frames)
    distractors: Optional[int] = None  # shapes besides the mover; None: the difficulty's number
    shape_size: Optional[float] = None  # shape side as a fraction of the frame height; None: the difficulty's

    def __post_init__(self) -> None:
        self.tasks = tuple(self.tasks)
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"tasks {list(self.tasks)} must be a non-empty subset of {', '.join(TASKS)}")
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty={self.difficulty!r} is not one of {', '.join(DIFFICULTIES)}")
        if self.n < 1 or self.fps < 1 or not self.seconds > 0:
            raise ValueError(f"need n >= 1, fps >= 1, seconds > 0 (got {self.n}, {self.fps}, {self.seconds})")
        if self.width % 2 or self.height % 2 or min(self.width, self.height) < 32:
            raise ValueError(f"size {self.width}x{self.height} must be even and at least 32x32")
        if self.distractors is not None and not 0 <= self.distractors <= len(COLORS) - 1:
            raise ValueError(f"distractors={self.distractors} must be in 0..{len(COLORS) - 1} (one colour each)")
        if self.shape_size is not None and not 0 < self.shape_size <= 1:
            raise ValueError(f"shape_size={self.shape_size} must be in (0, 1] (a fraction of the frame height)")
        if not self.grid >= 0:
            raise ValueError(f"grid={self.grid} must be >= 0 seconds (0: events start and end on any frame)")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")

    @property
    def frames(self) -> int:
        return max(2, int(round(self.seconds * self.fps)))

    @property
    def level(self) -> Difficulty:
        """The difficulty's settings, with ``distractors`` and ``shape_size`` overridden when given."""
        level = DIFFICULTIES[self.difficulty]
        if self.distractors is not None:
            level = replace(level, distractors=self.distractors)
        return level if self.shape_size is None else replace(level, size=self.shape_size)

    @property
    def grid_frames(self) -> int:
        """The event grid in frames (at least one frame)."""
        return max(1, int(round(self.grid * self.fps)))


def synth_video(index: int, settings: SynthSettings, videos_dir: str) -> List[dict]:
    """Render, encode and describe video ``index``; its randomness depends on (seed, index) only."""
    rng = np.random.default_rng([settings.seed, index])
    level = settings.level
    frames = settings.frames
    events, rows = plan_video(index, settings, rng)
    pixels = render_frames(events, frames, settings.width, settings.height, level, rng, settings.clock)
    write_mp4(os.path.join(videos_dir, f"synth_{index:05d}.mp4"), pixels, settings.fps, settings.codec)
    return rows


def plan_video(index: int, settings: SynthSettings, rng: Optional[np.random.Generator] = None
               ) -> Tuple[List[Event], List[dict]]:
    """The events of video ``index`` and its rows, without rendering anything (cheap: tests check the
    task statistics of many videos this way). ``rng`` continues into rendering when given."""
    rng = np.random.default_rng([settings.seed, index]) if rng is None else rng
    level = settings.level
    frames = settings.frames
    events = plan_events(rng, frames, settings.width, settings.height, level, settings.grid_frames)
    name = f"synth_{index:05d}"
    rows = make_rows(name, f"videos/{name}.mp4", events, settings.tasks, settings.fps, frames, rng,
                     settings.difficulty, answer_slots(settings.seed, index, k=len(SHAPES)))
    for row in rows:
        row["meta"] = {**row["meta"], "events": [
            {"shape": e.shape, "color": e.color, "start": round(e.start / settings.fps, 3),
             "end": round(e.end / settings.fps, 3), "direction": e.direction} for e in events]}
    return events, rows


def write_synthetic_dataset(out: str, settings: Optional[SynthSettings] = None, workers: int = 2,
                            **overrides) -> dict:
    """Write the synthetic dataset to ``out`` (see the module docstring); returns the manifest."""
    settings = settings or SynthSettings(**overrides)
    videos_dir = os.path.join(out, "videos")
    os.makedirs(videos_dir, exist_ok=True)
    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, workers)) as pool:
        jobs = pool.map(lambda i: synth_video(i, settings, videos_dir), range(settings.n))
        per_video = list(tqdm(jobs, total=settings.n, desc="synth videos", unit="video", leave=False,
                              disable=settings.n < 8))
    n_val = int(round(settings.n * settings.val_fraction))
    if settings.val_fraction > 0 and settings.n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, settings.n - 1)
    splits = {"train": per_video[: settings.n - n_val], "val": per_video[settings.n - n_val:]}
    counts = {}
    for split, videos in splits.items():
        rows = [row for video_rows in videos for row in video_rows]
        counts[split] = len(rows)
        _write_text(os.path.join(out, f"{split}.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    import yaml

    # A config layer, like the one `megavrl select` writes: `--config exp.yaml --config DIR/data.yaml`.
    data_yaml = ("# megavrl data config of the synthetic tasks; layer it with --config (paths relative to where "
                 "megavrl runs)\n" + yaml.safe_dump(
                     {"data": {split: [{"json_path": os.path.join(out, f"{split}.jsonl"), "data_folder": out,
                                        "format": "megavrl", "name": f"synth_{split}"}] for split in ("train", "val")}},
                     sort_keys=False))
    _write_text(os.path.join(out, "data.yaml"), data_yaml)
    manifest = {"settings": {**asdict(settings), "tasks": list(settings.tasks)}, "videos": settings.n,
                "rows": counts, "duration_s": settings.frames / settings.fps}
    _write_text(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=2) + "\n")
    log.info("wrote %d synthetic videos (%s, %s) and %d train / %d val rows to %s", settings.n,
             settings.difficulty, ",".join(settings.tasks), counts["train"], counts["val"], out)
    return manifest


def _write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def parse_size(text: str) -> Tuple[int, int]:
    """"160x120" -> (160, 120)."""
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 160x120") from None
    return w, h

