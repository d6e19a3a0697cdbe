"""The blind baseline of the eval report equals a brute-force search over constant answers."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from megavrl.eval import evaluate_predictions, metrics_markdown
from megavrl.eval.metrics import task_metrics
from megavrl.eval.predictions import score_predictions


def _split(seed: int, n: int, step: float | None):
    """n videos of 8 s: a tvg row, an mcq row and a gqa row each (gqa with 1 or 2 segments)."""
    rng = np.random.default_rng(seed)

    def span():
        length = rng.uniform(0.4, 2.5)
        start = rng.uniform(0, 8 - length)
        s, e = start, start + length
        return [round(s / step) * step, max(round(e / step), round(s / step) + 1) * step] if step else [s, e]

    rows = []
    for i in range(n):
        rows.append({"id": f"t{i}", "task": "tvg", "benchmark": "tvg", "response": "",
                     "ground_truth": {"timestamps": span(), "duration": 8.0}})
        rows.append({"id": f"m{i}", "task": "mcq", "benchmark": "mcq", "response": "",
                     "ground_truth": {"options": list("wxyz"), "answer": "ABCD"[int(rng.integers(4))]}})
        segments = [span() for _ in range(1 + int(rng.integers(2)))]
        rows.append({"id": f"g{i}", "task": "gqa", "benchmark": "gqa", "response": "",
                     "ground_truth": {"options": list("wxyz"), "answer": "ABCD"[int(rng.integers(4))],
                                      "timestamps": segments[0], "meta": {"spans": segments}}})
    return rows


def _brute_force(rows, task: str, spans, letters):
    """Every metric's best value over the constant answers (span, letter), by the report's own scoring."""
    best: dict[str, float] = {}
    answers = itertools.product(spans or [None], letters or [None])
    for span, letter in answers:
        records = [{"id": r["id"], "task": task, "ground_truth": r["ground_truth"],
                    "prediction": {"span": list(span) if span else None, "choice": letter}}
                   for r in rows if r["task"] == task]
        for key, value in task_metrics(task, score_predictions(records)).items():
            if key != "n_no_span" and value is not None:
                best[key] = max(best.get(key, value), value)
    return best


def _spans(step: float, points: bool):
    grid = np.round(np.arange(0.0, 8.0 + 1e-9, step), 6).tolist()
    return [(a, b) for a in grid for b in grid if b > a or (points and a == b)]


@pytest.mark.parametrize("seed", [0, 1])
def test_blind_baseline_equals_a_brute_force_search_on_a_grid(seed):
    # Ground truth on a 0.5 s grid; the brute force tries every span (and point) on a 0.25 s grid,
    # which holds every ground-truth boundary and the points between them.
    rows = _split(seed, n=6, step=0.5)
    _, metrics = evaluate_predictions(rows)
    bench = metrics["benchmarks"]
    assert bench["mcq"]["blind_baseline"] == _brute_force(rows, "mcq", None, list("ABCD"))
    tvg = _brute_force(rows, "tvg", _spans(0.25, points=False), None)
    blind = bench["tvg"]["blind_baseline"]
    assert blind["mIoU"] == pytest.approx(tvg["mIoU"], abs=1e-9)  # exact (see megavrl.eval.blind)
    for t in ("R@0.3", "R@0.5", "R@0.7"):
        assert blind[t] <= tvg[t] + 1e-9  # a lower bound (a threshold count can peak between boundaries)
    gqa = _brute_force(rows, "gqa", _spans(0.25, points=True), list("ABCD"))
    for key, value in bench["gqa"]["blind_baseline"].items():
        if key in ("Acc@QA", "Acc@GQA", "mIoU", "mIoP", "IoP@0.5"):  # exact (see megavrl.eval.blind)
            assert value == pytest.approx(gqa[key], abs=1e-9), key
        else:  # threshold counts: the boundary search is a lower bound
            assert value <= gqa[key] + 1e-9, key
    assert bench["gqa"]["blind_exact"] and bench["tvg"]["blind_exact"]
    # The constant answer reported for the primary metric scores it.
    a, b = (float(x) for x in bench["tvg"]["blind_answer"].split(" to "))
    again = task_metrics("tvg", score_predictions([{"id": r["id"], "task": "tvg", "ground_truth": r["ground_truth"],
                                                    "prediction": {"span": [a, b]}}
                                                   for r in rows if r["task"] == "tvg"]))
    assert again["mIoU"] == pytest.approx(blind["mIoU"])
    md = metrics_markdown(metrics)
    assert f"| tvg | tvg | 6 | 6 | 0 | mIoU | 0.00 | 0.00 | {blind['mIoU']:.2f} | {bench['tvg']['blind_answer']} |" in md
    assert "| tvg (blind: constant answer) | 6 |" in md


def test_blind_mIoU_is_not_beaten_between_boundaries():
    # Boundaries anywhere (not on the search grid): no span of a fine grid beats the boundary search.
    rows = [r for r in _split(3, n=5, step=None) if r["task"] == "tvg"]
    _, metrics = evaluate_predictions(rows)
    blind = metrics["benchmarks"]["tvg"]["blind_baseline"]["mIoU"]
    brute = _brute_force(rows, "tvg", _spans(0.1, points=False), None)["mIoU"]
    assert brute <= blind + 1e-9
    assert blind - brute < 3.0  # the grid comes within 0.05 s of the best boundaries


def test_blind_baseline_of_a_quantile_grid_is_marked_a_lower_bound(monkeypatch):
    import megavrl.eval.blind as blind_module

    rows = [r for r in _split(4, n=6, step=None) if r["task"] == "tvg"]
    exact = evaluate_predictions(rows)[1]["benchmarks"]["tvg"]
    monkeypatch.setattr(blind_module, "MAX_BOUNDARIES", 5)
    coarse = evaluate_predictions(rows)[1]["benchmarks"]["tvg"]
    assert exact["blind_exact"] and not coarse["blind_exact"]
    assert coarse["blind_baseline"]["mIoU"] <= exact["blind_baseline"]["mIoU"]
    assert "lower bound" in metrics_markdown({"benchmarks": {"tvg": coarse}})


def test_console_summary_shows_the_blind_baseline_beside_each_metric():
    from megavrl.eval.summary import blind_note

    before = {"synth_val/tvg/mIoU": 3.0, "synth_val/tvg/blind/mIoU": 12.5, "rows": 8}
    after = {"synth_val/tvg/mIoU": 40.25, "synth_val/tvg/blind/mIoU": 12.5, "rows": 8}
    assert blind_note("synth_val/tvg/mIoU", before, after) == "  (blind baseline 12.50)"
    assert blind_note("rows", before, after) == ""


def test_stage_table_lists_each_run_before_after_beside_the_blind_baseline(tmp_path, capsys):
    from megavrl.eval.report import write_metrics_json
    from megavrl.eval.summary import main

    rows = _split(0, n=4, step=0.5)
    _, metrics = evaluate_predictions(rows)
    for run in ("sft", "grpo"):
        for tag in ("before", "after"):
            write_metrics_json(tmp_path / run / "eval" / tag / "metrics.json", metrics)
    assert main([f"SFT={tmp_path / 'sft'}", f"GRPO={tmp_path / 'grpo'}", f"X={tmp_path / 'missing'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    change = ["change", "[95%", "CI]"]
    assert lines[0].split() == ["benchmark", "metric", "blind", "SFT", "before", "->", "after", "SFT", *change,
                                "GRPO", "before", "->", "after", "GRPO", *change, "X", "before", "->", "after",
                                "X", *change]
    blind = metrics["benchmarks"]["tvg"]["blind_baseline"]["mIoU"]
    # No predictions.jsonl: no change; no report: "-" everywhere.
    assert lines[1].split() == ["tvg", "mIoU", f"{blind:.2f}", "0.00", "->", "0.00", "-", "0.00", "->", "0.00", "-",
                                "-", "->", "-", "-"]
    assert [line.split()[:2] for line in lines[2:5]] == [["mcq", "accuracy"], ["gqa", "Acc@GQA"]] + [["change:", "after"]]


def test_stage_table_shows_the_change_and_its_interval_from_the_predictions(tmp_path, capsys):
    from megavrl.eval.paired import paired_changes
    from megavrl.eval.report import write_report
    from megavrl.eval.summary import main

    rows = [r for r in _split(1, n=40, step=0.5) if r["task"] == "tvg"]
    answered = [dict(r, response="<think>x</think><answer>{} to {}</answer>".format(*r["ground_truth"]["timestamps"]))
                if i % 4 else r for i, r in enumerate(rows)]  # 30 of 40 answered exactly
    scored = {}
    for tag, records in (("before", rows), ("after", answered)):
        scored[tag], metrics = evaluate_predictions(records)
        write_report(tmp_path / "sft" / "eval" / tag, scored[tag], metrics)
    assert main([f"SFT={tmp_path / 'sft'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    (expected,) = paired_changes(scored["before"], scored["after"])
    assert expected.delta == pytest.approx(75.0) and expected.beyond_noise
    assert lines[1].split()[3:] == ["0.00", "->", "75.00", *expected.describe().split(), "*"]
