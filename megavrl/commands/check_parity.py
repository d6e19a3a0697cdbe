"""CLI: ``megavrl check-parity --hf-dir D [--ckpt C] --tp T --pp P [--video V]``.

Typed in a shell it re-launches itself under torchrun with T * P processes
(:func:`megavrl.parallel.ensure_launched`); under torchrun each process is one rank of the check
(:func:`megavrl.checks.parity.run_worker`). Rank 0 prints one JSON line.
"""
from __future__ import annotations

import argparse
import os

from megavrl.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    from megavrl.checks.parity import KINDS

    p = sub.add_parser(
        "check-parity",
        help="compare the Megatron model's logits with transformers' (prints one JSON line)",
        description="Load a Hugging Face Qwen2.5-VL directory in transformers and in Megatron-Core at the "
                    "given TP/PP layout, run the same text-only, image, video and mixed prompts (batch 2, "
                    "left-padded, built by the directory's processor) through both, and print one JSON line: "
                    "max_abs_logit_diff, mean_abs_logit_diff, argmax_agreement, vision_max_abs_diff (and "
                    "the same per input kind). Launches tp*pp processes itself when run outside torchrun.",
    )
    p.add_argument("--hf-dir", required=True, help="Hugging Face model directory (config, safetensors, processor)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size (default 1)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (default 1)")
    p.add_argument("--video", default=None,
                   help="a video file whose frames (decoded with decord) feed the video prompts; "
                        "default: synthetic frames")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated input kinds (default {','.join(KINDS)})")
    p.add_argument("--ckpt", default=None,
                   help="a megavrl Megatron checkpoint (converter output, step_* directory or checkpoint root) "
                        "to load the Megatron model from instead of --hf-dir's weights; transformers still "
                        "loads --hf-dir")
    p.add_argument("--tolerance", type=float, default=None,
                   help="exit with status 1 if max_abs_logit_diff exceeds this or any argmax disagrees")
    p.set_defaults(func=_check_parity)


def _check_parity(args: argparse.Namespace) -> int:
    from megavrl.checkpoint.hf_io import HFCheckpointReader
    from megavrl.models.qwen2_5_vl.config import require_hf_dir
    from megavrl.parallel import ensure_launched

    require_hf_dir(args.hf_dir, "--hf-dir")  # before starting processes, each of which would fail alike
    HFCheckpointReader(args.hf_dir).close()  # a missing or truncated safetensors file, named
    if args.video is not None and not os.path.isfile(args.video):
        raise UserError(f"--video {args.video!r} is not a file")
    if args.ckpt is not None and not os.path.exists(args.ckpt):
        raise UserError(f"--ckpt {args.ckpt!r} does not exist: give a megavrl checkpoint directory")
    code = ensure_launched(args.tp * args.pp)
    if code is not None:
        return code
    from megavrl.checks.parity import KINDS, run_worker

    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise SystemExit(f"--kinds: unknown {unknown}; choose from {list(KINDS)}")
    return run_worker(args.hf_dir, args.tp, args.pp, args.video, kinds, args.tolerance, args.ckpt)
