"""Properties of the span parser over generated spellings of the same span.

Each number is written in one of several spellings (plain decimal, scientific notation, decimal
comma, h:mm:ss.ms clock time, with a minus sign), two numbers are joined by one of several
separators (to, -, en/em dash, ~, comma, brackets, JSON with string values), and the parser
must read back exactly the written values (as ``float`` reads them), ordered start <= end.
"""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megavrl.rewards import parse_span, parse_timestamp, score

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)

# (thousandths of a second) -> (text, value in seconds)
millis = st.integers(min_value=0, max_value=4_000_000)


def plain(ms: int) -> tuple[str, float]:
    text = f"{ms // 1000}.{ms % 1000:03d}".rstrip("0").rstrip(".")
    return text, float(text)


def scientific(ms: int) -> tuple[str, float]:
    text = f"{ms / 1000:.4e}"
    return text, float(text)


def decimal_comma(ms: int) -> tuple[str, float]:
    text, value = plain(ms)
    return text.replace(".", ","), value


def clock(ms: int) -> tuple[str, float]:
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, frac = divmod(rest, 1000)
    text = f"{h}:{m:02d}:{s:02d}.{frac:03d}"
    return text, h * 3600.0 + m * 60.0 + float(f"{s}.{frac:03d}")


SPELLINGS = {"plain": plain, "scientific": scientific, "decimal_comma": decimal_comma, "clock": clock}
SEPARATORS = ["{a} to {b}", "{a} - {b}", "{a}\u2013{b}", "{a} \u2014 {b}", "{a}~{b}", "from {a} s to {b} s",
              "[{a}, {b}]", "({a}; {b})", "{a}, {b}", "between {a} and {b}",
              '{{"start_time": "{a}", "end_time": "{b}"}}']


@SETTINGS
@given(a=millis, b=millis, spelling=st.sampled_from(sorted(SPELLINGS)),
       separator=st.sampled_from(SEPARATORS), negative_start=st.booleans(),
       prefix=st.sampled_from(["", "The event happens ", "<answer>", "Answer: "]))
def test_every_spelling_reads_back_its_values(a, b, spelling, separator, negative_start, prefix):
    text_a, value_a = SPELLINGS[spelling](a)
    text_b, value_b = SPELLINGS[spelling](b)
    if negative_start and value_a > 0:
        text_a, value_a = "-" + text_a, -value_a
    text = prefix + separator.format(a=text_a, b=text_b)
    assert parse_span(text) == pytest.approx((min(value_a, value_b), max(value_a, value_b)), rel=1e-12, abs=1e-12)


@SETTINGS
@given(ms=millis, spelling=st.sampled_from(sorted(SPELLINGS)),
       unit=st.sampled_from(["", "s", " s", " sec", " seconds"]))
def test_one_timestamp_in_every_spelling(ms, spelling, unit):
    text, value = SPELLINGS[spelling](ms)
    assert parse_timestamp(text + unit) == pytest.approx(value, rel=1e-12, abs=1e-12)


@SETTINGS
@given(a=st.integers(0, 999), b=st.integers(0, 999))
def test_a_comma_between_two_integers_stays_a_separator(a, b):
    # "[12,17]" and "12,17": the decimal reading finds one number only, so the comma separates.
    assert parse_span(f"[{a},{b}]") == (min(a, b), max(a, b))
    assert parse_span(f"{a},{b}") == (min(a, b), max(a, b))


@pytest.mark.parametrize("text, span", [
    ("1.73e+01 to 2.0e1", (17.3, 20.0)),
    ("-1.5 to 17.7", (-1.5, 17.7)),
    ("3,0 to 7,8", (3.0, 7.8)),
    ("3,5 s - 9 s", (3.5, 9.0)),
    ('{"start_time": "-1.4", "end_time": "5.2"}', (-1.4, 5.2)),
    ("start_time:-1.4, end_time:5.2", (-1.4, 5.2)),
    ("[-2, 3]", (-2.0, 3.0)),
    ("12.5 \u2013 17.8", (12.5, 17.8)),
    ("12.5\u201417.8", (12.5, 17.8)),
    ("0:00:12.500 - 0:01:02.250", (12.5, 62.25)),
    ("00:00:12,500 --> 00:00:15,000", (12.5, 15.0)),
    ("12-17", (12.0, 17.0)),           # a dash between numbers is a range, not a sign
    ("12.5,17.8", (12.5, 17.8)),       # a comma after a decimal point is a separator
    ("12,17.8", (12.0, 17.8)),
    ("17.7 to -1.5", (-1.5, 17.7)),    # reversed: swapped
])
def test_issue_spellings(text, span):
    assert parse_span(text) == pytest.approx(span)


def test_a_negative_start_is_clipped_by_the_reward():
    # The README: spans are clipped to [0, duration] in the training reward's IoU.
    sample = {"task": "tvg", "timestamps": [0.0, 10.0], "duration": 20.0}
    result = score("tvg", "<think></think><answer>-5 to 10</answer>", sample)
    assert result.parsed["span"] == (-5.0, 10.0) and result.components["iou"] == 1.0


def test_json_string_values_round_trip():
    text = json.dumps({"start_time": "1.73e+01", "end_time": "2,5e1"})
    assert parse_span(text) == pytest.approx((17.3, 25.0))
