"""CLI: ``megavrl train --config FILE [key=value ...]``."""
from __future__ import annotations

import argparse
import os
import signal


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
    import sys

    from megavrl.config import load_config, validate
    from megavrl.parallel.launch import ensure_launched

    cfg = load_config(args.config, args.overrides)
    world = int(os.environ["WORLD_SIZE"]) if "WORLD_SIZE" in os.environ else None
    nproc = cfg.parallel.nproc or cfg.parallel.tp * cfg.parallel.pp
    # Refuse a configuration that cannot work before any process builds a model.
    validate(cfg, world_size=world if world is not None else nproc)
    if "RANK" not in os.environ:  # typed in a shell: refuse an unusable training set before any process starts
        check_training_data(cfg)
    status_file = os.path.join(cfg.trainer.output_dir, "run_status.json")
    launched = ensure_launched(nproc, grace_s=cfg.trainer.preemption_grace_s, status_file=status_file)
    if launched is not None:
        return launched
    under_torchrun = "RANK" in os.environ
    if under_torchrun:
        from megavrl.parallel.process_tree import set_parent_death_signal

        # torchrun killed with -9 cannot forward anything: the kernel tells us instead, and we checkpoint.
        set_parent_death_signal(signal.SIGTERM)
    from megavrl.parallel.launch import exit_code_for, interrupted_message
    from megavrl.rl.trainer import NonFiniteStop, Trainer

    trainer = Trainer(cfg)
    try:
        summary = trainer.run()
    except NonFiniteStop as e:
        print(f"megavrl train: {e}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    from megavrl.parallel.distributed import finish_distributed

    finish_distributed()
    if not summary["interrupted"]:
        return 0
    if int(os.environ.get("RANK", "0")) == 0 and "MEGAVRL_LAUNCHER" not in os.environ:  # else the launcher says it
        print(interrupted_message(summary["step"], summary["checkpoint"]), file=sys.stderr, flush=True)
    # Under torchrun a worker that saved its checkpoint has succeeded; the launcher (or the job
    # script, from run_status.json) turns the interruption into the exit status.
    return 0 if under_torchrun else exit_code_for(summary["signal"])


def check_training_data(cfg) -> None:
    """EmptyDatasetError (one line on the console) when no training row yields a usable sample."""
    from megavrl.data.datasets import VideoTaskDataset
    from megavrl.data.prompt import PromptBuilder

    builder = PromptBuilder.from_hf_dir(cfg.model.hf_dir, cfg.data.prompt)
    VideoTaskDataset(cfg.data, builder=builder, split="train").check_usable()
