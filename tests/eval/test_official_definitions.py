"""megavrl's metrics against the official scripts' definitions, re-implemented here, on generated predictions.

The reference functions below are written from the published code, not imported:
- lmms-eval ``lmms_eval/tasks/charades_sta/eval_tvg.py``: ``iou(A, B) = max(min1 - max0, 0) / (max1 - min0)``,
  a reversed pair swapped by ``extract_time``, an unparsable answer replaced by [g_e + 10, g_e + 20],
  ``R@t = count * 100 / num``, ``mIoU = sum(ious) * 100 / num``.
- lmms-eval ``lmms_eval/tasks/mvbench/utils.py``: ``mcq_acc`` (``process`` on both sides) and
  ``mvbench_aggregate_results`` (``100 * correct / answered``, answered = non-empty prediction).
- NExT-GQA ``code/TempGQA/eval_ground.py``: ``get_tIoU`` and ``eval_ground`` (questions without a
  prediction skipped, maxima from 0 over the segments, ``x / cnt * 100``).
Every aggregate must be exactly equal (==, no tolerance) on at least 500 predictions per benchmark.
"""
from __future__ import annotations

import random
import re

from megavrl.eval import evaluate_predictions

N = 600


# ---------------------------------------------------------------------------------------------
# Charades-STA / ActivityNet (lmms-eval)
# ---------------------------------------------------------------------------------------------
def lmms_iou(a, b):
    max0, min0 = max(a[0], b[0]), min(a[0], b[0])
    max1, min1 = max(a[1], b[1]), min(a[1], b[1])
    return max(min1 - max0, 0) / (max1 - min0)


def lmms_tvg_aggregate(gts, preds):
    num = len(gts)
    ious = []
    for gt, pred in zip(gts, preds):
        if pred is None:
            pred = [gt[1] + 10, gt[1] + 20]
        elif pred[1] < pred[0]:
            pred = [pred[1], pred[0]]
        ious.append(lmms_iou(gt, pred))
    result = {t: sum(1 for iou in ious if iou >= t) for t in (0.3, 0.5, 0.7)}
    return {"mIoU": sum(ious) * 100 / num, "R@0.3": result[0.3] * 100 / num,
            "R@0.5": result[0.5] * 100 / num, "R@0.7": result[0.7] * 100 / num}


def _grid(rng, hi):
    return round(rng.randrange(0, int(hi * 20)) * 0.05, 2)   # a 0.05 s grid: many IoUs land on a threshold


def test_temporal_grounding_equals_lmms_eval_on_600_predictions():
    rng = random.Random(1)
    records, gts, preds = [], [], []
    for i in range(N):
        duration = rng.choice([30.0, 32.4, 120.0])
        s = _grid(rng, duration - 1)
        e = min(duration, round(s + 0.05 + _grid(rng, duration / 2), 2))
        gt = [s, e] if i else [5.5, 16.0]
        kind = rng.random()
        if i == 0:
            pred = [5.5, 12.85]                       # IoU 0.7 in lmms-eval's arithmetic
        elif kind < 0.1:
            pred = None
        else:
            pred = [_grid(rng, duration * 1.2) - (3.0 if kind < 0.15 else 0.0), _grid(rng, duration * 1.2)]
        gts.append(gt)
        preds.append(pred)
        if pred is None:
            response = "<think>hmm</think><answer>somewhere in the middle</answer>"
        else:
            response = f"<think>x</think><answer>{pred[0]!r} to {pred[1]!r}</answer>"
        records.append({"id": i, "task": "tvg", "benchmark": "charades_sta", "response": response,
                        "ground_truth": {"timestamps": gt, "duration": duration}})
    expected = lmms_tvg_aggregate(gts, preds)
    assert expected["R@0.7"] > 0 and lmms_iou([5.5, 16.0], [5.5, 12.85]) >= 0.7
    for path in ("response", "prediction"):
        if path == "prediction":
            records = [{**{k: v for k, v in r.items() if k != "response"}, "prediction": {"span": p}}
                       for r, p in zip(records, preds)]
        scored, metrics = evaluate_predictions(records)
        got = metrics["benchmarks"]["charades_sta"]
        assert {k: got[k] for k in expected} == expected, path
        assert scored[0]["iou"] >= 0.7


# ---------------------------------------------------------------------------------------------
# MVBench (lmms-eval)
# ---------------------------------------------------------------------------------------------
def lmms_mcq_acc(answer, pred):
    period_strip = re.compile(r"(?!<=\d)(\.)(?!\d)")
    comma_strip = re.compile(r"(\d)(\,)(\d)")
    punct = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

    def process_punctuation(in_text):
        out_text = in_text
        for p in punct:
            if (p + " " in in_text or " " + p in in_text) or (re.search(comma_strip, in_text) is not None):
                out_text = out_text.replace(p, "")
            else:
                out_text = out_text.replace(p, " ")
        return period_strip.sub("", out_text, re.UNICODE)

    def process(text):
        match = re.compile(r"^([A-E])\.\s*(.+)$", re.IGNORECASE).match(text.strip())
        if match:
            return match.group(1).upper()
        text = text.replace("\n", " ").replace("\t", " ").strip()
        text = process_punctuation(text)
        text = text.strip("'").strip('"').strip(")").strip("(").strip().lower()
        letter = re.search(r"\b([A-E])\b", text, re.IGNORECASE)
        return letter.group(1).upper() if letter else text

    return 1 if process(pred) == process(answer) else 0


OPTIONS = ["a red car", "the dog", "opening the door", "nothing", "two birds"]


def _mcq_answer(rng, letter):
    text = OPTIONS["ABCDE".index(letter)]
    other = rng.choice("ABCDE")
    return rng.choice([
        letter, f"({letter})", f"{letter}.", f"{letter}. {text}", f"({letter}) {text}", f"The answer is {letter}.",
        f"{letter} or {other}", f"{other} or {letter}", text, text.upper(), f"Answer: {letter.lower()}", "",
        f"I think {text}.", "none of them", f"[{letter}]", f"{letter}, because {text}", f"option {letter}!",
        f"{letter}\n{text}", "3,5 to 7", f'{{"answer": "{letter}"}}'])


def test_multiple_choice_equals_lmms_eval_on_600_responses():
    rng = random.Random(2)
    records, refs = [], []
    for i in range(N):
        answer = rng.choice("ABCDE")
        said = _mcq_answer(rng, rng.choice([answer, answer, rng.choice("ABCDE")]))
        shape = rng.random()
        if shape < 0.6:
            response, read = f"<think>let me see, a clip</think><answer>{said}</answer>", said.strip()
        elif shape < 0.9:
            response, read = said, said      # no answer block: lmms-eval reads the whole response
        else:
            response, read = "", ""
        records.append({"id": i, "task": "mcq", "benchmark": "mvbench", "response": response,
                        "ground_truth": {"answer": answer, "options": OPTIONS}})
        refs.append((answer, read, response))
    correct = [lmms_mcq_acc(answer, read) for answer, read, _ in refs]
    answered = [response != "" for _, _, response in refs]
    expected_nonempty = 100 * sum(c for c, a in zip(correct, answered) if a) / sum(answered)
    expected_all = 100 * sum(correct) / len(correct)
    scored, metrics = evaluate_predictions(records)
    got = metrics["benchmarks"]["mvbench"]
    assert got["accuracy_nonempty"] == expected_nonempty
    assert got["accuracy"] == expected_all
    assert [s["correct"] for s in scored] == [bool(c) for c in correct]
    assert got["accuracy_lenient"] != got["accuracy"]   # the two readings do differ on this battery
    # "A or B" is read as lmms-eval reads it: the first letter.
    a_or_b = [s for s, (_, read, _) in zip(scored, refs) if re.fullmatch(r"[A-E] or [A-E]", read)]
    assert a_or_b and all(s["correct"] == (s["ground_truth"]["answer"] == s["response"].split("<answer>")[1][0])
                          for s in a_or_b if "<answer>" in s["response"])


# ---------------------------------------------------------------------------------------------
# NExT-GQA (eval_ground.py)
# ---------------------------------------------------------------------------------------------
def next_gqa_tiou(loc, span):
    if span[0] == span[-1]:
        if loc[0] <= span[0] and span[0] <= loc[1]:
            return 0, 1
        return 0, 0
    span_u = (min(loc[0], span[0]), max(loc[-1], span[-1]))
    span_i = (max(loc[0], span[0]), min(loc[-1], span[-1]))
    dis_i = span_i[1] - span_i[0]
    iou = dis_i / (span_u[1] - span_u[0]) if span_u[1] > span_u[0] else 0.0
    iop = dis_i / (span[-1] - span[0]) if span[-1] > span[0] else 0.0
    return iou, iop


def next_gqa_eval_ground(gt_ground, pred_ground, pred_qa):
    miou = miop = 0
    cnt = cqt = crt3 = crt5 = crtp3 = crtp5 = 0
    for vid, anno in gt_ground.items():
        for qid, locs in anno["location"].items():
            key = f"{vid}_{qid}"
            if key not in pred_ground:
                continue
            max_iou, max_iop = 0, 0
            for loc in locs:
                iou, iop = next_gqa_tiou(loc, pred_ground[key])
                max_iou = iou if iou > max_iou else max_iou
                max_iop = iop if iop > max_iop else max_iop
            if max_iop >= 0.3:
                crtp3 += 1
                if max_iop >= 0.5:
                    crtp5 += 1
                    if pred_qa[key]["answer"] == pred_qa[key]["prediction"]:
                        cqt += 1
            if max_iou >= 0.3:
                crt3 += 1
                if max_iou >= 0.5:
                    crt5 += 1
            cnt += 1
            miou += max_iou
            miop += max_iop
    return {"Acc@GQA": cqt * 1.0 / cnt * 100, "mIoP": miop / cnt * 100, "IoP@0.3": crtp3 * 1.0 / cnt * 100,
            "IoP@0.5": crtp5 * 1.0 / cnt * 100, "mIoU": miou / cnt * 100, "IoU@0.3": crt3 * 1.0 / cnt * 100,
            "IoU@0.5": crt5 * 1.0 / cnt * 100}


def test_grounded_qa_equals_next_gqa_on_600_questions():
    rng = random.Random(3)
    records, gt_ground, pred_ground, pred_qa = [], {}, {}, {}
    n_correct = 0
    for i in range(N):
        vid, qid = str(1000 + i // 3), str(i % 3)
        duration = rng.choice([20.0, 34.0, 61.5])
        locs = []
        for _ in range(rng.choice([1, 1, 2, 3])):
            s = round(rng.uniform(0, duration - 2), 1)
            locs.append([s, round(min(duration, s + rng.uniform(0.5, 10)), 1)])
        gt_ground.setdefault(vid, {"duration": duration, "location": {}})["location"][qid] = locs
        answer = rng.choice("ABCDE")
        said = rng.choice([answer, answer, rng.choice("ABCDE")])
        kind = rng.random()
        if kind < 0.15:
            body, span = f"({said})", None                                   # no span
        elif kind < 0.22:
            p = round(rng.uniform(0, duration), 1)
            body, span = f"({said}) {p} to {p}", [p, p]                      # a point
        else:
            a, b = round(rng.uniform(-1, duration), 1), round(rng.uniform(0, duration + 3), 1)
            body, span = f"({said}) {a} to {b}", sorted([a, b])             # reversed pairs are swapped
        if span is not None:
            pred_ground[f"{vid}_{qid}"] = span
        pred_qa[f"{vid}_{qid}"] = {"answer": answer, "prediction": said}
        n_correct += said == answer
        records.append({"id": f"{vid}_{qid}", "task": "gqa", "benchmark": "nextgqa",
                        "response": f"<think>t</think><answer>{body}</answer>",
                        "ground_truth": {"answer": answer, "options": OPTIONS, "timestamps": locs[0],
                                         "duration": duration, "meta": {"spans": locs}}})
    expected = next_gqa_eval_ground(gt_ground, pred_ground, pred_qa)
    expected["Acc@QA"] = n_correct / N * 100
    _, metrics = evaluate_predictions(records)
    got = metrics["benchmarks"]["nextgqa"]
    assert {k: got[k] for k in expected} == expected
    assert got["n_no_span"] == N - len(pred_ground) > 0
