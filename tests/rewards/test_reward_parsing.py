"""Answer, timestamp and option parsing: known formats, and no exception on any string."""
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megavrl.rewards import (answer_blocks, extract_answer, format_reward, normalize_text, parse_choice,
                             parse_letter_answer, parse_span, parse_timestamp)

# ----------------------------------------------------------------------------------------------
# <answer> extraction
# ----------------------------------------------------------------------------------------------


def test_extract_answer_first_and_last():
    text = "<think>hmm</think><answer> A </answer> more <answer>B</answer>"
    assert extract_answer(text) == "B"
    assert extract_answer(text, position="last") == "B"
    assert extract_answer(text, position="first") == "A"
    assert answer_blocks(text) == [" A ", "B"]


@pytest.mark.parametrize("text, expected", [
    ("no tags at all", None),
    ("<answer>unclosed, truncated", None),
    ("</answer>B<answer>", None),
    ("<ANSWER>C</Answer>", "C"),
    ("<answer><answer>D</answer>", "D"),
    ("<answer>\n  multi\nline\n</answer>", "multi\nline"),
    ("", None),
    (None, None),
])
def test_extract_answer_edge_cases(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_fallback_strips_think():
    assert extract_answer("<think>B is wrong</think> C", fallback_to_response=True) == "C"
    assert extract_answer("<think>never closed", fallback_to_response=True) == ""


def test_extract_answer_rejects_bad_position():
    with pytest.raises(ValueError, match="middle"):
        extract_answer("<answer>A</answer>", position="middle")


# ----------------------------------------------------------------------------------------------
# Timestamps and spans
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, seconds", [
    ("12.5", 12.5), ("12.5s", 12.5), (" 12.5 seconds ", 12.5), ("01:05", 65.0), ("1:02:03", 3723.0),
    ("00:12.5", 12.5), (".5", 0.5), ("7", 7.0),
    ("", None), ("abc", None), ("12.5 17.8", None), ("1:2:3:4", None), ("-3", -3.0),
])
def test_parse_timestamp(text, seconds):
    assert parse_timestamp(text) == seconds


@pytest.mark.parametrize("text, span", [
    ("12.5 to 17.8", (12.5, 17.8)),
    ("12.5 - 17.8", (12.5, 17.8)),
    ("12.5-17.8", (12.5, 17.8)),
    ("12.5s-17.8s", (12.5, 17.8)),
    ("from 12.5s to 17.8s", (12.5, 17.8)),
    ("The event happens from 12.5 seconds to 17.8 seconds.", (12.5, 17.8)),
    ("between 12.5 and 17.8", (12.5, 17.8)),
    ("12.5 \u2013 17.8", (12.5, 17.8)),
    ("12.5~17.8", (12.5, 17.8)),
    ("[12.5, 17.8]", (12.5, 17.8)),
    ("(12.5; 17.8)", (12.5, 17.8)),
    ("12.5, 17.8", (12.5, 17.8)),
    ("12.5 17.8", (12.5, 17.8)),
    ('{"start_time": 12.5, "end_time": 17.8}', (12.5, 17.8)),
    ('{"start_time": "12.5", "end_time": "17.8"}', (12.5, 17.8)),
    ('{"end_time": "17.8", "start_time": "12.5"}', (12.5, 17.8)),
    ("{'start': '00:12', 'end': '00:17'}", (12.0, 17.0)),
    ('{"start_time": "12.5s", "end_time": "17.8 seconds"}', (12.5, 17.8)),
    ("start=3, end=4", (3.0, 4.0)),
    ("It starts at 12.5s and ends at 17.8s.", (12.5, 17.8)),
    ("The start time is 00:12 and the end time is 00:17", (12.0, 17.0)),
    ("begin_time: 3, end_time: 4", (3.0, 4.0)),
    ("at the end: 12 to 15", (12.0, 15.0)),  # a lone "end:" is no key/value pair; the range wins
    ("00:12 - 00:17", (12.0, 17.0)),
    ("01:02:03 to 01:02:10", (3723.0, 3730.0)),
    ("1:05 to 1:10.5", (65.0, 70.5)),
    # reversed pairs are swapped
    ("17.8 to 12.5", (12.5, 17.8)),
    ('{"start_time": 20, "end_time": 10}', (10.0, 20.0)),
    # brackets win over an earlier loose number
    ("Option 1: [3, 4]", (3.0, 4.0)),
    ("", None),
    ("no numbers here", None),
    ("only 12.5", None),
    ('{"start_time": "soon", "end_time": 3}', None),
])
def test_parse_span_seconds(text, span):
    assert parse_span(text) == span


def test_parse_span_fraction_of_duration():
    # bare numbers are fractions of the duration; clock times and numbers with a unit stay seconds
    assert parse_span("[0.25, 0.5]", duration=40.0, timestamp_unit="fraction") == (10.0, 20.0)
    assert parse_span("0.5 to 0.25", duration=40.0, timestamp_unit="fraction") == (10.0, 20.0)
    assert parse_span("00:10 to 00:20", duration=40.0, timestamp_unit="fraction") == (10.0, 20.0)
    assert parse_span("10s to 0.5", duration=40.0, timestamp_unit="fraction") == (10.0, 20.0)
    assert parse_span("[0.25, 0.5]", duration=None, timestamp_unit="fraction") is None
    with pytest.raises(ValueError, match="minutes"):
        parse_span("1 to 2", timestamp_unit="minutes")


def test_parse_span_never_returns_non_finite():
    assert parse_span("9" * 400 + " to 1") is None
    assert parse_span("[1e999, 2]") is None or all(abs(v) < float("inf") for v in parse_span("[1e999, 2]"))


# ----------------------------------------------------------------------------------------------
# Option letters
# ----------------------------------------------------------------------------------------------
OPTIONS = ["A. a dog runs", "B. a red car", "C. the door opens", "D. opening the door"]


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("b", "B"), ("[C]", "C"), (" D ", "D"), ("B)", "B"),
    ("B. a red car", "B"), ("(B) a red car", "B"), ("B: a red car", "B"),
    ("The answer is B", "B"), ("The answer is B.", "B"), ("Answer: (C)", "C"), ("the correct option is D", "D"),
    ("answer: A, no wait, the answer is C", "C"),
    ('{"answer": "B"}', "B"), ("{'option': 'a red car'}", "B"),
    ("a red car", "B"), ("A Red Car!", "B"), ("I think it is a red car", "B"),
    ("opening the door", "D"),  # "the door" is inside option D's text; the longer option wins
    ("I think C", "C"),  # "I" is not a valid letter with 4 options
    ("E", None), ("(E)", None),  # outside the options
    ("A or B", None),  # two candidate letters
    ("the answer is a dog", None),
    ("", None), ("nothing", None),
])
def test_parse_choice(text, letter):
    assert parse_choice(text, OPTIONS) == letter


def test_parse_choice_without_options_accepts_any_capital():
    assert parse_choice("The answer is E") == "E"
    assert parse_choice("(z)") == "Z"


@pytest.mark.parametrize("answer, options, letter", [
    ("B", OPTIONS, "B"), ("(c)", OPTIONS, "C"), ("a red car", OPTIONS, "B"), ("D. opening the door", OPTIONS, "D"),
    ("E", OPTIONS, None), ("a cat", OPTIONS, None), ("B", None, "B"), ("forty two", None, None),
])
def test_parse_letter_answer(answer, options, letter):
    assert parse_letter_answer(answer, options) == letter


def test_normalize_text():
    assert normalize_text("  A Red-Car!! ") == "a red car"
    assert normalize_text(None) == ""


# ----------------------------------------------------------------------------------------------
# Property-based: no parser raises on any input, and results are well-formed
# ----------------------------------------------------------------------------------------------
FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "<ANSWER>", "<answer", "answer>", "{", "}", "[", "]", "(", ")",
    '"start_time"', '"end_time"', "start", "end", ":", ": ", ",", ";", "=", "'", '"', "to", " to ", "-", "--",
    "\u2013", "~", "and", "s", "sec", "seconds", ".", "..", "0", "1", "12", "12.5", "99999999999999999999999", ".5",
    "00:12", "1:02:03", "1:2:3:4", "::", "e", "1e999", "nan", "inf", "-1", "A", "B", "(B)", "B.", "The answer is ",
    "option", "Answer:", "starts at ", "ends at ", " is ", "\n", " ", "\t", "\x00", "\u0663", "\u00b2", "\ud7ff",
    "\U0001f600", "İ", "ß",
]
adversarial_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=40).map("".join)
any_text = st.one_of(st.text(max_size=200), adversarial_text)
PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(any_text, st.sampled_from(["first", "last"]), st.booleans())
def test_extract_answer_never_raises(text, position, fallback):
    answer = extract_answer(text, position=position, fallback_to_response=fallback)
    assert answer is None or isinstance(answer, str)


@PROPERTY
@given(any_text, st.sampled_from(["strict", "lenient"]))
def test_format_reward_never_raises(text, mode):
    assert format_reward(text, mode) in (0.0, 1.0)


@PROPERTY
@given(any_text, st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
       st.sampled_from(["seconds", "fraction"]))
def test_parse_span_never_raises(text, duration, unit):
    span = parse_span(text, duration=duration, timestamp_unit=unit)
    if span is not None:
        start, end = span
        assert start <= end and abs(start) < float("inf") and abs(end) < float("inf")


@PROPERTY
@given(any_text)
def test_parse_timestamp_never_raises(text):
    value = parse_timestamp(text)
    assert value is None or abs(value) < float("inf")   # negative values are read (clipped later)


@PROPERTY
@given(any_text, st.one_of(st.none(), st.lists(st.text(max_size=20), max_size=6)))
def test_parse_choice_never_raises(text, options):
    letter = parse_choice(text, options)
    valid = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(options)] if options else "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    assert letter is None or letter in valid
    parse_letter_answer(text, options)


@PROPERTY
@given(st.one_of(st.none(), st.integers(), st.floats(), st.binary(max_size=20), st.lists(st.integers(), max_size=3)))
def test_parsers_accept_non_strings(value):
    extract_answer(value)
    parse_span(value)
    parse_choice(value)
    parse_timestamp(value)
    format_reward(value)


@pytest.mark.parametrize("text", [
    "9" * 50_000, " " * 50_000 + "x", "1 " + " " * 50_000 + "x", "<answer>" * 10_000, "</answer>" * 10_000,
    "<think>" * 10_000, "1:" * 20_000, "1." * 20_000, "[1, " * 10_000, "start: " + " " * 50_000 + "x",
    "B" + " " * 50_000 + "x", "the answer is " * 5_000, "A " * 20_000, "start is " * 10_000,
    "end at" + " " * 50_000 + "x",
])
def test_parsers_are_fast_on_long_adversarial_input(text):
    # CPU seconds of this process, not wall time: a loaded machine must not fail it. Quadratic
    # backtracking on these 50k-character inputs costs minutes; linear parsing, milliseconds.
    began = time.process_time()
    for candidate in (text, f"<answer>{text}</answer>"):
        extract_answer(candidate)
        format_reward(candidate, "strict")
        format_reward(candidate, "lenient")
        parse_span(candidate)
        parse_choice(candidate, OPTIONS)
        parse_timestamp(candidate)
    assert time.process_time() - began < 5.0
