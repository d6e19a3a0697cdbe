"""``megavrl select``: variance-aware data selection by repeated inference (Li et al., 2025).

Every training row is rolled out ``selection.k`` times with the current policy, each rollout is
scored with the training reward, and :func:`megavrl.rl.selection.select_by_reward_variance` keeps
the rows whose rewards vary. Writes, into the output directory:

- ``selected.jsonl``: the kept rows (megavrl format, absolute video paths);
- ``data.yaml``: a config layer that trains on them (``--config base.yaml --config DIR/data.yaml``);
- ``stats.jsonl``: per-row reward mean and variance; ``summary.json``; ``variance_hist.png``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from megavrl.log import get_logger

log = get_logger(__name__)


def run_selection(engine, cfg, builder, out: str | Path):
    """Roll out every ``data.train`` row ``selection.k`` times on ``engine``, select, write ``out``."""
    rows, rewards = roll_out_rows(engine, cfg, builder)
    return select_and_write(rows, rewards, cfg, out)


def roll_out_rows(engine, cfg, builder, shard: int = 0, shards: int = 1) -> tuple[list[dict], list[list]]:
    """``(rows, rewards)`` of data.train rows ``shard, shard + shards, ...``: each row (megavrl
    format, absolute video path) and the RewardResults of its ``selection.k`` rollouts. Row i of
    the data order samples with the seed ``sampling_seed(selection.seed, i)`` whatever the shard,
    so several engines' shards, interleaved, give one engine's result."""
    from megavrl.data.datasets import VideoTaskDataset
    from megavrl.data.schema import EmptyDatasetError
    from megavrl.rl.experience import score_groups
    from megavrl.rollout.batched import rollout_batches

    k = cfg.selection.k
    try:
        dataset = VideoTaskDataset(cfg.data, builder=builder, split="train", epochs=1, drop_last=False,
                                   rank=shard, world_size=shards)
    except EmptyDatasetError:
        if shards == 1:
            raise
        return [], []  # fewer rows than engines: this one has none
    desc = f"select: {k} rollouts per row" + (f" (shard {shard + 1} of {shards})" if shards > 1 else "")
    rows, rewards = [], []
    for batch, groups in rollout_batches(engine, dataset, total=len(dataset), desc=desc, seed=cfg.selection.seed,
                                         index_of=lambda j: j * shards + shard, n=k):
        for p, scored in zip(batch, score_groups(groups, batch, cfg.reward)):
            rows.append({**p.sample.to_row(), "video": os.path.abspath(p.sample.video_path)})
            rewards.append(scored)
    return rows, rewards


def select_and_write(rows: list[dict], rewards: list[list], cfg, out: str | Path):
    """Keep the rows whose rewards vary (``selection.*``), write the outputs into ``out``."""
    from megavrl.rl.selection import select_by_reward_variance

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = select_by_reward_variance(rows, {row["id"]: r for row, r in zip(rows, rewards)},
                                       **cfg.selection.select_kwargs())
    write_selection(out, result)
    log.info("selected %d of %d rows (%d dropped with all-equal rewards) -> %s", result.summary["n_selected"],
             len(rows), result.summary.get("n_all_same_dropped", 0), out / "selected.jsonl")
    return result


def write_selection(out: Path, result) -> None:
    """selected.jsonl, data.yaml, stats.jsonl, summary.json and variance_hist.png."""
    from dataclasses import asdict

    from megavrl.rl.selection_plot import plot_variance_histogram

    (out / "selected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.selected))
    # A config layer: `--config base.yaml --config DIR/data.yaml` trains on the selection.
    (out / "data.yaml").write_text("data:\n  train:\n    - {json_path: %s, data_folder: /, format: megavrl, "
                                   "name: selected}\n" % (out / "selected.jsonl").resolve())
    (out / "stats.jsonl").write_text("".join(json.dumps(asdict(s), default=str) + "\n" for s in result.stats))
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2, default=str) + "\n")
    plot_variance_histogram(result, out / "variance_hist.png")
