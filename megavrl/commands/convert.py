"""CLI: ``megavrl convert hf-to-megatron`` and ``megavrl convert megatron-to-hf``.

hf-to-megatron needs TP * PP processes: typed in a shell it checks its arguments, then re-launches
itself under torchrun (:func:`megavrl.parallel.ensure_launched`); under torchrun every process is
one rank of the conversion. megatron-to-hf runs in one process whatever layout wrote the checkpoint.
The tools/convert_*.py scripts call the same functions.
"""
from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert checkpoints between Hugging Face and Megatron (any TP/PP)",
                       description="Convert Qwen2.5-VL checkpoints between a Hugging Face directory and a megavrl "
                                   "Megatron checkpoint (dist/ + hf/ + megavrl_checkpoint.json), tensor by tensor "
                                   "in bounded memory.")
    conv = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    add_hf_to_megatron_parser(conv.add_parser(
        "hf-to-megatron", help="HF directory -> Megatron distributed checkpoint at a TP/PP layout",
        description=HF_TO_MEGATRON_DESCRIPTION))
    add_megatron_to_hf_parser(conv.add_parser(
        "megatron-to-hf", help="Megatron checkpoint (any TP/PP) -> HF directory (safetensors shards)",
        description=MEGATRON_TO_HF_DESCRIPTION))


HF_TO_MEGATRON_DESCRIPTION = (
    "Write a Hugging Face Qwen2.5-VL directory as a megavrl Megatron checkpoint sharded for --tp/--pp: dist/ "
    "(Megatron-Core torch_dist; a training run starts from it with model.megatron_ckpt=OUT and it reloads at any "
    "TP/PP), hf/ (config, tokenizer, processor files) and megavrl_checkpoint.json. Starts tp*pp processes itself "
    "outside torchrun.")
MEGATRON_TO_HF_DESCRIPTION = (
    "Write a megavrl Megatron checkpoint (a converter output, a trainer step_* directory, or a checkpoint root: "
    "its newest complete step) as a Hugging Face directory: size-capped safetensors shards with "
    "model.safetensors.index.json in the published layout (visual.*, model.*, lm_head.*), config.json with the "
    "new dtype, generation config, tokenizer and processor files. One process, any saved TP/PP.")


def add_hf_to_megatron_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf-dir", required=True, help="Hugging Face Qwen2.5-VL directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype of the stored weights; auto keeps the safetensors' (default)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=hf_to_megatron)


def add_megatron_to_hf_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True,
                   help="megavrl checkpoint: converter output, step_* directory, or checkpoint root (newest step)")
    p.add_argument("--out", required=True, help="Hugging Face directory to create")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weights dtype (default bf16)")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)")
    p.add_argument("--hf-config", default=None,
                   help="HF directory whose config/tokenizer/processor files to use (default: the checkpoint's hf/)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=megatron_to_hf)


# ValueError includes megavrl.errors.UserError (a truncated shard, a corrupt safetensors file ...).
_EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, PermissionError, KeyError)


def _fail(what: str, exc: BaseException) -> int:
    """One line (from rank 0 under torchrun: every rank fails with the same one), exit code 2;
    the traceback too with ``megavrl --debug`` or MEGAVRL_DEBUG=1."""
    from megavrl.errors import debug_enabled, describe

    if os.environ.get("RANK", "0") == "0":
        if debug_enabled():
            import traceback

            traceback.print_exception(exc)
        print(f"megavrl convert {what}: error: {describe(exc)}", file=sys.stderr)
    return 2


def _precheck_hf_to_megatron(args: argparse.Namespace) -> None:
    """Refuse bad arguments before starting processes (each would print the same error)."""
    from pathlib import Path

    from megavrl.checkpoint.hf_io import HFCheckpointReader
    from megavrl.models.qwen2_5_vl.args import TextSizes
    from megavrl.models.qwen2_5_vl.config import check_tp_pp, load_hf_config, require_hf_dir

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")
    require_hf_dir(args.hf_dir, "--hf-dir")
    HFCheckpointReader(args.hf_dir).close()  # a missing or truncated safetensors file, named
    check_tp_pp(TextSizes.from_hf(load_hf_config(args.hf_dir)), args.tp, args.pp)


def hf_to_megatron(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    """argv: the worker command line for the launcher (default: re-run this ``megavrl`` command)."""
    from megavrl.parallel import ensure_launched

    if "RANK" not in os.environ:
        try:
            _precheck_hf_to_megatron(args)
        except _EXPECTED_ERRORS as e:
            return _fail("hf-to-megatron", e)
    code = ensure_launched(args.tp * args.pp, argv)
    if code is not None:
        return code
    from megavrl.checkpoint.convert import convert_hf_to_megatron
    from megavrl.parallel import destroy_distributed

    try:
        convert_hf_to_megatron(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, force=args.force,
                               progress=not args.no_progress)
    except _EXPECTED_ERRORS as e:
        return _fail("hf-to-megatron", e)
    finally:
        destroy_distributed()
    return 0


def megatron_to_hf(args: argparse.Namespace) -> int:
    from megavrl.errors import UserError

    # Local paths first, before the converter (and torch) load: one line at once.
    for flag, path in (("--ckpt", args.ckpt), ("--hf-config", args.hf_config)):
        if path is not None and not os.path.exists(path):
            return _fail("megatron-to-hf", UserError(f"{flag} {path!r} does not exist"))
    from megavrl.checkpoint.convert import convert_megatron_to_hf
    from megavrl.parallel import destroy_distributed

    try:
        convert_megatron_to_hf(args.ckpt, args.out, dtype=args.dtype, max_shard_size=args.max_shard_size,
                               force=args.force, hf_config=args.hf_config, progress=not args.no_progress)
    except _EXPECTED_ERRORS as e:
        return _fail("megatron-to-hf", e)
    finally:
        destroy_distributed()
    return 0
