"""The ``megavrl`` command: one entry point, one subcommand per job.

Each subcommand lives next to the code it drives, in a ``commands.py`` module exposing
``register(subparsers)``; that function adds its parser and sets ``func`` to a callable taking the
parsed arguments and returning an exit code. Modules import heavy libraries (torch, vLLM) inside
their functions, so ``megavrl --help`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# A subcommand appears here when it works end to end.
COMMAND_MODULES = [
    "megavrl.models.qwen2_5_vl.commands",
    "megavrl.models.qwen2_5_vl.parity_command",
    "megavrl.data.commands",
    "megavrl.checkpoint.commands",
    "megavrl.rl.commands",
    "megavrl.eval.commands",
    "megavrl.rollout.check_sync",
]


def build_parser() -> argparse.ArgumentParser:
    from megavrl import __version__

    parser = argparse.ArgumentParser(
        prog="megavrl",
        description="RL post-training of video vision-language models (Qwen2.5-VL) on Megatron-Core and vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"megavrl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from megavrl.config import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:  # a configuration that cannot work: one line, no traceback
        print(f"megavrl {args.command}: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
