"""Console summaries of evaluations: each metric before -> after training, beside its blind baseline,
with the change's paired-bootstrap interval (``megavrl.eval.paired``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from megavrl.eval.metrics import BLIND_KEY
from megavrl.eval.paired import DEFAULT_RESAMPLES, PairedChange, paired_changes
from megavrl.eval.report import read_predictions_jsonl


def _number(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def blind_note(key: str, before: Mapping[str, object], after: Mapping[str, object]) -> str:
    """``"  (blind baseline X)"`` for the flat metric ``<benchmark>/<metric>`` when the flat eval
    results hold its ``<benchmark>/blind/<metric>``, else ``""``. The baseline depends on the
    ground truth only, so the before and after evaluations give the same one."""
    head, _, metric = key.rpartition("/")
    blind_key = f"{head}/{BLIND_KEY}/{metric}"
    blind = after.get(blind_key, before.get(blind_key))
    return f"  (blind baseline {_number(blind)})" if isinstance(blind, (int, float)) else ""


def _load(path: Path) -> Mapping[str, Any]:
    import json

    with open(path, encoding="utf-8") as f:
        return json.load(f)


def stage_changes(run: Path, resamples: int = DEFAULT_RESAMPLES) -> dict[str, PairedChange]:
    """Benchmark -> the paired change of its primary metric from ``run``'s ``eval/before`` to its
    ``eval/after`` predictions; empty when either ``predictions.jsonl`` is missing."""
    paths = [Path(run) / "eval" / tag / "predictions.jsonl" for tag in ("before", "after")]
    if not all(p.exists() for p in paths):
        return {}
    before, after = (read_predictions_jsonl(p) for p in paths)
    return {c.benchmark: c for c in paired_changes(before, after, resamples=resamples)}


def stage_table(stages: Sequence[tuple[str, Path]], resamples: int = DEFAULT_RESAMPLES) -> str:
    """A table of each benchmark's primary metric, before -> after each training stage, beside its
    blind baseline, and the change with its 95% paired-bootstrap interval.

    ``stages``: (name, run output directory) in order; each directory holds ``eval/before`` and
    ``eval/after`` reports (``metrics.json``, ``predictions.jsonl``), as ``megavrl train`` writes
    them. A stage whose report is missing shows "-"; without predictions its change shows "-".
    A change whose interval excludes 0 is marked ``*``.
    """
    reports = []
    for name, run in stages:
        pair = []
        for tag in ("before", "after"):
            path = Path(run) / "eval" / tag / "metrics.json"
            pair.append(_load(path).get("benchmarks", {}) if path.exists() else {})
        reports.append((name, pair, stage_changes(run, resamples)))
    names: list[str] = []
    for _, pair, _ in reports:
        for benchmarks in pair:
            names += [n for n in benchmarks if n not in names]
    header = ["benchmark", "metric", "blind"]
    for name, _, _ in reports:
        header += [f"{name} before -> after", f"{name} change [95% CI]"]
    rows = []
    for bench in names:
        entry = next((b[bench] for _, pair, _ in reports for b in pair if bench in b), {})
        metric = entry.get("primary_metric")
        if not metric:
            continue
        blind = next((b[bench].get("blind_baseline", {}).get(metric) for _, pair, _ in reports for b in pair
                      if bench in b and b[bench].get("blind_baseline")), None)
        cells = [bench, metric, _number(blind)]
        for _, (before, after), changes in reports:
            cells.append(f"{_number(before.get(bench, {}).get(metric))} -> {_number(after.get(bench, {}).get(metric))}")
            change = changes.get(bench)
            cells.append("-" if change is None else change.describe() + (" *" if change.beyond_noise else ""))
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


CHANGE_NOTE = ("change: after - before on the rows scored in both evaluations, with its 95% paired-bootstrap "
               "interval over the rows (* = the interval excludes 0). It measures which rows were held out, not "
               "run-to-run variation: a rerun with another seed can differ by more.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m megavrl.eval.summary NAME=RUN_DIR ...``: print ``stage_table`` of those runs."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m megavrl.eval.summary",
        description="Print each benchmark's primary metric before -> after each training run, beside its blind "
                    "baseline (the best constant answer), from the runs' eval/{before,after}/metrics.json.")
    parser.add_argument("runs", nargs="+", metavar="NAME=RUN_DIR", help="e.g. SFT=runs/demo/sft GRPO=runs/demo/grpo")
    args = parser.parse_args(argv)
    stages = []
    for item in args.runs:
        name, sep, run = item.partition("=")
        if not sep or not name or not run:
            parser.error(f"{item!r} is not NAME=RUN_DIR")
        stages.append((name, Path(run)))
    print(stage_table(stages))
    print(CHANGE_NOTE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
