"""Writing evaluation results: predictions (JSONL), metrics (JSON) and a Markdown table.

Files are written atomically (a temporary file in the same directory, then ``os.replace``), so
an interrupted run never leaves a half-written report behind.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

from megavrl.eval.metrics import PRIMARY_METRIC, TASK_COUNTS, TASK_METRICS, TASK_TITLES
from megavrl.log import get_logger

logger = get_logger(__name__)

PathLike = Union[str, os.PathLike]

PREDICTIONS_FILE = "predictions.jsonl"
METRICS_FILE = "metrics.json"
MARKDOWN_FILE = "metrics.md"


def _write_atomic(path: PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its 0600 would stay on the report; open() follows the umask.
    tmp = path.parent / f".{path.name}.{os.getpid()}-{time.time_ns()}.tmp"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_predictions_jsonl(path: PathLike, records: Iterable[Mapping[str, Any]]) -> Path:
    """One JSON object per line (UTF-8, spans as lists); returns the path."""
    lines = [json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n" for record in records]
    return _write_atomic(path, "".join(lines))


def read_predictions_jsonl(path: PathLike) -> list[dict[str, Any]]:
    """The records of a predictions file; a malformed line is reported and skipped, with a count."""
    records, bad = [], []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                records.append(record)
            else:
                bad.append(number)
    if bad:
        logger.warning("%s: %d malformed line(s) skipped (not a JSON object): lines %s",
                       path, len(bad), ", ".join(map(str, bad[:20])) + (" ..." if len(bad) > 20 else ""))
    return records


def write_metrics_json(path: PathLike, metrics: Mapping[str, Any]) -> Path:
    """The metrics dict as indented JSON (``None`` as ``null``; NaN is refused); returns the path."""
    return _write_atomic(path, json.dumps(metrics, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def metrics_markdown(metrics: Mapping[str, Any], digits: int = 2, title: str = "Evaluation") -> str:
    """A Markdown report: a summary table (one row per benchmark), then one table per task.

    Percentages are shown with ``digits`` decimals; a metric of an empty benchmark shows "n/a".
    """
    benchmarks: Mapping[str, Mapping[str, Any]] = metrics.get("benchmarks", {})
    overall: Mapping[str, Any] = metrics.get("overall", {})
    lines = [f"## {title}", ""]
    run = metrics.get("run")
    if run:
        step = run.get("checkpoint_step")
        scored = f"{run.get('rows_scored')} of {run.get('val_rows')} val rows scored"
        if run.get("max_samples") is not None and run.get("rows_scored") != run.get("val_rows"):
            scored += f" (eval.max_samples={run['max_samples']})"
        lines += [f"Model: `{run.get('model')}`" + (f", checkpoint step {step}" if step is not None else "")
                  + f"; {scored}.", ""]
    lines += ["| benchmark | task | n | parse failures | invalid | primary metric | value | stderr | blind baseline "
              "| blind answer |",
              "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for name, entry in benchmarks.items():
        primary = entry.get("primary_metric")
        blind = entry.get("blind_baseline") or {}
        stderr = entry.get("stderr") or {}
        lines.append("| " + " | ".join(_cell(v, digits) for v in (
            name, entry.get("task"), entry.get("n"), entry.get("n_parse_failures"), entry.get("n_invalid"),
            primary, entry.get(primary) if primary else None, stderr.get(primary) if primary else None,
            blind.get(primary) if primary else None, entry.get("blind_answer"))) + " |")
    lines += ["", f"Overall (unweighted mean of the primary metrics of {overall.get('n_benchmarks', 0)} "
              f"non-empty benchmarks): **{_cell(overall.get('mean_primary'), digits)}**"]
    for task, names in TASK_METRICS.items():
        rows = [(name, entry) for name, entry in benchmarks.items() if entry.get("task") == task]
        if not rows:
            continue
        columns = ("n",) + TASK_COUNTS.get(task, ()) + names + ("format_rate",)
        lines += ["", f"### {TASK_TITLES[task]} ({task}; primary: {PRIMARY_METRIC[task]})", "",
                  "| benchmark | " + " | ".join(columns) + " |",
                  "| --- | " + " | ".join("---:" for _ in columns) + " |"]
        for name, entry in rows:
            lines.append("| " + " | ".join([_cell(name, digits)] + [_cell(entry.get(c), digits) for c in columns]) + " |")
            stderr = entry.get("stderr")
            if stderr:
                lines.append("| " + " | ".join([_cell(f"{name} (stderr)", digits)]
                                               + [_cell(stderr.get(c), digits) if c in stderr else "" for c in columns])
                             + " |")
            blind = entry.get("blind_baseline")
            if blind:
                bound = "" if entry.get("blind_exact", True) else ", lower bound"
                lines.append("| " + " | ".join([_cell(f"{name} (blind: constant answer{bound})", digits)]
                                               + [_cell(entry.get("n") if c == "n" else blind.get(c), digits)
                                                  if c in blind or c == "n" else "" for c in columns]) + " |")
    lines.append("")
    lines.append("All values are percentages; parse failures count as 0 (IoU 0, wrong answer); invalid rows "
                 "(unusable ground truth) are left out. Grounded QA follows NExT-GQA's eval_ground.py: its IoU/IoP "
                 "metrics and Acc@GQA are over the questions with a predicted span (n - n_no_span). stderr is "
                 "lmms-eval's standard error of a mean (the sample standard deviation of the rows' values over "
                 "the square root of their count): the row-sampling error of this evaluation. The blind "
                 "baseline of a metric is the best value a constant answer (the same for every question, chosen "
                 "knowing the ground truth) gets on it; the blind answer is the one for the primary metric "
                 "(megavrl.eval.blind). A model at or below it shows nothing learned from the videos.")
    return "\n".join(lines) + "\n"


def write_metrics_markdown(path: PathLike, metrics: Mapping[str, Any], digits: int = 2) -> Path:
    """``metrics_markdown`` written to ``path``; returns the path."""
    return _write_atomic(path, metrics_markdown(metrics, digits))


def headline_keys(flat: Mapping[str, Any]) -> list[str]:
    """The keys of flat metrics (``<benchmark>/<metric>``) worth a console line: the overall score,
    the rows scored, and each benchmark's primary metric and parse failures."""
    keys = [k for k in ("overall/mean_primary", "rows") if k in flat]
    for key in flat:
        benchmark, _, metric = key.rpartition("/")
        task = benchmark.rpartition("/")[2]
        if task in PRIMARY_METRIC and metric in (PRIMARY_METRIC[task], "n_parse_failures"):
            keys.append(key)
    return keys


def write_report(out_dir: PathLike, scored: Iterable[Mapping[str, Any]], metrics: Mapping[str, Any],
                 prefix: Optional[str] = None) -> dict[str, Path]:
    """Write predictions.jsonl, metrics.json and metrics.md into ``out_dir`` (optionally prefixed,
    e.g. ``step_100_``); returns {"predictions", "metrics", "markdown"} -> path."""
    out = Path(out_dir)
    head = prefix or ""
    return {
        "predictions": write_predictions_jsonl(out / f"{head}{PREDICTIONS_FILE}", scored),
        "metrics": write_metrics_json(out / f"{head}{METRICS_FILE}", metrics),
        "markdown": write_metrics_markdown(out / f"{head}{MARKDOWN_FILE}", metrics),
    }
