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
    t0 = time.perf_counter()
    records = predict(engine, cfg, builder, batch_size=batch_size)
    return report(records, cfg, out_dir, seconds=time.perf_counter() - t0)


def predict(engine, cfg, builder, shard: int = 0, shards: int = 1, batch_size: int = 64) -> list[dict]:
    """Prediction records of data.val rows ``shard, shard + shards, ...`` (of the first
    ``eval.max_samples``), decoded greedily (``eval.temperature``) by ``engine``. The shards of
    several engines, interleaved (:func:`megavrl.rl.placement.interleave`), give one engine's records."""
    from megavrl.data.datasets import VideoTaskDataset
    from megavrl.eval.predictions import prediction_record
    from megavrl.rollout.batched import rollout_batches

    from megavrl.data.schema import EmptyDatasetError

    try:
        dataset = VideoTaskDataset(cfg.data, builder=builder, split="val", epochs=1, rank=shard, world_size=shards)
    except EmptyDatasetError:
        if shards == 1:
            raise
        return []  # fewer rows than engines: this one has none
    limit = cfg.eval.max_samples
    rows = len(dataset.epoch_order(0)) if limit is None else min(limit, len(dataset.epoch_order(0)))
    total = len(range(shard, rows, shards))
    desc = "eval" if shards == 1 else f"eval (shard {shard + 1} of {shards})"
    records = []
    for batch, groups in rollout_batches(engine, dataset, total=total, desc=desc, batch_size=batch_size, n=1,
                                         temperature=cfg.eval.temperature,
                                         max_new_tokens=cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens):
        for p, g in zip(batch, groups):
            records.append(prediction_record(p.sample, g.samples[0].text if g.samples else "",
                                             benchmark=benchmark_name(p.sample)))
    return records


def report(records: list[dict], cfg, out_dir: str | Path, seconds: float) -> dict:
    """Score prediction records, write predictions.jsonl, metrics.json and metrics.md into
    ``out_dir``; return flat metrics (``<benchmark>/<metric>``, ``rows``, ``seconds``)."""
    from megavrl.eval.metrics import flatten_metrics
    from megavrl.eval.predictions import evaluate_predictions
    from megavrl.eval.report import write_report

    scored, metrics = evaluate_predictions(records, cfg.reward)
    paths = write_report(out_dir, scored, metrics)
    flat = flatten_metrics(metrics, prefix="")
    flat = {k.lstrip("/"): v for k, v in flat.items()}
    flat["rows"] = len(records)
    flat["seconds"] = seconds
    log.info("eval: %d rows in %.1f s, overall %s; report in %s", len(records), flat["seconds"],
             metrics.get("overall", {}).get("mean_primary"), paths["markdown"])
    return flat
