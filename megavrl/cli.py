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
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
