"""The ``megavrl`` command: one entry point, one subcommand per job.

Each subcommand is a module of :mod:`megavrl.commands` (the top floor: it may import any
subsystem, nothing but this file imports it) exposing ``register(subparsers)``; that function adds
its parser and sets ``func`` to a callable taking the parsed arguments and returning an exit code.
Modules import heavy libraries (torch, vLLM) inside their functions, so ``megavrl --help`` stays
instant.

Errors. Bad input (a :class:`megavrl.config.ConfigError`, a :class:`megavrl.errors.UserError`, a
missing or unreadable file) is reported as one line, ``megavrl <command>: error: <reason>``, with
exit status 2; ``megavrl --debug <command> ...`` or ``MEGAVRL_DEBUG=1`` adds the traceback. Any
other exception is a bug and keeps its traceback.

Console. Library warnings that are expected on CPU are hidden (:mod:`megavrl.console`);
``--verbose`` shows them. Both flags go before or after the command; ``key=value`` overrides may
come before, between or after the options.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

# A subcommand appears here when it works end to end.
COMMAND_MODULES = [
    "megavrl.commands.model",
    "megavrl.commands.check_parity",
    "megavrl.commands.data",
    "megavrl.commands.convert",
    "megavrl.commands.train",
    "megavrl.commands.eval",
    "megavrl.commands.check_sync",
]


def build_parser() -> argparse.ArgumentParser:
    from megavrl import __version__

    parser = argparse.ArgumentParser(
        prog="megavrl",
        description="RL post-training of video vision-language models (Qwen2.5-VL) on Megatron-Core and vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"megavrl {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an error (also: environment MEGAVRL_DEBUG=1)")
    parser.add_argument("--verbose", action="store_true",
                        help="show the library warnings expected on CPU and vLLM's INFO lines (also: "
                             "environment MEGAVRL_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for leaf in _leaf_parsers(parser):  # `megavrl train ... --verbose` works as well as `megavrl --verbose train`
        leaf.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        leaf.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    return {}


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    children = _subparsers(parser)
    if not children:
        return [parser]
    return [leaf for child in dict.fromkeys(children.values()) for leaf in _leaf_parsers(child)]


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)parser of the command that ``args`` ran, for its usage line in an error."""
    for attr in ("command", "direction", "data_command"):
        children = _subparsers(parser)
        if getattr(args, attr, None) in children:
            parser = children[getattr(args, attr)]
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args`` that also takes ``key=value`` overrides between options
    (``eval --config C model.hf_dir=X --out D eval.max_samples=2``): argparse alone stops
    collecting the positional overrides at the first option after them."""
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and not any(a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from megavrl.config import ConfigError
    from megavrl.console import VERBOSE_ENV, quiet_console
    from megavrl.errors import DEBUG_ENV, UserError, debug_enabled, describe, is_file_error

    parser = build_parser()
    args = parse_args(parser, argv)
    if args.debug:  # torchrun workers started by the command inherit it
        os.environ[DEBUG_ENV] = "1"
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    quiet_console(note=args.command in ("train", "eval", "select", "check-parity", "check-sync", "convert"))
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UserError, OSError) as e:
        if isinstance(e, OSError) and not is_file_error(e):
            raise  # not about a path the user gave (a refused connection ...): keep the traceback
        if debug_enabled():
            traceback.print_exc()
        kind = "configuration error" if isinstance(e, ConfigError) else "error"
        print(f"megavrl {_command_name(args)}: {kind}: {describe(e)}", file=sys.stderr)
        return 2


def _command_name(args: argparse.Namespace) -> str:
    """``convert megatron-to-hf`` for a nested subcommand, else the command."""
    sub = getattr(args, "direction", None)
    return f"{args.command} {sub}" if sub else args.command


if __name__ == "__main__":
    sys.exit(main())
elif __name__ == "__mp_main__":
    # This module is re-imported under this name in every process that multiprocessing *spawns*
    # from a megavrl command (vLLM's engine processes). Such a helper must not outlive the command
    # (a trainer killed with -9 would leave its engine running), and must not be stopped by the
    # signal that torchrun sends to the worker's process group: the trainer stops it in order.
    from megavrl.console import quiet_console
    from megavrl.parallel.process_tree import detach_from_job_signals

    detach_from_job_signals()
    quiet_console(note=False)
elif "__mp_main__" in sys.modules and "--multiprocessing-fork" in getattr(sys, "orig_argv", ()):
    # The same spawned helper when the command ran as the `megavrl` console script: that script is
    # re-imported as __mp_main__ and imports this module. Its log lines are filtered the same way.
    from megavrl.console import quiet_console

    quiet_console(note=False)
