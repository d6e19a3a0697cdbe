"""CLI: ``megavrl eval`` and ``megavrl select`` (variance-aware data selection).

Both run the vLLM engine in one process (no Megatron) on a Hugging Face directory, the config's
``model.hf_dir``; give a Megatron checkpoint with ``model.megatron_ckpt`` and it is converted to a
temporary HF directory first.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from megavrl.log import get_logger

log = get_logger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval", help="evaluate a model on data.val with vLLM: predictions, metrics, markdown report",
        description="Greedy (eval.temperature) decoding of every data.val row with vLLM, scored with the "
                    "training reward's parser and lmms-eval's metric definitions (tvg: mIoU, R@0.3/0.5/0.7; "
                    "mcq: accuracy; gqa: Acc@GQA, Acc@QA, mIoU, IoP). Writes predictions.jsonl, metrics.json "
                    "and metrics.md to --out (default eval.output_dir, else <trainer.output_dir>/eval).",
        epilog="example: megavrl eval --config examples/configs/tiny_cpu_tvg.yaml model.hf_dir=runs/demo/grpo/hf")
    _common(e)
    e.set_defaults(func=_eval)

    s = sub.add_parser(
        "select", help="variance-aware data selection: K rollouts per training row, keep informative rows",
        description="Roll out every data.train row selection.k times with the current policy (vLLM, "
                    "rollout.temperature), score them, and keep rows whose rewards vary (drop all-same rows, "
                    "selection.min_variance, selection.top_fraction, selection.balance_tasks). Writes "
                    "selected.jsonl (megavrl rows, absolute video paths), data.yaml (a data config for it), "
                    "stats.jsonl (per-row reward mean/variance), summary.json and variance_hist.png to --out.",
        epilog="example: megavrl select --config examples/configs/tiny_cpu_tvg.yaml --out runs/select selection.k=8")
    _common(s)
    s.set_defaults(func=_select)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="YAML config (repeatable)")
    p.add_argument("--out", default=None, help="output directory")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def _setup(args):
    """Config, an HF directory to serve, and the prompt builder."""
    from megavrl.config import ConfigError, load_config, validate
    from megavrl.data.prompt import PromptBuilder

    cfg = load_config(args.config, args.overrides)
    cfg.parallel.tp = cfg.parallel.pp = 1  # vLLM only: Megatron's layout does not apply
    validate(cfg, world_size=1)
    hf_dir = cfg.model.hf_dir
    if cfg.model.megatron_ckpt:
        from megavrl.checkpoint.convert import convert_megatron_to_hf

        hf_dir = tempfile.mkdtemp(prefix="megavrl-hf-")
        os.rmdir(hf_dir)
        convert_megatron_to_hf(cfg.model.megatron_ckpt, hf_dir, dtype="fp32")
        log.info("converted %s to %s for vLLM", cfg.model.megatron_ckpt, hf_dir)
    if args.command == "eval" and not cfg.data.val:
        raise ConfigError("data.val is empty: list the datasets to evaluate under data.val")
    if args.command == "select" and not cfg.data.train:
        raise ConfigError("data.train is empty: list the datasets to select from under data.train")
    builder = PromptBuilder.from_hf_dir(hf_dir, cfg.data.prompt)
    return cfg, hf_dir, builder


def _engine(cfg, hf_dir):
    from megavrl.rollout.engine import RolloutEngine

    return RolloutEngine(hf_dir, cfg.rollout)


def _eval(args) -> int:
    from megavrl.console import rounded
    from megavrl.eval.runner import run_eval

    cfg, hf_dir, builder = _setup(args)
    out = Path(args.out or cfg.eval.output_dir or Path(cfg.trainer.output_dir) / "eval")
    with _engine(cfg, hf_dir) as engine:
        metrics = run_eval(engine, cfg, builder, out, step=_checkpoint_step(cfg.model.megatron_ckpt))
    print(json.dumps(rounded({k: v for k, v in metrics.items() if "/" not in k or k.startswith("overall")})))
    return 0


def _checkpoint_step(ckpt: str | None) -> int | None:
    """The training step of a Megatron checkpoint (its marker file), None for an HF directory."""
    if not ckpt:
        return None
    from megavrl.checkpoint.convert import resolve_checkpoint

    marker = resolve_checkpoint(ckpt) / "megavrl_checkpoint.json"
    step = json.loads(marker.read_text()).get("step") if marker.is_file() else None
    return step if isinstance(step, int) else None


def _select(args) -> int:
    from tqdm import tqdm

    from megavrl.console import rounded
    from megavrl.data.datasets import VideoTaskDataset
    from megavrl.rl import select_by_reward_variance
    from megavrl.rl.experience import rollout_prompt, score_groups

    cfg, hf_dir, builder = _setup(args)
    out = Path(args.out or Path(cfg.trainer.output_dir) / "select")
    out.mkdir(parents=True, exist_ok=True)
    k = cfg.selection.k
    dataset = VideoTaskDataset(cfg.data, builder=builder, split="train", epochs=1, drop_last=False)
    rows, table, batch = [], {}, []
    bar = tqdm(total=len(dataset), desc=f"select: {k} rollouts per row", unit="row", mininterval=2.0)
    with _engine(cfg, hf_dir) as engine:
        def flush():
            groups = engine.generate([rollout_prompt(p, i) for i, p in enumerate(batch)], n=k,
                                     seed=cfg.selection.seed * 1_000_003 + len(rows))
            for p, rewards in zip(batch, score_groups(groups, batch, cfg.reward)):
                row = {**p.sample.to_row(), "video": os.path.abspath(p.sample.video_path)}
                rows.append(row)
                table[row["id"]] = rewards
            bar.update(len(batch))
            batch.clear()

        for prepared in dataset:
            batch.append(prepared)
            if len(batch) == 32:
                flush()
        if batch:
            flush()
    bar.close()
    result = select_by_reward_variance(rows, table, **cfg.selection.select_kwargs())
    write_selection(out, result)
    log.info("selected %d of %d rows (%d dropped with all-equal rewards) -> %s", result.summary["n_selected"],
             len(rows), result.summary.get("n_all_same_dropped", 0), out / "selected.jsonl")
    print(json.dumps(rounded({k: v for k, v in result.summary.items() if not isinstance(v, dict)})))
    return 0


def write_selection(out: Path, result) -> None:
    """selected.jsonl, data.yaml, stats.jsonl, summary.json and variance_hist.png."""
    from dataclasses import asdict

    (out / "selected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in result.selected))
    # A config layer: `--config base.yaml --config DIR/data.yaml` trains on the selection.
    (out / "data.yaml").write_text("data:\n  train:\n    - {json_path: %s, data_folder: /, format: megavrl, "
                                   "name: selected}\n" % (out / "selected.jsonl").resolve())
    (out / "stats.jsonl").write_text("".join(json.dumps(asdict(s), default=str) + "\n" for s in result.stats))
    (out / "summary.json").write_text(json.dumps(result.summary, indent=2, default=str) + "\n")
    from megavrl.rl.selection_plot import plot_variance_histogram

    plot_variance_histogram(result, out / "variance_hist.png")
