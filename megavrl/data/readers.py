"""Readers for public annotation formats, each turning a file into rows of the megavrl schema.

Every reader yields ``(source, row)`` pairs, ``source`` being "<file>:<line>" (or
"<file>:<key>[i]" for json objects keyed by video), and ``row`` either a schema dict
(see :mod:`megavrl.data.schema`) or a :class:`RowError` saying why that entry is unusable.
Formats (``format:`` in the data config):

- ``megavrl``: the schema itself, json list or jsonl.
- ``charades_sta``: Charades-STA text, one ``<vid> <start> <end>##<sentence>`` per line, or the
  json form ``{vid: {"duration": s, "timestamps": [[s, e], ...], "sentences": [...]}}`` -> tvg.
- ``activitynet_captions``: ActivityNet Captions json, same form as above (``v_xxx`` keys) -> tvg.
- ``nextgqa``: the NExT-GQA release as it ships (doc-doc/NExT-GQA, ``datasets/nextgqa``):
  ``json_path`` is ``test.csv`` or ``val.csv`` (columns video_id, frame_count, width, height,
  question, answer (the option's text), qid, type, a0..a4) and the grounding is read from
  ``gsub_test.json`` / ``gsub_val.json`` next to it (``{video_id: {"duration": s, "location":
  {qid: [[s, e], ...]}, "fps": f}}``); ``map_vid_vidorID.json`` next to it, when present, maps a
  video id to its path (``"0000/2440175990"``). Also merged rows (json list or jsonl) with
  ``video_id``/``video``, ``qid``, ``question``, ``a0``..``a4`` or ``options``, ``answer`` (index,
  letter or text), ``duration`` and ``location`` (a span or a list of spans). Every segment is kept
  in ``meta.spans`` (the reward and the evaluation score the best-overlapping one); ``timestamps``
  is the first segment (what the schema validates) -> gqa.
- ``mvbench``: MVBench task json: ``video``, ``question``, ``candidates``, ``answer`` (the correct
  candidate's text), optional ``start``/``end`` (a clip, seconds) -> mcq.
- ``temporal_r1``: Temporal-R1 / Time-R1 style rows: ``problem``, ``solution`` (the span as a
  fraction of the video, ``[0.1, 0.3]`` or text such as ``"<answer>0.1 to 0.3</answer>"``),
  ``video_length`` (seconds), ``video`` (or ``video_path``/``path``) -> tvg in seconds.

Videos named by an id only (Charades, ActivityNet, NExT-GQA) get ``video_ext`` appended.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Dict, Iterator, List, Tuple, Union

from megavrl.data.schema import RowError

Entry = Tuple[str, Union[dict, RowError]]


# ------------------------------------------------------------------------------------ raw files


def read_json_or_jsonl(path: str) -> Iterator[Tuple[str, Any]]:
    """(source, parsed object) for every row of a json list, a json object of rows, or a jsonl file.

    A jsonl line that is not valid json yields a :class:`RowError` for that line; a .json file that
    is not valid json raises (the whole file is unusable, which the caller reports).
    """
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    data = None
    if not path.endswith(".jsonl"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            lines = [line.lstrip() for line in text.splitlines() if line.strip()]
            if not lines or not all(line.startswith("{") for line in lines):
                raise ValueError(f"{path} is not valid json ({exc.msg} at line {exc.lineno}) "
                                 "nor json lines") from None
    if data is None:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{name}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"{name}:{lineno}", RowError("malformed", f"not valid json ({exc.msg} at column {exc.colno})")
        return
    if isinstance(data, list):
        for i, row in enumerate(data):
            yield f"{name}[{i}]", row
    elif isinstance(data, dict):
        for key, row in data.items():
            yield f"{name}:{key}", row
    else:
        raise ValueError(f"{path}: expected a json list or object of rows, got {type(data).__name__}")


def _video_name(vid: Any, video_ext: str) -> str:
    vid = str(vid).strip()
    if not vid:
        raise RowError("malformed", "empty video id")
    return vid if os.path.splitext(vid)[1] else vid + video_ext


# ------------------------------------------------------------------------------------ formats


def read_megavrl(path: str, video_ext: str = ".mp4") -> Iterator[Entry]:
    for source, row in read_json_or_jsonl(path):
        yield source, row


_CHARADES_LINE = re.compile(r"^\s*(\S+)\s+(\S+)\s+(\S+)\s*##(.*)$")


def read_charades_sta(path: str, video_ext: str = ".mp4") -> Iterator[Entry]:
    """Charades-STA: the original ``vid s e##sentence`` text, or the ``{vid: {...}}`` json form."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()[:1]
    if head in ("{", "["):
        yield from read_captions_json(path, video_ext)
        return
    name = os.path.basename(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            source = f"{name}:{lineno}"
            m = _CHARADES_LINE.match(line.rstrip("\n"))
            if not m:
                yield source, RowError("malformed", f"not of the form '<video> <start> <end>##<sentence>': "
                                                    f"{line.strip()[:80]!r}")
                continue
            vid, start, end, sentence = m.groups()
            try:
                span = [float(start), float(end)]
            except ValueError:
                yield source, RowError("malformed", f"start/end {start!r} {end!r} are not numbers")
                continue
            yield source, {"id": f"{vid}_{lineno}", "video": _video_name(vid, video_ext), "task": "tvg",
                           "question": sentence.strip().rstrip("."), "timestamps": span}


def read_captions_json(path: str, video_ext: str = ".mp4") -> Iterator[Entry]:
    """``{vid: {"duration", "timestamps": [[s, e], ...], "sentences": [...]}}`` (ActivityNet Captions,
    Charades-STA json): one tvg row per sentence."""
    for source, entry in read_json_or_jsonl(path):
        vid = source.split(":", 1)[1] if ":" in source else source
        if isinstance(entry, RowError):
            yield source, entry
            continue
        if not isinstance(entry, dict):
            yield source, RowError("malformed", f"entry of {vid!r} is not an object")
            continue
        stamps, sentences = entry.get("timestamps"), entry.get("sentences")
        if not isinstance(stamps, list) or not isinstance(sentences, list) or len(stamps) != len(sentences):
            yield source, RowError("malformed", "needs lists 'timestamps' and 'sentences' of the same length")
            continue
        try:
            video = _video_name(entry.get("video", vid), video_ext)
        except RowError as exc:
            yield source, exc
            continue
        for i, (span, sentence) in enumerate(zip(stamps, sentences)):
            row = {"id": f"{vid}_{i}", "video": video, "task": "tvg",
                   "question": str(sentence).strip().rstrip("."), "timestamps": span}
            if entry.get("duration") is not None:
                row["duration"] = entry["duration"]
            yield f"{source}[{i}]", row


read_activitynet_captions = read_captions_json


def _spans(value: Any) -> List[Any]:
    """A span or a list of spans -> list of spans."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (list, tuple)) for v in value):
        return list(value)
    return [value]


def _segments(value: Any, what: str) -> List[List[float]]:
    """A list of [start, end] seconds pairs, each checked: numbers, start <= end."""
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError("malformed", f"{what}={value!r} is not a list of [start, end] segments")
    segments = []
    for pair in _spans(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise RowError("malformed", f"{what}: segment {pair!r} is not a [start, end] pair")
        try:
            start, end = float(pair[0]), float(pair[1])
        except (TypeError, ValueError):
            raise RowError("malformed", f"{what}: segment {pair!r} is not a pair of numbers") from None
        if end < start:
            raise RowError("reversed_timestamps", f"{what}: segment {pair!r} ends before it starts")
        segments.append([start, end])
    return segments


def _first_non_empty(segments: List[List[float]]) -> List[float]:
    return next((seg for seg in segments if seg[1] > seg[0]), segments[0])


def read_nextgqa(path: str, video_ext: str = ".mp4") -> Iterator[Entry]:
    """NExT-GQA: the release's ``test.csv``/``val.csv`` with ``gsub_<split>.json``, or merged json rows."""
    if path.lower().endswith(".csv"):
        yield from read_nextgqa_release(path, video_ext)
        return
    for source, raw in read_json_or_jsonl(path):
        if isinstance(raw, RowError):
            yield source, raw
            continue
        if not isinstance(raw, dict):
            yield source, RowError("malformed", "a NExT-GQA row must be an object")
            continue
        try:
            vid = raw.get("video", raw.get("video_id"))
            if vid is None:
                raise RowError("malformed", "no 'video_id' (or 'video')")
            options = raw.get("options")
            if options is None:
                options = [raw[f"a{i}"] for i in range(26) if f"a{i}" in raw]
            location = raw.get("location", raw.get("timestamps", raw.get("span")))
            if location is None:
                raise RowError("malformed", "no grounding span ('location')")
            spans = _segments(location, "location")
            qid = raw.get("qid", "")
            rid = raw.get("id") or (f"{vid}_{qid}" if qid != "" else None)
            row = {"id": rid,
                   "video": _video_name(vid, video_ext), "task": "gqa", "question": raw.get("question"),
                   "options": options, "answer": raw.get("answer"), "timestamps": _first_non_empty(spans),
                   "meta": {"spans": spans, **({"qid": qid} if qid != "" else {})}}
            if raw.get("duration") is not None:
                row["duration"] = raw["duration"]
            yield source, row
        except RowError as exc:
            yield source, exc


NEXTGQA_COLUMNS = ("video_id", "question", "answer", "qid", "a0", "a1", "a2", "a3", "a4")
"""Columns of NExT-GQA's test.csv / val.csv that the reader needs (frame_count, width, height and
type are kept in ``meta`` when present)."""


def read_nextgqa_release(path: str, video_ext: str = ".mp4") -> Iterator[Entry]:
    """One gqa row per question of NExT-GQA's ``test.csv``/``val.csv``, grounded by ``gsub_<split>.json``.

    Raises ValueError (the whole file is unusable) when the csv lacks a needed column or the gsub
    file next to it is missing or not a json object. A question without a grounding entry in the
    gsub file is a RowError ("no_grounding").
    """
    import csv

    folder, name = os.path.split(path)
    split = os.path.splitext(name)[0]
    gsub_path = os.path.join(folder, f"gsub_{split}.json")
    if not os.path.isfile(gsub_path):
        raise ValueError(f"{path}: its grounding file {gsub_path} is missing; put gsub_{split}.json from the "
                         f"NExT-GQA release (datasets/nextgqa) next to {name}")
    with open(gsub_path, encoding="utf-8") as f:
        gsub = json.load(f)
    if not isinstance(gsub, dict):
        raise ValueError(f"{gsub_path}: expected a json object keyed by video id, got {type(gsub).__name__}")
    video_map: Dict[str, str] = {}
    map_path = os.path.join(folder, "map_vid_vidorID.json")
    if os.path.isfile(map_path):
        with open(map_path, encoding="utf-8") as f:
            video_map = {str(k): str(v) for k, v in json.load(f).items()}
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in NEXTGQA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a NExT-GQA question file: missing column(s) {', '.join(missing)} "
                             f"(header: {', '.join(reader.fieldnames or [])})")
        for lineno, raw in enumerate(reader, 2):
            source = f"{name}:{lineno}"
            try:
                vid, qid = str(raw["video_id"]).strip(), str(raw["qid"]).strip()
                options = [raw[f"a{i}"] for i in range(5)]
                entry = gsub.get(vid)
                locations = entry.get("location") if isinstance(entry, dict) else None
                if not isinstance(locations, dict) or qid not in locations:
                    raise RowError("no_grounding",
                                   f"video {vid} question {qid} has no segment in {os.path.basename(gsub_path)}")
                spans = _segments(locations[qid], f"{os.path.basename(gsub_path)} {vid}/{qid}")
                answer: Any = raw["answer"]
                if answer not in options and str(answer).strip().isdigit():
                    answer = int(answer)  # NExT-QA's original files give the option index
                extra = {k: raw[k] for k in ("type", "frame_count", "width", "height") if raw.get(k) not in (None, "")}
                meta = {"spans": spans, "qid": qid, **extra}
                row = {"id": f"{vid}_{qid}", "video": _video_name(video_map.get(vid, vid), video_ext), "task": "gqa",
                       "question": raw["question"], "options": options, "answer": answer,
                       "timestamps": _first_non_empty(spans), "meta": meta}
                if entry.get("duration") is not None:
                    row["duration"] = entry["duration"]
                yield source, row
            except RowError as exc:
                yield source, exc


def read_mvbench(path: str, video_ext: str = ".mp4") -> Iterator[Entry]:
    for source, raw in read_json_or_jsonl(path):
        if isinstance(raw, RowError):
            yield source, raw
            continue
        if not isinstance(raw, dict):
            yield source, RowError("malformed", "an MVBench row must be an object")
            continue
        row = {"id": raw.get("id"), "video": raw.get("video"), "task": "mcq", "question": raw.get("question"),
               "options": raw.get("candidates"), "answer": raw.get("answer")}
        if raw.get("start") is not None or raw.get("end") is not None:
            row["clip"] = [raw.get("start", 0.0), raw.get("end")]
            if row["clip"][1] is None:
                yield source, RowError("malformed", "MVBench 'start' given without 'end'")
                continue
        yield source, row


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def read_temporal_r1(path: str, video_ext: str = ".mp4") -> Iterator[Entry]:
    for source, raw in read_json_or_jsonl(path):
        if isinstance(raw, RowError):
            yield source, raw
            continue
        if not isinstance(raw, dict):
            yield source, RowError("malformed", "a Temporal-R1 row must be an object")
            continue
        try:
            solution = raw.get("solution")
            if isinstance(solution, str):
                numbers = [float(x) for x in _NUMBER.findall(solution)]
            elif isinstance(solution, (list, tuple)):
                numbers = [float(x) for x in solution]
            else:
                numbers = []
            if len(numbers) != 2:
                raise RowError("malformed", f"solution={solution!r} is not a normalised [start, end] pair")
            length = raw.get("video_length", raw.get("duration"))
            if length is None:
                raise RowError("malformed", "no 'video_length' to scale the normalised solution")
            length = float(length)
            if not length > 0:
                raise RowError("zero_duration", f"video_length={length} is not positive")
            if not all(0.0 <= x <= 1.0 for x in numbers):
                raise RowError("timestamps_outside_video", f"normalised solution {numbers} is outside [0, 1]")
            video = raw.get("video", raw.get("video_path", raw.get("path")))
            if video is None:
                raise RowError("malformed", "no 'video' path")
            yield source, {"id": raw.get("id"), "video": _video_name(video, video_ext), "task": "tvg",
                           "question": raw.get("problem", raw.get("question")),
                           "timestamps": [numbers[0] * length, numbers[1] * length], "duration": length}
        except (RowError, TypeError, ValueError) as exc:
            yield source, exc if isinstance(exc, RowError) else RowError("malformed", str(exc))


READERS: Dict[str, Callable[[str, str], Iterator[Entry]]] = {
    "megavrl": read_megavrl,
    "charades_sta": read_charades_sta,
    "activitynet_captions": read_activitynet_captions,
    "nextgqa": read_nextgqa,
    "mvbench": read_mvbench,
    "temporal_r1": read_temporal_r1,
}
