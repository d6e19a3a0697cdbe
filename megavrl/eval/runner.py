"""Evaluation with the vLLM engine: decode data.val, score, write predictions/metrics/report.

Used by ``megavrl eval`` and by the trainer (before, during and after training). Greedy by
default (``eval.temperature=0``), one response per row.
"""
from __future__ import annotations

import time
from pathlib import Path

from megavrl.log import get_logger

log = get_logger(__name__)


def benchmark_name(sample) -> str:
    """A dataset can mix tasks (the synthetic one does); metrics are per dataset and task."""
    return f"{sample.dataset}/{sample.task}" if sample.dataset else sample.task


def run_eval(engine, cfg, builder, out_dir: str | Path, batch_size: int = 64) -> dict:
    """Evaluate ``engine`` on ``cfg.data.val``; returns flat metrics (``<benchmark>/<metric>``).

    Writes predictions.jsonl, metrics.json and metrics.md into ``out_dir``. Rows whose video
    cannot be decoded are skipped and counted by the dataset (reported in its summary line).
    """
    from megavrl.data.datasets import VideoTaskDataset
    from megavrl.eval.metrics import flatten_metrics
    from megavrl.eval.predictions import evaluate_predictions, prediction_record
    from megavrl.eval.report import write_report
    from megavrl.rollout.batched import rollout_batches

    t0 = time.perf_counter()
    dataset = VideoTaskDataset(cfg.data, builder=builder, split="val", epochs=1)
    limit = cfg.eval.max_samples
    total = len(dataset) if limit is None else min(limit, len(dataset))
    records = []
    for batch, groups in rollout_batches(engine, dataset, total=total, desc="eval", batch_size=batch_size, n=1,
                                         temperature=cfg.eval.temperature,
                                         max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens):
        for p, g in zip(batch, groups):
            records.append(prediction_record(p.sample, g.samples[0].text if g.samples else "",
                                             benchmark=benchmark_name(p.sample)))
    scored, metrics = evaluate_predictions(records, cfg.reward)
    paths = write_report(out_dir, scored, metrics)
    flat = flatten_metrics(metrics, prefix="")
    flat = {k.lstrip("/"): v for k, v in flat.items()}
    flat["rows"] = len(records)
    flat["seconds"] = time.perf_counter() - t0
    log.info("eval: %d rows in %.1f s, overall %s; report in %s", len(records), flat["seconds"],
             metrics.get("overall", {}).get("mean_primary"), paths["markdown"])
    return flat
