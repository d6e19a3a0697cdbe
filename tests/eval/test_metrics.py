"""Evaluation metrics against values computed by hand from lmms-eval's and NExT-GQA's definitions.

References (the formulas the expected values below are computed with):
- lmms-eval, lmms_eval/tasks/charades_sta/eval_tvg.py: IoU = max(min(ends) - max(starts), 0) /
  (max(ends) - min(starts)); R@t counts IoU >= t; mIoU and R@t are percentages over all samples;
  an unparsable answer is replaced by a span disjoint from the ground truth (IoU 0, still counted).
- lmms-eval, lmms_eval/tasks/nextqa (exact_match, mean) and mvbench (mvbench_aggregate_results:
  empty responses left out of the denominator).
- NExT-GQA, code/TempGQA/eval_ground.py: IoU and IoP maximised over ground-truth segments;
  IoP = intersection / prediction length, a point prediction inside a segment has IoP 1;
  thresholds with >=; Acc@GQA = answer correct and IoP >= 0.5.
"""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megavrl.eval import (aggregate_metrics, evaluate_predictions, flatten_metrics, prediction_record,
                          score_prediction, temporal_iop)
from megavrl.eval.metrics import best_overlap, temporal_grounding_metrics
from megavrl.rewards import temporal_iou

OPTIONS = ["a cat", "a dog", "a bird", "a fish"]


def _tvg(i, response, timestamps, **extra):
    return {"id": f"tvg{i}", "task": "tvg", "benchmark": "charades_sta", "response": response,
            "ground_truth": {"timestamps": timestamps, "duration": 30.0, **extra}}


def _mcq(i, response, answer):
    return {"id": f"mcq{i}", "task": "mcq", "benchmark": "mvbench", "response": response,
            "ground_truth": {"answer": answer, "options": OPTIONS}}


def _gqa(i, response, answer, timestamps):
    return {"id": f"gqa{i}", "task": "gqa", "benchmark": "nextgqa", "response": response,
            "ground_truth": {"answer": answer, "options": OPTIONS, "timestamps": timestamps, "duration": 30.0}}


def _answer(text):
    return f"<think>looking at the video</think><answer>{text}</answer>"


TVG = [
    _tvg(0, _answer("0 to 3"), [0, 10]),            # IoU 3/10 = 0.3 exactly (boundary of R@0.3)
    _tvg(1, _answer("[0, 5]"), [0, 10]),            # IoU 5/10 = 0.5 exactly (boundary of R@0.5)
    _tvg(2, _answer("0 - 7 seconds"), [0, 10]),     # IoU 7/10 = 0.7 exactly (boundary of R@0.7)
    _tvg(3, "the event happens somewhere", [10, 20]),   # no answer block: parse failure, IoU 0
    _tvg(4, _answer("4 to 12"), [2, 6]),            # inter 6-4=2, hull 12-2=10: IoU 0.2
    _tvg(5, _answer("0 to 2.9"), [0, 10]),          # IoU 0.29, just under 0.3
    _tvg(6, _answer("28 to 40"), [20, 30]),         # beyond the 30 s video: not clipped (lmms-eval
                                                    # does not clip): inter 2, hull 20 -> IoU 0.1
    _tvg(7, _answer("1 to 2"), "not a span"),       # unusable ground truth: invalid, left out
]
# Valid IoUs: [0.3, 0.5, 0.7, 0.0, 0.2, 0.29, 0.1], n = 7
# mIoU  = 100 * (0.3 + 0.5 + 0.7 + 0 + 0.2 + 0.29 + 0.1) / 7 = 100 * 2.09 / 7 = 29.857142...
# R@0.3 = 100 * #{0.3, 0.5, 0.7} / 7 = 300/7 = 42.857142...   (0.29 < 0.3 does not count)
# R@0.5 = 100 * #{0.5, 0.7} / 7      = 200/7 = 28.571428...
# R@0.7 = 100 * #{0.7} / 7           = 100/7 = 14.285714...
TVG_EXPECTED = {"n": 7, "n_parse_failures": 1, "n_invalid": 1, "mIoU": 100 * 2.09 / 7,
                "R@0.3": 300 / 7, "R@0.5": 200 / 7, "R@0.7": 100 / 7,
                "format_rate": 100 * 6 / 7}   # all but the untagged response follow the template

MCQ = [
    _mcq(0, _answer("B"), "B"),                     # correct
    _mcq(1, _answer("(C) a bird"), "C"),            # correct
    _mcq(2, _answer("A"), "D"),                     # wrong
    _mcq(3, "", "A"),                               # empty response: parse failure, wrong
    _mcq(4, _answer("no idea"), "A"),               # no letter: parse failure, wrong
    _mcq(5, _answer("a fish"), "D"),                # the text of option D: lenient correct; lmms-eval reads
                                                    # the article "a" as the letter A: wrong
]
# lmms-eval's extraction: correct = [T, T, F, F, F, F]
# accuracy          = 100 * 2 / 6 = 33.3...       (every sample counted)
# accuracy_nonempty = 100 * 2 / 5 = 40.0          (MVBench: the empty response is not counted)
# accuracy_lenient  = 100 * 3 / 6 = 50.0          (megavrl's parser credits the option's text)
MCQ_EXPECTED = {"n": 6, "n_parse_failures": 2, "n_invalid": 0, "accuracy": 200 / 6, "accuracy_nonempty": 40.0,
                "accuracy_lenient": 50.0}


def _gqa_answer(letter, start, end):
    return _answer(f'{{"answer": "{letter}", "start_time": {start}, "end_time": {end}}}')


GQA = [
    # pred [2, 6] vs segments [0, 4] and [10, 20]: with [0, 4] inter 2, hull 6 -> IoU 1/3, IoP 2/4 = 0.5;
    # with [10, 20] disjoint -> 0, 0. Max: IoU 1/3, IoP 0.5 (boundary of Acc@GQA). Answer correct.
    _gqa(0, _gqa_answer("B", 2, 6), "B", [[0, 4], [10, 20]]),
    # pred [4, 14] vs [0, 10]: inter 6, hull 14 -> IoU 3/7; IoP 6/10 = 0.6. Correct.
    _gqa(1, _gqa_answer("A", 4, 14), "A", [0, 10]),
    # pred [2, 4] vs [0, 10]: IoU 2/10 = 0.2, IoP 1.0. Wrong answer (D vs C).
    _gqa(2, _gqa_answer("D", 2, 4), "C", [0, 10]),
    # a point [5, 5] inside [0, 10]: IoU 0, IoP 1 (NExT-GQA's point rule). Correct.
    _gqa(3, _answer("(B) 5 to 5"), "B", [0, 10]),
    # no span: parse failure, IoU 0, IoP 0; the answer is still read and correct.
    _gqa(4, _answer("A"), "A", [0, 10]),
    # pred [3, 8] vs [0, 10]: IoU 5/10 = 0.5, IoP 1.0. Wrong answer.
    _gqa(5, _gqa_answer("B", 3, 8), "A", [0, 10]),
]
# correct = [T, T, F, T, T, F]; n = 6; Acc@QA = 100 * 4/6 over every question.
# The official eval_ground.py skips questions without a predicted span (4): m = 5 grounded questions,
# IoU = [1/3, 3/7, 0.2, 0, 0.5]; IoP = [0.5, 0.6, 1, 1, 1]
# mIoU    = (1/3 + 3/7 + 0.2 + 0.5) / 5 * 100;  IoU@0.3 = #{1/3, 3/7, 0.5} / 5 * 100 = 60;
#           IoU@0.5 = #{0.5} / 5 * 100 = 20
# mIoP    = 4.1 / 5 * 100 = 82;  IoP@0.3 = IoP@0.5 = 5 / 5 * 100 = 100   (0.5 counts: >=)
# Acc@GQA = #{0 (IoP 0.5), 1 (0.6), 3 (1.0)} / 5 * 100 = 60   (2, 5 wrong)
GQA_EXPECTED = {"n": 6, "n_parse_failures": 1, "n_invalid": 0, "n_no_span": 1, "Acc@QA": 400 / 6,
                "mIoU": (1 / 3 + 3 / 7 + 0.2 + 0.5) / 5 * 100, "IoU@0.3": 60.0, "IoU@0.5": 20.0,
                "mIoP": 82.0, "IoP@0.3": 100.0, "IoP@0.5": 100.0, "Acc@GQA": 60.0}


def _check(entry, expected):
    for key, value in expected.items():
        assert entry[key] == pytest.approx(value, abs=1e-9), key


@pytest.fixture(scope="module")
def evaluated():
    return evaluate_predictions(TVG + MCQ + GQA, expected={"activitynet": "tvg"})


def test_temporal_grounding_matches_lmms_eval_by_hand(evaluated):
    scored, metrics = evaluated
    _check(metrics["benchmarks"]["charades_sta"], TVG_EXPECTED)
    assert [s["iou"] for s in scored[:7]] == pytest.approx([0.3, 0.5, 0.7, 0.0, 0.2, 0.29, 0.1])
    # The boundary IoUs are exactly the thresholds, so ">=" (not ">") is what is being tested.
    assert scored[0]["iou"] == 0.3 and scored[1]["iou"] == 0.5 and scored[2]["iou"] == 0.7
    assert scored[3]["parse_ok"] is False and scored[3]["iou"] == 0.0
    assert scored[7]["invalid"] is True and "timestamps" in scored[7]["error"]


def test_multiple_choice_accuracy_by_hand(evaluated):
    _, metrics = evaluated
    _check(metrics["benchmarks"]["mvbench"], MCQ_EXPECTED)


def test_grounded_qa_matches_next_gqa_by_hand(evaluated):
    scored, metrics = evaluated
    _check(metrics["benchmarks"]["nextgqa"], GQA_EXPECTED)
    gqa = scored[-6:]
    assert [s["correct"] for s in gqa] == [True, True, False, True, True, False]
    assert [s["iop"] for s in gqa] == pytest.approx([0.5, 0.6, 1.0, 1.0, 0.0, 1.0])


def test_empty_benchmark_and_overall(evaluated):
    _, metrics = evaluated
    empty = metrics["benchmarks"]["activitynet"]
    assert empty["n"] == 0 and empty["mIoU"] is None and empty["R@0.5"] is None
    overall = metrics["overall"]
    # The mean of the primary metrics of the three non-empty benchmarks; the empty one is left out:
    # (mIoU of charades_sta + accuracy of mvbench + Acc@GQA of nextgqa) / 3
    assert overall["mean_primary"] == pytest.approx((100 * 2.09 / 7 + 200 / 6 + 60.0) / 3)
    assert overall["n_benchmarks"] == 3
    assert overall["n"] == 7 + 6 + 6 and overall["n_parse_failures"] == 1 + 2 + 1 and overall["n_invalid"] == 1
    assert list(metrics["benchmarks"]) == ["activitynet", "charades_sta", "mvbench", "nextgqa"]


def test_parsed_predictions_give_the_same_metrics(evaluated):
    # The same samples with the answers already parsed (no response): the same task metrics.
    scored, metrics = evaluated
    records = [{"id": s["id"], "task": s["task"], "benchmark": s["benchmark"], "ground_truth": s["ground_truth"],
                "prediction": {"span": (s["prediction"] or {}).get("span"),
                               "choice": (s["prediction"] or {}).get("choice")}}
               for s in scored]
    _, again = evaluate_predictions(records)
    for name in ("charades_sta", "nextgqa"):
        for key, value in metrics["benchmarks"][name].items():
            if key != "format_rate":
                assert again["benchmarks"][name][key] == pytest.approx(value), (name, key)
    # Without raw responses every sample is "answered"; the parsed choices are letters (D for "a fish").
    assert again["benchmarks"]["mvbench"]["accuracy"] == 50.0
    assert again["benchmarks"]["mvbench"]["format_rate"] is None


def test_records_that_cannot_be_scored_are_counted_not_raised():
    bad = [
        {"id": "u", "task": "captioning", "response": "x", "ground_truth": {}},   # no metric for the task
        {"id": "g", "task": "tvg", "response": "x"},                              # no ground truth
        {"id": "r", "task": "tvg", "ground_truth": {"timestamps": [0, 1]}},       # neither response nor prediction
        {"id": "a", "task": "mcq", "response": "<answer>B</answer>", "ground_truth": {"answer": "", "options": OPTIONS}},
        {"id": "n", "task": "tvg", "response": "<answer>1 to 2</answer>", "ground_truth": {"timestamps": [-1, 2]}},
    ]
    scored = [score_prediction(r) for r in bad]
    assert all(s["invalid"] for s in scored), scored
    metrics = aggregate_metrics(scored)
    assert metrics["overall"]["n_invalid"] == 5 and metrics["overall"]["n"] == 0
    assert metrics["overall"]["mean_primary"] is None


def test_a_benchmark_mixing_tasks_is_refused():
    records = [dict(TVG[0]), dict(MCQ[0], benchmark="charades_sta")]
    with pytest.raises(ValueError, match="mixes tasks"):
        evaluate_predictions(records)


# lmms-eval's lmms_eval/api/metrics.py, as written there: the standard error of a mean.
def _lmms_sample_stddev(arr):
    mu = sum(arr) / len(arr)
    return math.sqrt(sum([(x - mu) ** 2 for x in arr]) / (len(arr) - 1))


def _lmms_mean_stderr(arr):
    return _lmms_sample_stddev(arr) / math.sqrt(len(arr))


def test_stderr_is_lmms_evals_mean_stderr_over_each_metrics_rows(evaluated):
    _, metrics = evaluated
    tvg, mcq, gqa = (metrics["benchmarks"][b]["stderr"] for b in ("charades_sta", "mvbench", "nextgqa"))
    ious = [30, 50, 70, 0, 20, 29, 10]                          # the 7 valid rows, in percent
    assert tvg["mIoU"] == pytest.approx(_lmms_mean_stderr(ious), rel=1e-12)
    assert tvg["R@0.5"] == pytest.approx(_lmms_mean_stderr([0, 100, 100, 0, 0, 0, 0]), rel=1e-12)
    assert mcq["accuracy"] == pytest.approx(_lmms_mean_stderr([100, 100, 0, 0, 0, 0]), rel=1e-12)
    # accuracy_nonempty: the empty response (row 3) is outside its denominator, so outside its error.
    assert mcq["accuracy_nonempty"] == pytest.approx(_lmms_mean_stderr([100, 100, 0, 0, 0]), rel=1e-12)
    assert mcq["accuracy_lenient"] == pytest.approx(_lmms_mean_stderr([100, 100, 0, 0, 0, 100]), rel=1e-12)
    # gqa: Acc@QA over all 6 questions, the grounding metrics over the 5 with a span (row 4 has none).
    assert gqa["Acc@QA"] == pytest.approx(_lmms_mean_stderr([100, 100, 0, 100, 100, 0]), rel=1e-12)
    assert gqa["Acc@GQA"] == pytest.approx(_lmms_mean_stderr([100, 100, 0, 100, 0]), rel=1e-12)
    assert gqa["mIoU"] == pytest.approx(_lmms_mean_stderr([100 / 3, 300 / 7, 20, 0, 50]), rel=1e-12)
    assert gqa["mIoP"] == pytest.approx(_lmms_mean_stderr([50, 60, 100, 100, 100]), rel=1e-12)
    assert set(metrics["benchmarks"]["activitynet"]["stderr"].values()) == {None}   # no rows, no error
    flat = flatten_metrics(metrics)
    assert flat["eval/charades_sta/stderr/mIoU"] == tvg["mIoU"] and flat["eval/nextgqa/stderr/Acc@GQA"] == gqa["Acc@GQA"]


def test_stderr_needs_two_rows_and_refuses_a_metric_that_is_not_a_mean(monkeypatch):
    _, one = evaluate_predictions([TVG[1]])
    assert one["benchmarks"]["charades_sta"]["stderr"]["mIoU"] is None
    _, same = evaluate_predictions([TVG[1], dict(TVG[1], id="copy")])
    assert same["benchmarks"]["charades_sta"]["stderr"]["mIoU"] == 0.0
    import megavrl.eval.metrics as metrics_module

    def median_miou(ious):  # a metric that is not the mean of the rows' values
        return {**temporal_grounding_metrics(ious), "mIoU": 100 * sorted(ious)[len(ious) // 2]}
    monkeypatch.setattr(metrics_module, "temporal_grounding_metrics", median_miou)
    with pytest.raises(ArithmeticError, match="tvg mIoU"):
        evaluate_predictions([TVG[0], TVG[1], TVG[4]])  # IoUs 0.3, 0.5, 0.2: median 0.3, mean 1/3


def test_benchmark_defaults_to_task_and_flatten_for_tensorboard():
    _, metrics = evaluate_predictions([dict(TVG[1], benchmark=None)])
    assert list(metrics["benchmarks"]) == ["tvg"]
    flat = flatten_metrics(metrics)
    assert flat["eval/tvg/mIoU"] == 50.0 and flat["eval/tvg/R@0.5"] == 100.0 and flat["eval/tvg/R@0.7"] == 0.0
    assert flat["eval/overall/mean_primary"] == 50.0


# --------------------------------------------------------------------------------------------
# The per-sample overlaps against the reference formulas, on random spans
# --------------------------------------------------------------------------------------------
def lmms_eval_iou(gt, pred):
    """lmms-eval's Charades-STA IoU: the intersection over the hull of the two spans."""
    inter = min(gt[1], pred[1]) - max(gt[0], pred[0])
    return max(inter, 0) / (max(gt[1], pred[1]) - min(gt[0], pred[0]))


def next_gqa_iou_iop(gt, pred):
    """NExT-GQA's per-segment (IoU, IoP), negative overlaps floored at 0 as its max over segments does."""
    if pred[0] == pred[1]:
        return 0.0, (1.0 if gt[0] <= pred[0] <= gt[1] else 0.0)
    inter = min(gt[1], pred[1]) - max(gt[0], pred[0])
    hull = max(gt[1], pred[1]) - min(gt[0], pred[0])
    return max(0.0, inter / hull), max(0.0, inter / (pred[1] - pred[0]))


_time = st.integers(0, 2000).map(lambda t: t / 10)
_spans = st.tuples(_time, _time).map(sorted).map(tuple)


@settings(max_examples=300, deadline=None)
@given(gt=_spans, pred=_spans)
def test_iou_and_iop_equal_the_reference_formulas(gt, pred):
    if max(gt[1], pred[1]) > min(gt[0], pred[0]):   # lmms-eval divides by zero when both are one point
        assert temporal_iou(pred, gt) == pytest.approx(lmms_eval_iou(gt, pred), abs=1e-12)
    ref_iou, ref_iop = next_gqa_iou_iop(gt, pred)
    assert best_overlap(pred, [gt]) == (pytest.approx(ref_iou, abs=1e-12), pytest.approx(ref_iop, abs=1e-12))


def test_temporal_iop_edges():
    assert temporal_iop((2, 4), (0, 10)) == 1.0
    assert temporal_iop((8, 12), (0, 10)) == 0.5
    assert temporal_iop((10, 10), (0, 10)) == 1.0     # a point on the boundary is inside
    assert temporal_iop((11, 11), (0, 10)) == 0.0
    assert temporal_iop((12, 14), (0, 10)) == 0.0     # disjoint: 0, never negative
    assert temporal_iop(None, (0, 10)) == 0.0 and temporal_iop((3, 1), (0, 10)) == 1.0   # reversed: swapped
    assert temporal_iop((0, math.inf), (0, 10)) == 0.0
    # Several ground-truth segments: IoU and IoP are maximised apart (NExT-GQA).
    # (0, 4) vs (0, 3): IoU 3/4, IoP 3/4; vs (0, 100): IoU 4/100, IoP 1. Max: IoU 3/4, IoP 1.
    assert best_overlap((0, 4), [(0, 3), (0, 100)]) == (pytest.approx(0.75), pytest.approx(1.0))


def test_prediction_record_from_a_dataset_row():
    from megavrl.data.schema import Sample

    sample = Sample(id="c1", video="v.mp4", task="tvg", question="q", timestamps=[0.0, 10.0], duration=30.0,
                    dataset="charades_sta")
    record = prediction_record(sample, _answer("0 to 5"))
    assert record["benchmark"] == "charades_sta" and record["ground_truth"]["timestamps"] == [0.0, 10.0]
    assert score_prediction(record)["iou"] == 0.5           # 5 / 10
    row = {"id": "m1", "task": "mcq", "options": OPTIONS, "answer": "A"}
    assert prediction_record(row, "x")["benchmark"] == "mcq"


def test_grounded_qa_without_any_span_reports_none_and_counts_zero_overall():
    records = [_gqa(i, _answer("(A)"), "A", [0, 10]) for i in range(3)]
    _, metrics = evaluate_predictions(records)
    entry = metrics["benchmarks"]["nextgqa"]
    assert entry["n_no_span"] == 3 and entry["Acc@QA"] == 100.0
    assert entry["Acc@GQA"] is None and entry["mIoU"] is None and entry["IoP@0.5"] is None
    assert metrics["overall"]["mean_primary"] == 0.0 and metrics["overall"]["n_benchmarks"] == 1
