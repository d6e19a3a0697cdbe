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
    t0 = time.perf_counter()
    records, val_rows = predict(engine, cfg, builder, batch_size=batch_size)
    return report(records, cfg, out_dir, seconds=time.perf_counter() - t0, model=model, step=step, val_rows=val_rows)


def predict(engine, cfg, builder, shard: int = 0, shards: int = 1, batch_size: int = 64) -> tuple[list[dict], int]:
    """Prediction records of data.val rows ``shard, shard + shards, ...`` (of the first
    ``eval.max_samples``), decoded greedily (``eval.temperature``) by ``engine``, and the number of
    data.val rows. The shards of several engines, interleaved
    (:func:`megavrl.rl.placement.interleave`), give one engine's records."""
    from megavrl.data.datasets import VideoTaskDataset
    from megavrl.data.schema import EmptyDatasetError
    from megavrl.eval.predictions import prediction_record
    from megavrl.rollout.batched import rollout_batches

    try:
        dataset = VideoTaskDataset(cfg.data, builder=builder, split="val", epochs=1, rank=shard, world_size=shards)
    except EmptyDatasetError:
        if shards == 1:
            raise
        return [], 0  # fewer rows than engines: this one has none
    val_rows = len(dataset.epoch_order(0))
    limit = cfg.eval.max_samples
    total = len(range(shard, val_rows if limit is None else min(limit, val_rows), shards))
    desc = "eval" if shards == 1 else f"eval (shard {shard + 1} of {shards})"
    records = []
    for batch, groups in rollout_batches(engine, dataset, total=total, desc=desc, batch_size=batch_size, n=1,
                                         temperature=cfg.eval.temperature,
                                         max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens):
        for p, g in zip(batch, groups):
            records.append(prediction_record(p.sample, g.samples[0].text if g.samples else "",
                                             benchmark=benchmark_name(p.sample)))
    return records, val_rows


def report(records: list[dict], cfg, out_dir: str | Path, seconds: float, *, model: str | None = None,
           step: int | None = None, val_rows: int | None = None) -> dict:
    """Score prediction records, write predictions.jsonl, metrics.json and metrics.md into
    ``out_dir``; return flat metrics (``<benchmark>/<metric>``, ``rows``, ``seconds``)."""
    from megavrl.console import fmt
    from megavrl.eval.metrics import flatten_metrics
    from megavrl.eval.predictions import evaluate_predictions
    from megavrl.eval.report import write_report

    scored, metrics = evaluate_predictions(records, cfg.reward)
    metrics["run"] = {"model": str(model or cfg.model.megatron_ckpt or cfg.model.hf_dir), "checkpoint_step": step,
                      "rows_scored": len(records), "val_rows": val_rows, "max_samples": cfg.eval.max_samples}
    paths = write_report(out_dir, scored, metrics)
    flat = flatten_metrics(metrics, prefix="")
    flat = {k.lstrip("/"): v for k, v in flat.items()}
    flat["rows"] = len(records)
    flat["seconds"] = seconds
    log.info("eval: %d rows in %.1f s, overall %s; report in %s", len(records), flat["seconds"],
             fmt(metrics.get("overall", {}).get("mean_primary")), paths["markdown"])
    return flat
