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


def run_eval(engine, cfg, builder, out_dir: str | Path, batch_size: int = 64, *,
             model: str | None = None, step: int | None = None) -> dict:
    """Evaluate ``engine`` on ``cfg.data.val``; returns flat metrics (``<benchmark>/<metric>``).

    Writes predictions.jsonl, metrics.json and metrics.md into ``out_dir``. Rows whose video
    cannot be decoded are skipped and counted by the dataset (reported in its summary line).
    model, step: what the engine serves (default: model.megatron_ckpt, else model.hf_dir; the step
    when known), stated in the report with the number of val rows scored.
    """
    from tqdm import tqdm

    from megavrl.console import fmt
    from megavrl.data.datasets import VideoTaskDataset
    from megavrl.eval.metrics import flatten_metrics
    from megavrl.eval.predictions import evaluate_predictions, prediction_record
    from megavrl.eval.report import write_report
    from megavrl.rl.experience import rollout_prompt

    t0 = time.perf_counter()
    dataset = VideoTaskDataset(cfg.data, builder=builder, split="val", epochs=1)
    limit = cfg.eval.max_samples
    total = len(dataset) if limit is None else min(limit, len(dataset))
    max_new = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens
    records, batch = [], []
    bar = tqdm(total=total, desc="eval", unit="row", mininterval=2.0)

    def flush():
        groups = engine.generate([rollout_prompt(p, i) for i, p in enumerate(batch)], n=1,
                                 temperature=cfg.eval.temperature, max_new_tokens=max_new)
        for p, g in zip(batch, groups):
            records.append(prediction_record(p.sample, g.samples[0].text if g.samples else "",
                                             benchmark=benchmark_name(p.sample)))
        bar.update(len(batch))
        batch.clear()

    for prepared in dataset:
        batch.append(prepared)
        if len(batch) == batch_size or len(records) + len(batch) == total:
            flush()
        if len(records) >= total:
            break
    if batch:
        flush()
    bar.close()
    scored, metrics = evaluate_predictions(records, cfg.reward)
    metrics["run"] = {"model": str(model or cfg.model.megatron_ckpt or cfg.model.hf_dir), "checkpoint_step": step,
                      "rows_scored": len(records), "val_rows": len(dataset), "max_samples": limit}
    paths = write_report(out_dir, scored, metrics)
    flat = flatten_metrics(metrics, prefix="")
    flat = {k.lstrip("/"): v for k, v in flat.items()}
    flat["rows"] = len(records)
    flat["seconds"] = time.perf_counter() - t0
    log.info("eval: %d rows in %.1f s, overall %s; report in %s", len(records), flat["seconds"],
             fmt(metrics.get("overall", {}).get("mean_primary")), paths["markdown"])
    return flat
