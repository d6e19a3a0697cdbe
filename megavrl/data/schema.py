"""The one row schema every dataset is read into, its validation, and the skip report.

A row (json object, one per line in .jsonl or a list in .json)::

    {"id": "charades_0001",            # optional: "<file>:<line>" when absent
     "video": "videos/3MSZA.mp4",      # path, relative to the dataset's data_folder
     "task": "tvg",                    # tvg | mcq | gqa
     "question": "person opens the door",
     "options": ["red", "green", "blue", "yellow"],   # mcq, gqa: 2..26 options, letters A, B, ...
     "answer": "B",                    # mcq, gqa: an option letter (or an option's exact text)
     "timestamps": [12.5, 17.3],       # tvg, gqa: [start, end] in seconds from the video start
     "duration": 30.2,                 # optional: seconds (checked again against the decoded video)
     "clip": [5.0, 25.0],              # optional: only this part of the video is shown, in seconds
     "meta": {...}}                    # optional: anything else, carried through untouched

Bad rows are not errors: :func:`validate_row` raises :class:`RowError` with a short reason, the
reader records it in a :class:`SkipReport` with the file and line, and the run goes on.
"""
from __future__ import annotations

import math
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional

from megavrl.errors import UserError
from megavrl.log import get_logger

log = get_logger(__name__)

TASKS = ("tvg", "mcq", "gqa")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class RowError(ValueError):
    """A row that cannot be used. ``kind`` is a short category for the skip counts."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class EmptyDatasetError(UserError, RuntimeError):
    """No usable row is left after reading and filtering (or no row's video decodes): raised at
    start, never mid-run. A UserError: the CLI reports it in one line."""


@dataclass
class Sample:
    """One validated row. Times are seconds from the start of the video file.

    ``answer`` is always an option letter for mcq/gqa. ``source`` is "<file>:<line>" (for error
    messages), ``video_path`` the resolved path of the video.
    """

    id: str
    video: str
    task: str
    question: str
    options: Optional[List[str]] = None
    answer: Optional[str] = None
    timestamps: Optional[List[float]] = None
    duration: Optional[float] = None
    clip: Optional[List[float]] = None
    meta: Dict[str, Any] = field(default_factory=dict)
    source: str = ""
    video_path: str = ""
    dataset: str = ""

    def to_row(self) -> dict:
        """The row as json (schema fields only, None values dropped)."""
        row = {k: v for k, v in asdict(self).items() if k not in ("source", "video_path", "dataset")}
        return {k: v for k, v in row.items() if v is not None and v != {}}

    def with_duration(self, duration: float) -> "Sample":
        return replace(self, duration=duration)

    @property
    def answer_text(self) -> Optional[str]:
        """The text of the correct option (mcq/gqa)."""
        if self.answer is None or not self.options:
            return None
        return self.options[LETTERS.index(self.answer)]


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise RowError("malformed", f"{what}={value!r} is not a number")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise RowError("malformed", f"{what}={value!r} is not a number") from None
    if not math.isfinite(out):
        raise RowError("malformed", f"{what}={value!r} is not finite")
    return out


def _span(value: Any, what: str) -> List[float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise RowError("malformed", f"{what}={value!r} is not a [start, end] pair in seconds")
    start, end = _number(value[0], what), _number(value[1], what)
    if end < start:
        raise RowError("reversed_timestamps", f"{what}={value!r} is reversed (end before start)")
    if end == start:
        raise RowError("empty_timestamps", f"{what}={value!r} is an empty span")
    if start < 0:
        raise RowError("timestamps_outside_video", f"{what}={value!r} starts before the video")
    return [start, end]


def normalise_answer(answer: Any, options: List[str]) -> str:
    """An answer given as a letter ("B", "(B)", "B."), a 0-based index, or an option's exact text -> letter."""
    if isinstance(answer, bool):
        raise RowError("malformed", f"answer={answer!r} is not an option")
    if isinstance(answer, int):
        if 0 <= answer < len(options):
            return LETTERS[answer]
        raise RowError("malformed", f"answer index {answer} is outside the {len(options)} options")
    text = str(answer).strip()
    stripped = text.strip("()[]. ").upper()
    if len(stripped) == 1 and stripped in LETTERS[:len(options)]:
        return stripped
    for letter, option in zip(LETTERS, options):
        if text == option.strip() or text.lower() == option.strip().lower():
            return letter
    raise RowError("malformed", f"answer={answer!r} is neither an option letter nor one of the "
                                f"{len(options)} options")


def validate_row(row: Any, source: str, default_id: str, tolerance: float = 1.0) -> Sample:
    """Check one raw row against the schema and return it as a :class:`Sample`.

    ``tolerance`` (seconds): timestamps may overshoot the row's ``duration`` by this much (they are
    then clamped); beyond it the row is skipped.
    """
    if not isinstance(row, dict):
        raise RowError("malformed", f"a row must be a json object, not {type(row).__name__}")
    task = row.get("task")
    if task not in TASKS:
        raise RowError("unknown_task", f"task={task!r} is not one of {', '.join(TASKS)}")
    video = row.get("video")
    if not isinstance(video, str) or not video.strip():
        raise RowError("malformed", f"video={video!r} is not a path")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RowError("malformed", f"question={question!r} is empty or not text")

    duration = row.get("duration")
    if duration is not None:
        duration = _number(duration, "duration")
        if duration <= 0:
            raise RowError("zero_duration", f"duration={duration} s is not positive")

    options = row.get("options")
    answer = row.get("answer")
    if task in ("mcq", "gqa"):
        if not isinstance(options, (list, tuple)) or not 2 <= len(options) <= len(LETTERS):
            raise RowError("malformed", f"task {task} needs 2..{len(LETTERS)} options, got {options!r}")
        if not all(isinstance(o, (str, int, float)) and str(o).strip() for o in options):
            raise RowError("malformed", f"options={options!r} must be non-empty texts")
        options = [str(o).strip() for o in options]
        if answer is None:
            raise RowError("malformed", f"task {task} needs an answer")
        answer = normalise_answer(answer, options)
    else:
        options = list(options) if isinstance(options, (list, tuple)) and options else None
        answer = None if answer is None else str(answer)

    timestamps = row.get("timestamps")
    if task in ("tvg", "gqa"):
        if timestamps is None:
            raise RowError("malformed", f"task {task} needs timestamps [start, end] in seconds")
        timestamps = _span(timestamps, "timestamps")
    elif timestamps is not None:
        timestamps = _span(timestamps, "timestamps")

    clip = row.get("clip")
    if clip is not None:
        clip = _span(clip, "clip")
    if duration is not None:
        timestamps = check_within(timestamps, duration, tolerance, "timestamps")
        clip = check_within(clip, duration, tolerance, "clip")
    if timestamps is not None and clip is not None and (timestamps[1] <= clip[0] or timestamps[0] >= clip[1]):
        raise RowError("timestamps_outside_video", f"timestamps {timestamps} lie outside the clip {clip}")

    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        meta = {"meta": meta}
    extra = {k: v for k, v in row.items() if k not in _SCHEMA_KEYS}
    if extra:
        meta = {**extra, **meta}
    rid = row.get("id")
    return Sample(id=str(rid) if rid not in (None, "") else default_id, video=video.strip(), task=task,
                  question=question.strip(), options=options, answer=answer, timestamps=timestamps,
                  duration=duration, clip=clip, meta=meta, source=source)


_SCHEMA_KEYS = {"id", "video", "task", "question", "options", "answer", "timestamps", "duration", "clip", "meta"}


def check_within(span: Optional[List[float]], duration: float, tolerance: float, what: str) -> Optional[List[float]]:
    """``span`` clamped to ``[0, duration]`` if it overshoots by at most ``tolerance`` s; else RowError."""
    if span is None:
        return None
    start, end = span
    if start >= duration or end > duration + tolerance:
        raise RowError("timestamps_outside_video",
                       f"{what} [{start:g}, {end:g}] s lie outside the {duration:.2f} s video")
    return [start, min(end, duration)]


# ---------------------------------------------------------------------------------- skip report


@dataclass
class SkipRecord:
    source: str  # "<file>:<line>" or "<file>" (whole file)
    kind: str
    message: str


class SkipReport:
    """Counts skipped rows by reason and keeps the first few of each for the summary.

    Thread-safe: background decoding workers report into the same instance. Each skip is logged
    (the first ``log_first`` of them at WARNING, the rest at DEBUG) and :meth:`summary` gives one
    line for the end of loading or of an epoch.
    """

    def __init__(self, name: str = "data", log_first: int = 20, keep: int = 5):
        self.name = name
        self.log_first = log_first
        self.keep = keep
        self.counts: Counter = Counter()
        self.examples: Dict[str, List[SkipRecord]] = {}
        self.total = 0
        self._lock = threading.Lock()

    def add(self, source: str, kind: str, message: str) -> None:
        with self._lock:
            self.counts[kind] += 1
            self.total += 1
            bucket = self.examples.setdefault(kind, [])
            if len(bucket) < self.keep:
                bucket.append(SkipRecord(source, kind, message))
            n = self.total
        level = 30 if n <= self.log_first else 10  # WARNING, then DEBUG
        log.log(level, "%s: %s: %s: skipped", self.name, source, message)
        if n == self.log_first:
            log.warning("%s: further skipped rows are logged at DEBUG level; see the summary", self.name)

    def add_error(self, source: str, error: BaseException) -> None:
        kind = getattr(error, "kind", None) or _kind_of(error)
        self.add(source, kind, str(error))

    def merge(self, other: "SkipReport") -> None:
        with self._lock:
            self.counts.update(other.counts)
            self.total += other.total
            for kind, records in other.examples.items():
                bucket = self.examples.setdefault(kind, [])
                bucket.extend(records[: max(0, self.keep - len(bucket))])

    def summary(self, of: Optional[int] = None) -> str:
        """One line: how many rows were skipped, by reason, with the first example of each."""
        with self._lock:
            if not self.total:
                return f"{self.name}: no rows skipped" + (f" ({of} used)" if of is not None else "")
            parts = []
            for kind, count in self.counts.most_common():
                first = self.examples[kind][0]
                parts.append(f"{count} {kind.replace('_', ' ')} (first: {first.source}: {first.message})")
            total = f"{self.total} of {of + self.total}" if of is not None else f"{self.total}"
            return f"{self.name}: skipped {total} rows: " + "; ".join(parts)

    def as_dict(self) -> dict:
        with self._lock:
            return {"total": self.total, "counts": dict(self.counts)}

    def log_summary(self, of: Optional[int] = None) -> None:
        (log.warning if self.total else log.info)(self.summary(of))


def _kind_of(error: BaseException) -> str:
    from megavrl.data.video import VideoError

    if isinstance(error, VideoError):
        return "bad_video"
    return "error"
