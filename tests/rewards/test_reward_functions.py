"""Format, IoU, choice and grounded-QA rewards against hand-computed values; registry; stats."""
from dataclasses import asdict, dataclass, fields
from typing import Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from megavrl.rewards import (REWARDS, RewardConfig, RewardResult, RewardStats, format_reward, register_reward,
                             score, score_batch, temporal_iou, validate_sample)

TVG = {"id": "t1", "task": "tvg", "question": "when?", "options": None, "answer": None,
       "timestamps": [10.0, 20.0], "duration": 30.0}
MCQ = {"id": "m1", "task": "mcq", "question": "what?", "options": ["a dog", "a red car", "a cat"], "answer": "B",
       "timestamps": None, "duration": 30.0}
GQA = {"id": "g1", "task": "gqa", "question": "what and when?", "options": ["a dog", "a red car"], "answer": "B",
       "timestamps": [2.0, 6.0], "duration": 10.0}


def wrap(answer: str, think: str = "reasoning") -> str:
    return f"<think>{think}</think>\n<answer>{answer}</answer>"


# ----------------------------------------------------------------------------------------------
# Format reward
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("response, strict, lenient", [
    ("<think>x</think><answer>B</answer>", 1.0, 1.0),
    ("  <think>x</think>\n\n<answer> B </answer>\n", 1.0, 1.0),
    ("<think></think><answer>B</answer>", 1.0, 1.0),  # an empty think is allowed
    ("<think>x</think><answer>  </answer>", 0.0, 0.0),  # an empty answer is not
    ("<answer>B</answer>", 0.0, 1.0),  # no think
    ("<answer>B</answer><think>x</think>", 0.0, 1.0),  # wrong order
    ("<think>x</think>text<answer>B</answer>", 0.0, 1.0),  # text between the blocks
    ("<think>x</think><answer>B</answer> trailing", 0.0, 1.0),
    ("<think>x</think><answer>A</answer><answer>B</answer>", 0.0, 1.0),  # two answers
    ("<think>x<think>y</think><answer>B</answer>", 0.0, 1.0),  # nested think
    ("<THINK>x</THINK><ANSWER>B</ANSWER>", 0.0, 1.0),  # strict tags are lower-case
    ("<think>x</think><answer>B", 0.0, 0.0),  # truncated
    ("B", 0.0, 0.0),
])
def test_format_reward(response, strict, lenient):
    assert format_reward(response, "strict") == strict
    assert format_reward(response, "lenient") == lenient


# ----------------------------------------------------------------------------------------------
# Temporal IoU
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, gt, duration, iou", [
    ((10, 20), (10, 20), 30, 1.0),
    ((12.5, 17.8), (10, 20), 30, 5.3 / 10),  # inside: 5.3 / 10
    ((15, 25), (10, 20), 30, 5 / 15),  # overlap 5, union 15
    ((0, 5), (10, 20), 30, 0.0),  # disjoint
    ((20, 25), (10, 20), 30, 0.0),  # touching
    ((15, 40), (10, 20), 30, 5 / 20),  # pred clipped to [15, 30]: overlap 5, union 20
    ((-10, 15), (10, 20), 30, 5 / 20),  # pred clipped to [0, 15]: overlap 5, union 20
    ((15, 40), (10, 20), None, 5 / 40),  # no duration: no upper clip; union 10 + 25 - 5 = 30 -> 5/30? see below
    ((35, 40), (10, 20), 30, 0.0),  # entirely after the video: empty after clipping
    ((12, 12), (10, 20), 30, 0.0),  # empty prediction
    ((20, 10), (10, 20), 30, 0.0),  # reversed: invalid (parsers swap before this)
    (None, (10, 20), 30, 0.0),
    ((float("nan"), 3), (10, 20), 30, 0.0),
    ((1, float("inf")), (10, 20), 30, 0.0),
    ("12", (10, 20), 30, 0.0),
    ((1, 2, 3), (10, 20), 30, 0.0),
])
def test_temporal_iou(pred, gt, duration, iou):
    if pred == (15, 40) and duration is None:
        iou = 5 / 30  # [15, 40] vs [10, 20]: overlap 5, union 10 + 25 - 5 = 30
    assert temporal_iou(pred, gt, duration) == pytest.approx(iou, abs=1e-12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(st.floats(), st.floats()), st.tuples(st.floats(), st.floats()),
       st.one_of(st.none(), st.floats()))
def test_temporal_iou_is_bounded_and_symmetric(pred, gt, duration):
    value = temporal_iou(pred, gt, duration)
    assert 0.0 <= value <= 1.0
    assert value == temporal_iou(gt, pred, duration)


# ----------------------------------------------------------------------------------------------
# Task rewards through score()
# ----------------------------------------------------------------------------------------------
def test_tvg_reward_hand_computed():
    result = score("tvg", wrap("12.5 to 17.8"), TVG)
    assert result.components == {"format": 1.0, "iou": pytest.approx(0.53)}
    assert result.total == pytest.approx(1.53)
    assert result.parse_ok and result.error is None
    assert result.parsed["span"] == (12.5, 17.8)


def test_tvg_reward_json_clock_and_weights():
    config = RewardConfig(format_weight=0.1, iou_weight=0.9)
    result = score("tvg", wrap('{"start_time": "00:15", "end_time": "00:25"}'), TVG, config)
    assert result.components["iou"] == pytest.approx(5 / 15)
    assert result.total == pytest.approx(0.1 * 1.0 + 0.9 * 5 / 15)


def test_tvg_reward_clips_prediction_to_duration():
    result = score("tvg", wrap("[15, 45]"), TVG)  # clipped to [15, 30]: overlap 5, union 20
    assert result.components["iou"] == pytest.approx(0.25)


def test_tvg_reward_fraction_unit_from_config_or_row():
    frac = RewardConfig(timestamp_unit="fraction")
    assert score("tvg", wrap("[0.5, 0.6]"), TVG, frac).components["iou"] == pytest.approx(3 / 10)  # [15, 18]
    row = dict(TVG, timestamp_unit="fraction")
    assert score("tvg", wrap("[0.5, 0.6]"), row).components["iou"] == pytest.approx(3 / 10)
    # In seconds the same numbers are a span [0.5, 0.6], disjoint from [10, 20].
    assert score("tvg", wrap("[0.5, 0.6]"), TVG).components["iou"] == 0.0


def test_tvg_parse_failures_score_zero_and_are_flagged():
    no_span = score("tvg", wrap("somewhere in the middle"), TVG)
    assert no_span.components == {"format": 0.0, "iou": 0.0}  # the template around no span is not the format
    assert no_span.total == 0.0 and not no_span.parse_ok and "span" in no_span.error
    template_only = score("tvg", wrap("somewhere in the middle"), TVG, RewardConfig(format_needs_answer=False))
    assert template_only.components == {"format": 1.0, "iou": 0.0} and template_only.total == 1.0
    no_answer = score("tvg", "<think>12.5 to 17.8</think>", TVG)
    assert no_answer.total == 0.0 and not no_answer.parse_ok and "<answer>" in no_answer.error


def test_answer_position_first_or_last():
    response = "<answer>[0, 5]</answer><answer>[10, 20]</answer>"
    assert score("tvg", response, TVG).components["iou"] == 1.0
    assert score("tvg", response, TVG, RewardConfig(answer_position="first")).components["iou"] == 0.0


def test_lenient_format_mode():
    response = "<answer>[10, 20]</answer>"
    assert score("tvg", response, TVG).total == 1.0  # strict: format 0, iou 1
    assert score("tvg", response, TVG, RewardConfig(format_mode="lenient")).total == 2.0


@pytest.mark.parametrize("answer, choice", [
    ("B", 1.0), ("(B)", 1.0), ("B.", 1.0), ("The answer is B", 1.0), ("a red car", 1.0), ("B. a red car", 1.0),
    ("A", 0.0), ("(C)", 0.0), ("a cat", 0.0),
])
def test_mcq_reward_hand_computed(answer, choice):
    result = score("mcq", wrap(answer), MCQ)
    assert result.components == {"format": 1.0, "choice": choice}
    assert result.total == 1.0 + choice
    assert result.parse_ok


def test_mcq_reward_weights_and_answer_as_option_text():
    row = dict(MCQ, answer="a red car")
    result = score("mcq", wrap("B"), row, RewardConfig(format_weight=0.5, choice_weight=2.0))
    assert result.total == pytest.approx(0.5 + 2.0)


def test_mcq_unparsable_letter_is_a_counted_failure():
    result = score("mcq", wrap("maybe the second one"), MCQ)
    assert result.components == {"format": 0.0, "choice": 0.0}
    assert not result.parse_ok and "letter" in result.error


def test_mcq_free_text_answer_without_options():
    row = dict(MCQ, options=None, answer="Two people")
    assert score("mcq", wrap("two people."), row).components["choice"] == 1.0
    assert score("mcq", wrap("three people"), row).components["choice"] == 0.0
    numeric = dict(MCQ, options=None, answer="3")
    assert score("mcq", wrap("3.0"), numeric).components["choice"] == 1.0


@pytest.mark.parametrize("answer, choice, iou", [
    ('{"answer": "B", "start_time": 2, "end_time": 6}', 1.0, 1.0),
    ('{"answer": "A", "start_time": "00:04", "end_time": "00:08"}', 0.0, 2 / 6),
    ("(B) 4 to 8", 1.0, 2 / 6),
    ("B, [0, 4]", 1.0, 2 / 6),
    ("a red car, from 2s to 4s", 1.0, 0.5),
    ("B", 1.0, 0.0),  # no span: a parse failure, choice still scored
])
def test_gqa_reward_hand_computed(answer, choice, iou):
    config = RewardConfig(gqa_choice_weight=0.7, gqa_iou_weight=0.3, format_weight=0.2)
    result = score("gqa", wrap(answer), GQA, config)
    fmt = 1.0 if result.parse_ok else 0.0  # "B" alone lacks the span the gqa answer format asks for
    assert result.components == {"format": fmt, "choice": choice, "iou": pytest.approx(iou)}
    assert result.total == pytest.approx(0.2 * fmt + 0.7 * choice + 0.3 * iou)


def test_gqa_partial_parse_is_flagged():
    result = score("gqa", wrap("B"), GQA)
    assert not result.parse_ok and "span" in result.error


def test_dual_reward_on_a_mixed_batch_uses_each_rows_task():
    rows = [TVG, MCQ, GQA]
    responses = [wrap("[10, 20]"), wrap("B"), wrap('{"answer": "B", "start_time": 2, "end_time": 6}')]
    results = score_batch(responses, rows)
    assert [r.total for r in results] == [2.0, 2.0, 3.0]
    assert set(results[0].components) == {"format", "iou"}
    assert set(results[1].components) == {"format", "choice"}
    assert set(results[2].components) == {"format", "choice", "iou"}
    with pytest.raises(ValueError, match="pair up"):
        score_batch(responses[:2], rows)


@pytest.mark.parametrize("task, row", [
    ("tvg", dict(TVG, timestamps=None)),
    ("tvg", dict(TVG, timestamps=[5, "x"])),
    ("tvg", dict(TVG, timestamps=[20, 10])),
    ("tvg", dict(TVG, duration=-1)),
    ("tvg", dict(TVG, duration=None, timestamp_unit="fraction")),
    ("tvg", dict(TVG, timestamp_unit="minutes")),
    ("mcq", dict(MCQ, answer=None)),
    ("mcq", dict(MCQ, answer="a horse")),  # not among the options
    ("gqa", dict(GQA, timestamps=None)),
])
def test_invalid_ground_truth_scores_zero_without_raising(task, row):
    for response in (wrap("[1, 2] B"), "garbage"):
        result = score(task, response, row)
        assert result.total == 0.0 and result.invalid_sample and not result.parse_ok
        assert all(v == 0.0 for v in result.components.values())
        assert repr(row["id"]) in result.error
    assert validate_sample(task, row) is not None  # a data pipeline can skip the row up front


def test_validate_sample_accepts_good_rows():
    assert [validate_sample(row["task"], row) for row in (TVG, MCQ, GQA)] == [None, None, None]
    assert validate_sample("tvg", dict(TVG, timestamp_unit="fraction")) is None
    assert "fraction" in validate_sample("tvg", dict(TVG, duration=None), RewardConfig(timestamp_unit="fraction"))


def test_sample_may_be_an_object():
    @dataclass
    class Row:
        id: str
        task: str
        timestamps: Optional[list]
        duration: float
        options: Optional[list] = None
        answer: Optional[str] = None

    result = score(None, wrap("[10, 20]"), Row(id="x", task="tvg", timestamps=[10, 20], duration=30))
    assert result.total == 2.0


# ----------------------------------------------------------------------------------------------
# Registry and config
# ----------------------------------------------------------------------------------------------
def test_unknown_task_is_a_value_error_naming_known_tasks():
    with pytest.raises(ValueError) as info:
        score("ocr", "<answer>x</answer>", {"id": 7})
    message = str(info.value)
    assert "'ocr'" in message and "'tvg'" in message and "'mcq'" in message and "'gqa'" in message


def test_register_reward_and_duplicate_guard():
    @register_reward("test_len")
    def length_reward(response, sample, config):
        return RewardResult(total=float(len(response)), components={"len": float(len(response))})

    try:
        assert score("test_len", "abc", {}).total == 3.0
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_len")(length_reward)
    finally:
        REWARDS.pop("test_len")


def test_a_raising_reward_function_is_caught_and_reported():
    @register_reward("test_broken")
    def broken(response, sample, config):
        raise KeyError("boom")

    try:
        result = score("test_broken", "x", {"id": 1})
        assert result.total == 0.0 and not result.parse_ok and "KeyError" in result.error
    finally:
        REWARDS.pop("test_broken")


def test_reward_config_fields_defaults_and_validation():
    assert [(f.name, f.default) for f in fields(RewardConfig)] == [
        ("answer_position", "last"), ("format_mode", "strict"), ("format_needs_answer", True), ("format_weight", 1.0), ("iou_weight", 1.0),
        ("choice_weight", 1.0), ("gqa_choice_weight", 1.0), ("gqa_iou_weight", 1.0), ("timestamp_unit", "seconds"),
        ("preset", "megavrl")]
    assert score("tvg", wrap("[10, 20]"), TVG, asdict(RewardConfig(iou_weight=3.0))).total == 4.0
    with pytest.raises(ValueError, match="format_mode"):
        RewardConfig(format_mode="loose")
    with pytest.raises(ValueError, match="answer_position"):
        RewardConfig(answer_position="middle")
    with pytest.raises(ValueError, match="timestamp_unit"):
        RewardConfig(timestamp_unit="frames")
    with pytest.raises(ValueError, match="reward.preset='r1'"):
        RewardConfig(preset="r1")
    with pytest.raises(ValueError, match="iou_weight"):
        RewardConfig(iou_weight=float("nan"))


# ----------------------------------------------------------------------------------------------
# score() never raises on any response
# ----------------------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.lists(st.sampled_from(
    ["<think>", "</think>", "<answer>", "</answer>", "B", "(A)", "[", "]", "12.5", " to ", "00:12", ",",
     '"start_time":', '"end_time":', "{", "}", '"answer": "', "a red car", " "]), max_size=30).map("".join)),
       st.sampled_from(["tvg", "mcq", "gqa"]), st.sampled_from(["strict", "lenient"]),
       st.sampled_from(["seconds", "fraction"]))
def test_score_never_raises_and_is_bounded(response, task, mode, unit):
    config = RewardConfig(format_mode=mode, timestamp_unit=unit)
    result = score(task, response, {"tvg": TVG, "mcq": MCQ, "gqa": GQA}[task], config)
    assert result.error is None or "raised" not in result.error
    assert 0.0 <= result.total <= len(result.components)
    assert all(0.0 <= v <= 1.0 for v in result.components.values())


# ----------------------------------------------------------------------------------------------
# RewardStats
# ----------------------------------------------------------------------------------------------
def test_reward_stats_summary_and_merge():
    a, b = RewardStats(), RewardStats()
    a.add("tvg", score("tvg", wrap("[10, 20]"), TVG))  # total 2, iou 1
    a.add("tvg", score("tvg", wrap("no span"), TVG))  # total 0 (no format without a span), parse failure
    b.add("mcq", score("mcq", wrap("B"), MCQ))  # total 2
    b.add("mcq", score("mcq", wrap("B"), dict(MCQ, answer=None)))  # invalid sample
    a.merge(b)
    s = a.summary()
    assert s["reward/count"] == 4.0
    assert s["reward/total"] == pytest.approx((2 + 0 + 2 + 0) / 4)
    assert s["reward/parse_failures"] == 1.0
    assert s["reward/parse_fail_rate"] == 0.25
    assert s["reward/invalid_samples"] == 1.0
    assert s["reward/tvg/total"] == 1.0 and s["reward/tvg/iou"] == 0.5 and s["reward/tvg/format"] == 0.5
    assert s["reward/tvg/parse_fail_rate"] == 0.5
    assert s["reward/mcq/choice"] == 0.5 and s["reward/mcq/parse_failures"] == 0.0
    assert a.errors == {"no time span in the answer": 1, "invalid sample": 1}
    a.reset()
    assert a.summary()["reward/count"] == 0.0


def test_malformed_answers_get_no_format_reward_so_grpo_prefers_a_readable_one():
    # Regression (issue 19): the demo's GRPO turned "1.1 to 6.1" into "1.1.1.1". In its groups no
    # tvg sample had a readable span, so the template was the only reward that varied, and a
    # template around an unreadable answer was rewarded as well-formed: GRPO reinforced it.
    from megavrl.rl.advantages import group_advantages

    group = [wrap("1.1.1.1"), wrap("1.1 to 6.1"), "It happens from 1.1 to 6.1", wrap("1.1.1.1")]
    rewards = [score("tvg", r, TVG).total for r in group]  # TVG is [10, 20]: the readable span has IoU 0
    assert rewards == [0.0, 1.0, 0.0, 0.0]
    advantages = group_advantages([rewards])[0][0].tolist()
    assert advantages[1] > 0 and all(a < 0 for i, a in enumerate(advantages) if i != 1)
    # All malformed: no reward varies, so nothing is reinforced.
    assert [score("tvg", r, TVG).total for r in (wrap("1.1.1.1"), wrap("2.1.1"))] == [0.0, 0.0]
    old = [score("tvg", r, TVG, RewardConfig(format_needs_answer=False)).total for r in group]
    assert old == [1.0, 1.0, 0.0, 1.0]  # before: the malformed answers tied with the readable one
