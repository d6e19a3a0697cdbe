"""Parsing model responses: answer blocks, timestamps and spans, option letters.

Every function here accepts any object as ``text`` (non-strings are converted with ``str``,
``None`` is the empty string) and never raises on it: a response that cannot be parsed gives
``None``. Only a bad *argument* (a config value such as ``position="middle"``) raises ValueError.
All regular expressions are anchored by look-behinds so that scanning stays linear in the
length of the response, even on adversarial inputs such as a long run of digits or tags.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

Span = tuple[float, float]

# ---------------------------------------------------------------------------------------------
# <think> / <answer> blocks
# ---------------------------------------------------------------------------------------------
_ANSWER_TAG = re.compile(r"<(/?)answer\s*>", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think\s*>.*?(?:</think\s*>|\Z)", re.IGNORECASE | re.DOTALL)


def as_text(value: object) -> str:
    """``value`` as a string: ``None`` -> "", str unchanged, anything else ``str(value)`` (or "")."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except Exception:  # an object whose __str__ raises is still not our caller's crash
        return ""


def answer_blocks(response: object) -> list[str]:
    """Contents of all closed ``<answer>...</answer>`` blocks, in order, unstripped.

    Tags are matched case-insensitively. An opening tag followed by another opening tag before a
    closing one restarts the block (``<answer><answer>B</answer>`` gives ``["B"]``). An unclosed
    final block (a truncated response) is not an answer.
    """
    text = as_text(response)
    blocks: list[str] = []
    start: Optional[int] = None
    for tag in _ANSWER_TAG.finditer(text):
        if tag.group(1) == "":
            start = tag.end()
        elif start is not None:
            blocks.append(text[start:tag.start()])
            start = None
    return blocks


def extract_answer(response: object, position: str = "last", fallback_to_response: bool = False) -> Optional[str]:
    """The stripped content of the first or last ``<answer>`` block of ``response``.

    Args:
        response: the model's decoded response.
        position: "last" (default) or "first" answer block.
        fallback_to_response: when there is no answer block, return the response with its
            ``<think>`` blocks removed instead of None (useful for evaluating untagged models;
            training rewards leave it False so that an untagged response scores 0).
    Returns:
        the answer text, or None when there is no answer block (and no fallback).
    """
    if position not in ("last", "first"):
        raise ValueError(f"position={position!r} is not one of 'last', 'first'")
    blocks = answer_blocks(response)
    if blocks:
        return (blocks[-1] if position == "last" else blocks[0]).strip()
    if fallback_to_response:
        return _THINK_BLOCK.sub(" ", as_text(response)).strip()
    return None


# ---------------------------------------------------------------------------------------------
# Timestamps and spans
# ---------------------------------------------------------------------------------------------
# One time value: an optional minus sign, then a clock time (m:ss, h:mm:ss, optional fraction) or a
# plain decimal number with an optional exponent ("1.73e+01"). The sign counts only where it cannot
# be a range dash ("12-17" is a range, "-1.5 to 17.7" starts below zero): it must not follow a word
# character, a dot or another dash. The look-behind on the digits stops a match from
# starting inside another number (keeps scanning linear); the look-ahead stops it from ending inside
# one ("12" out of "123", "12.5" or "1.5e3").
_SIGN = r"(?:(?<![\w.\-\u2212])[-\u2212])?"
_DIGITS = r"(?:\d+(?::\d{1,2}){1,2}(?:\.\d+)?|(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][+-]?\d+)?)"
_TIME = rf"{_SIGN}(?<![\d.:])(?:{_DIGITS})(?![\d:]|\.\d|[eE][+-]?\d)"
_UNIT = r"(?:seconds|second|secs|sec|s)\b"
# Two groups: value, unit. The unit's leading whitespace sits inside the optional group, so that two
# adjacent ``\s*`` never compete for one run of spaces (that would be quadratic).
_T = rf"({_TIME})(?:\s*({_UNIT}))?"
# After a key and its separator ("end_time:5.2") the value may follow a colon directly: the match is
# anchored by the key, so it cannot start inside a clock time.
_KEYED_TIME = rf"{_SIGN}(?<![\d.])(?:{_DIGITS})(?![\d:]|\.\d|[eE][+-]?\d)"
_KEYED_T = rf"({_KEYED_TIME})(?:\s*({_UNIT}))?"
_FLAGS = re.IGNORECASE | re.ASCII
# Range dashes: ASCII hyphen(s) (also as an arrow "-->"), the unicode hyphen, figure dash, en dash,
# em dash, horizontal bar, minus sign and the arrow U+2192.
_DASH = r"(?:-+>?|[\u2010-\u2015\u2212\u2192])"

# "start_time": 12.5 / start=12.5 / "the start time is 12.5" / "it begins at 12.5" (and the same for end)
_START_KEY = r"(?:start|begin)(?:s|ning)?(?:[_ -]?time(?:stamp)?)?"
_END_KEY = r"end(?:s|ing)?(?:[_ -]?time(?:stamp)?)?"
_KV_SEP = r"[\"']?\s*(?:[:=]|is\b|at\b)\s*(?:[\"']\s*)?"
_KV_START = re.compile(rf"(?<![A-Za-z_]){_START_KEY}{_KV_SEP}{_KEYED_T}", _FLAGS)
_KV_END = re.compile(rf"(?<![A-Za-z_]){_END_KEY}{_KV_SEP}{_KEYED_T}", _FLAGS)
_BRACKET_PAIR = re.compile(rf"[\[(]\s*{_T}\s*[,;]\s*{_T}\s*[\])]", _FLAGS)
_RANGE_PAIR = re.compile(
    rf"{_T}\s*(?:{_DASH}|~|\bto\b|\btill\b|\buntil\b|\bthrough\b|\band\b)\s*{_T}", _FLAGS)
_LIST_PAIR = re.compile(rf"{_T}\s*[,;]\s*{_T}", _FLAGS)
_SPACE_PAIR = re.compile(rf"{_T}\s+{_T}", _FLAGS)
# A decimal comma: digits, one comma, digits, with nothing numeric glued on either side ("3,5" but
# not "1,2,3", "12.5,17.8" or "12,17.8").
_DECIMAL_COMMA = re.compile(r"(?<![\d,.])(\d+),(\d+)(?!\d|[.,]\d)")
_ONE_TIME = re.compile(rf"^\s*{_T}\s*$", _FLAGS)


def _time_value(token: str) -> Optional[float]:
    """Seconds in a clock time ("1:05" = 65, "1:02:03.5" = 3723.5) or the value of a plain number
    ("12.5", "1.73e+01"), negated when the token starts with a minus sign (ASCII or U+2212)."""
    sign = 1.0
    if token[:1] in ("-", "\u2212"):
        sign, token = -1.0, token[1:]
    try:
        parts = [float(p) for p in token.split(":")]
    except ValueError:
        return None
    if len(parts) == 1:
        value = parts[0]
    elif len(parts) == 2:
        value = parts[0] * 60.0 + parts[1]
    elif len(parts) == 3:
        value = parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
    else:
        return None
    value *= sign
    return value if math.isfinite(value) else None


def _to_seconds(token: str, unit: Optional[str], timestamp_unit: str, duration: Optional[float]) -> Optional[float]:
    value = _time_value(token)
    if value is None:
        return None
    if timestamp_unit == "fraction" and ":" not in token and not unit:
        # A bare number in fraction mode is a fraction of the video duration.
        if duration is None or not math.isfinite(duration) or duration <= 0:
            return None
        value *= duration
    return value if math.isfinite(value) else None


def with_decimal_points(text: str) -> str:
    """``text`` with every decimal comma written as a point: "3,5 s" -> "3.5 s", "3,0 to 7,8" -> "3.0 to 7.8".

    A decimal comma is one comma between two runs of digits with no space around it and nothing
    numeric glued on either side; "12, 17", "1,2,3", "12.5,17.8" and "12,17.8" are left alone.
    """
    return _DECIMAL_COMMA.sub(r"\1.\2", text)


def parse_timestamp(text: object) -> Optional[float]:
    """One time value in seconds: "12.5", "12.5s", "12.5 seconds", "01:05" (=65), "1:02:03.250"
    (=3723.25), "1.73e+01" (=17.3), "-1.5", "3,5 s" (decimal comma, =3.5).

    Returns None when ``text`` is not exactly one time value.
    """
    match = _ONE_TIME.match(with_decimal_points(as_text(text)))
    return _time_value(match.group(1)) if match else None


def _find_span(source: str, duration: Optional[float], timestamp_unit: str) -> Optional[Span]:
    pair: Optional[tuple[str, Optional[str], str, Optional[str]]] = None
    start_match, end_match = _KV_START.search(source), _KV_END.search(source)
    if start_match and end_match:
        pair = (start_match.group(1), start_match.group(2), end_match.group(1), end_match.group(2))
    else:
        for pattern in (_BRACKET_PAIR, _RANGE_PAIR, _LIST_PAIR, _SPACE_PAIR):
            match = pattern.search(source)
            if match:
                pair = (match.group(1), match.group(2), match.group(3), match.group(4))
                break
    if pair is None:
        return None
    start = _to_seconds(pair[0], pair[1], timestamp_unit, duration)
    end = _to_seconds(pair[2], pair[3], timestamp_unit, duration)
    if start is None or end is None:
        return None
    return (start, end) if start <= end else (end, start)


def parse_span(text: object, duration: Optional[float] = None, timestamp_unit: str = "seconds") -> Optional[Span]:
    """The first (start, end) span in ``text``, in seconds, with start <= end (reversed pairs swapped).

    Recognised, in order of precedence:
      1. key/value pairs, as in JSON: ``{"start_time": 12.5, "end_time": "17.8"}`` (also
         start/begin/end keys, ``=``, single quotes, string values such as "00:12", "12.5s" or
         "-1.4", and "starts at 12.5 ... ends at 17.8", "the start time is 12.5 ...");
      2. brackets: ``[12.5, 17.8]``, ``(12.5; 17.8)``;
      3. ranges: ``12.5 to 17.8``, ``from 12.5s to 17.8s``, ``12.5 - 17.8``, ``12.5 – 17.8`` (any
         unicode dash), ``00:12 - 00:17``, ``between 12.5 and 17.8 seconds``, ``12.5~17.8``;
      4. a comma-separated pair ``12.5, 17.8``, then a space-separated pair ``12.5 17.8``.
    Times are plain numbers (``17.3``, ``1.73e+01``), clock times (mm:ss, h:mm:ss, h:mm:ss.ms) and
    numbers with a unit (s, sec, seconds). A minus sign makes a number negative where it cannot be
    a range dash: ``-1.5 to 17.7`` is (-1.5, 17.7), ``12-17`` is (12, 17).

    Decimal commas: the text is first read with every decimal comma (see ``with_decimal_points``)
    as a point, so ``3,0 to 7,8`` is (3.0, 7.8) and ``3,5 s - 9 s`` is (3.5, 9.0); only when that
    reading finds no span is the comma read as a separator, so ``[12,17]`` and ``12,17`` stay
    the pair (12, 17).

    With ``timestamp_unit="fraction"``, bare numbers are fractions of ``duration`` (seconds =
    number * duration); clock times and numbers with a unit stay seconds.

    The span is not clipped here: a negative start stays negative (the training reward's
    ``temporal_iou`` clips to [0, duration]; the evaluation metrics, like lmms-eval and NExT-GQA,
    do not clip). Returns None when no span is found or a value is not finite.
    """
    if timestamp_unit not in ("seconds", "fraction"):
        raise ValueError(f"timestamp_unit={timestamp_unit!r} is not one of 'seconds', 'fraction'")
    source = as_text(text)
    pointed = with_decimal_points(source)
    span = _find_span(pointed, duration, timestamp_unit)
    if span is None and pointed != source:
        span = _find_span(source, duration, timestamp_unit)
    return span


# ---------------------------------------------------------------------------------------------
# Option letters
# ---------------------------------------------------------------------------------------------
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Applied to stripped text; no two adjacent ``\s*`` (quadratic on long runs of spaces).
_WHOLE_LETTER = re.compile(r"^(?:[(\[]\s*)?([A-Za-z])(?:\s*[)\]])?(?:\s*[.:)])?$", re.ASCII)
_LEADING_LETTER = re.compile(r"^\s*(?:[(\[]\s*([A-Z])\s*[)\]]|([A-Z])\s*[.:)](?=\s|$))", re.ASCII)
_ANSWER_KEY = re.compile(r"[\"']?(?:answer|option|choice)[\"']?\s*[:=]\s*[\"']([^\"'\n]{0,200})[\"']",
                         re.IGNORECASE | re.ASCII)
# The keyword is case-insensitive, the letter must be a capital ("the answer is a dog" is no letter).
_ANSWER_PHRASE = re.compile(
    r"(?i:answer|option|choice)(?:\s+(?i:is|would\s+be|should\s+be|will\s+be))?"
    r"(?:\s*[:=])?(?:\s*[(\[])?\s*([A-Z])(?![A-Za-z0-9'])", re.ASCII)
_STANDALONE_LETTER = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])", re.ASCII)
_OPTION_MARKER = re.compile(r"^\s*(?:[(\[]\s*[A-Za-z]\s*[)\]]|[A-Za-z]\s*[.:)])\s*", re.ASCII)
_NON_ALNUM = re.compile(r"[\W_]+")


def normalize_text(text: object) -> str:
    """Lower-case ``text``, turn every run of non-alphanumeric characters into one space, strip."""
    return _NON_ALNUM.sub(" ", as_text(text).lower()).strip()


def option_text(option: object) -> str:
    """An option without its leading letter marker ("B. a red car" -> "a red car"), normalised."""
    return normalize_text(_OPTION_MARKER.sub("", as_text(option), count=1))


def _valid_letters(options: Optional[Sequence[object]]) -> str:
    return _LETTERS[: len(options)] if options else _LETTERS


def _letter_from_option_text(text: str, options: Sequence[object]) -> Optional[str]:
    answer = normalize_text(text)
    if not answer:
        return None
    texts = [option_text(o) for o in options]
    for letter, candidate in zip(_LETTERS, texts):
        if candidate and candidate == answer:
            return letter
    # The answer contains an option's text: keep the options not contained in another contained
    # option ("the door" vs "opening the door"), and answer only if exactly one remains.
    padded = f" {answer} "
    contained = [(letter, t) for letter, t in zip(_LETTERS, texts) if t and f" {t} " in padded]
    maximal = [(letter, t) for letter, t in contained
               if not any(t != other and f" {t} " in f" {other} " for _, other in contained)]
    distinct = {t for _, t in maximal}
    if len(distinct) == 1 and len(maximal) == 1:
        return maximal[0][0]
    return None


def parse_choice(text: object, options: Optional[Sequence[object]] = None) -> Optional[str]:
    """The option letter ("A".."Z") that ``text`` answers, or None.

    Recognised, in order: a JSON-like ``"answer": "B"`` value; the whole text being one letter
    ("B", "(B)", "B.", "[b]"); a leading letter marker ("B. a red car", "(B) ..."); a phrase
    ("The answer is B", "Answer: (C)", "the correct option is D"; the last one wins); the text of
    exactly one option (exact, else contained, longest option wins); exactly one distinct
    stand-alone capital letter. With ``options`` given, only the first ``len(options)`` letters
    are valid; a letter outside them is not an answer.
    """
    return _parse_choice(as_text(text), options, allow_key=True)


def _parse_choice(text: str, options: Optional[Sequence[object]], allow_key: bool) -> Optional[str]:
    valid = _valid_letters(options)
    if allow_key:
        keyed = _ANSWER_KEY.search(text)
        if keyed:
            letter = _parse_choice(keyed.group(1), options, allow_key=False)
            if letter is not None:
                return letter
    whole = _WHOLE_LETTER.match(text.strip())
    if whole and whole.group(1).upper() in valid:
        return whole.group(1).upper()
    leading = _LEADING_LETTER.match(text)
    if leading:
        letter = leading.group(1) or leading.group(2)
        if letter in valid:
            return letter
    phrases = [m.group(1) for m in _ANSWER_PHRASE.finditer(text) if m.group(1) in valid]
    if phrases:
        return phrases[-1]
    if options:
        letter = _letter_from_option_text(text, options)
        if letter is not None:
            return letter
    standalone = {m.group(1) for m in _STANDALONE_LETTER.finditer(text) if m.group(1) in valid}
    if len(standalone) == 1:
        return standalone.pop()
    return None


def parse_letter_answer(answer: object, options: Optional[Sequence[object]] = None) -> Optional[str]:
    """A ground-truth answer as an option letter: "B", "(B)", "B. text", or an option's exact text.

    Returns None for a free-text answer that is not one of the options (an open-ended question).
    """
    text = as_text(answer)
    whole = _WHOLE_LETTER.match(text.strip())
    valid = _valid_letters(options)
    if whole and whole.group(1).upper() in valid:
        return whole.group(1).upper()
    if options:
        normal = normalize_text(text)
        for letter, option in zip(_LETTERS, options):
            if normal and option_text(option) == normal:
                return letter
        leading = _LEADING_LETTER.match(text)
        if leading and (leading.group(1) or leading.group(2)) in valid:
            return leading.group(1) or leading.group(2)
    return None
