"""CLI: ``megavrl eval`` (:mod:`megavrl.eval.runner`) and ``megavrl select`` (:mod:`megavrl.rl.select`).

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
    """Config, an HF directory to serve, the prompt builder, and (shard, shards): this process's
    share of the rows. With ``rollout.engines`` N > 1 the command runs as N processes (one engine
    each), started here under torchrun; None is returned to the launcher, which returns the job's
    exit code."""
    from megavrl.config import ConfigError, load_config, validate
    from megavrl.data.prompt import PromptBuilder
    from megavrl.parallel.launch import ensure_launched

    cfg = load_config(args.config, args.overrides)
    cfg.parallel.tp = cfg.parallel.pp = 1  # vLLM only: Megatron's layout does not apply
    validate(cfg, world_size=1)
    if args.command == "eval" and not cfg.data.val:
        raise ConfigError("data.val is empty: list the datasets to evaluate under data.val")
    if args.command == "select" and not cfg.data.train:
        raise ConfigError("data.train is empty: list the datasets to select from under data.train")
    engines = 1 if cfg.rollout.engines == "auto" else int(cfg.rollout.engines)
    code = ensure_launched(engines)
    if code is not None:
        return None, code
    shard = 0
    if engines > 1:
        import torch

        torch.distributed.init_process_group("gloo")
        shard = torch.distributed.get_rank()
    served = {"model": cfg.model.megatron_ckpt or cfg.model.hf_dir, "step": _checkpoint_step(cfg.model.megatron_ckpt)}
    hf_dir = cfg.model.hf_dir
    if cfg.model.megatron_ckpt:  # converted once, by the first process
        hf_dir = None
        if shard == 0:
            from megavrl.checkpoint.convert import convert_megatron_to_hf

            hf_dir = tempfile.mkdtemp(prefix="megavrl-hf-")
            os.rmdir(hf_dir)
            convert_megatron_to_hf(cfg.model.megatron_ckpt, hf_dir, dtype="fp32")
            log.info("converted %s to %s for vLLM", cfg.model.megatron_ckpt, hf_dir)
        from megavrl.parallel.collectives import broadcast_object

        hf_dir = broadcast_object(hf_dir)
    builder = PromptBuilder.from_hf_dir(hf_dir, cfg.data.prompt)
    return (cfg, hf_dir, builder, shard, engines, served), None


def _engine(cfg, hf_dir):
    from megavrl.rollout.engine import RolloutEngine

    return RolloutEngine(hf_dir, cfg.rollout)


def _gather(shard_result, engines: int) -> list:
    """Every process's result, rank 0 first (one process: just this one's)."""
    if engines == 1:
        return [shard_result]
    from megavrl.parallel.collectives import all_gather_object

    return all_gather_object(shard_result)


def _finish(engines: int) -> None:
    if engines > 1:
        import torch

        torch.distributed.destroy_process_group()


def _eval(args) -> int:
    import time

    from megavrl.console import rounded
    from megavrl.eval.runner import predict, report
    from megavrl.rl.placement import interleave

    job, code = _setup(args)
    if job is None:
        return code
    cfg, hf_dir, builder, shard, engines, served = job
    out = Path(args.out or cfg.eval.output_dir or Path(cfg.trainer.output_dir) / "eval")
    t0 = time.perf_counter()
    with _engine(cfg, hf_dir) as engine:
        shard_records = predict(engine, cfg, builder, shard, engines)
    shards = _gather(shard_records, engines)
    if shard == 0:
        metrics = report(interleave([records for records, _ in shards]), cfg, out, seconds=time.perf_counter() - t0,
                         val_rows=max(rows for _, rows in shards), **served)
        print(json.dumps(rounded({k: v for k, v in metrics.items() if "/" not in k or k.startswith("overall")})))
    _finish(engines)
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
    from megavrl.console import rounded
    from megavrl.rl.placement import interleave
    from megavrl.rl.select import roll_out_rows, select_and_write

    job, code = _setup(args)
    if job is None:
        return code
    cfg, hf_dir, builder, shard, engines, _ = job
    out = Path(args.out or Path(cfg.trainer.output_dir) / "select")
    with _engine(cfg, hf_dir) as engine:
        rows, rewards = roll_out_rows(engine, cfg, builder, shard, engines)
    shards = _gather((rows, rewards), engines)
    if shard == 0:
        result = select_and_write(interleave([r for r, _ in shards]), interleave([w for _, w in shards]), cfg, out)
        print(json.dumps(rounded({k: v for k, v in result.summary.items() if not isinstance(v, dict)})))
    _finish(engines)
    return 0
