"""CLI: ``megavrl train --config FILE [key=value ...]``."""
from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="GRPO (or SFT) training: Megatron-Core actor, vLLM rollouts, weight sync",
        description="Train Qwen2.5-VL with GRPO (algorithm.name=grpo) or supervised fine-tuning "
                    "(algorithm.name=sft). Run under torchrun for several processes or nodes; started "
                    "directly with parallel.tp * parallel.pp > 1 it launches the processes itself.",
        epilog="example: megavrl train --config examples/configs/tiny_cpu_tvg.yaml parallel.tp=2 trainer.total_steps=4",
    )
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config; repeat to layer several (later files win)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. rollout.n=8")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from megavrl.config import load_config, validate
    from megavrl.parallel.launch import ensure_launched

    cfg = load_config(args.config, args.overrides)
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    nproc = cfg.parallel.nproc or cfg.parallel.tp * cfg.parallel.pp
    # Refuse a configuration that cannot work before any process builds a model.
    validate(cfg, world_size=world if world is not None else nproc)
    launched = ensure_launched(nproc)
    if launched is not None:
        return launched
    from megavrl.rl.trainer import Trainer

    Trainer(cfg).run()
    return 0
