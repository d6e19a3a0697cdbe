"""``megavrl check-sync``: prove that the weight sync makes vLLM sample from the trainer's policy.

Megatron loads the HF directory at the given TP/PP; vLLM starts from a copy of it whose weights
are re-randomised, so only the sync can make the two agree. After the sync, vLLM samples from a
video prompt and Megatron re-scores the sampled tokens:

    token_mult_prob_error = mean over tokens of exp(|logp_megatron - logp_vllm|)   (1.0 = equal)

With ``--step-check`` it then takes one optimizer step (cross-entropy on the samples, a large
learning rate), measures again without syncing (the two must disagree), syncs and measures a third
time (they must agree again). Prints one JSON line. Typed in a shell it re-launches itself under
torchrun with tp * pp processes. The check itself is :mod:`megavrl.checks.sync`.
"""
from __future__ import annotations

import argparse
import json
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-sync", help="check that the Megatron -> vLLM weight sync makes both score alike",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="Hugging Face Qwen2.5-VL directory")
    p.add_argument("--tp", type=int, default=1, help="Megatron tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="Megatron pipeline-parallel size")
    p.add_argument("--video", default=None, help="video for the probe prompt (default: a synthetic one)")
    p.add_argument("--n", type=int, default=4, help="samples drawn by vLLM")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--step-check", action="store_true",
                   help="also show disagreement after an optimizer step and agreement after the next sync")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from megavrl.checkpoint.hf_io import HFCheckpointReader
    from megavrl.errors import UserError
    from megavrl.models.qwen2_5_vl.config import require_hf_dir
    from megavrl.parallel.launch import ensure_launched

    require_hf_dir(args.hf_dir, "--hf-dir")  # before starting processes, each of which would fail alike
    HFCheckpointReader(args.hf_dir).close()  # a missing or truncated safetensors file, named
    if args.video is not None and not os.path.isfile(args.video):
        raise UserError(f"--video {args.video!r} is not a file")
    launched = ensure_launched(args.tp * args.pp)
    if launched is not None:
        return launched
    from megavrl.parallel.distributed import finish_distributed

    from megavrl.checks.sync import check_sync

    report = check_sync(args.hf_dir, args.tp, args.pp, args.video, args.n, args.max_new_tokens, args.step_check)
    finish_distributed()
    if report is not None:
        print(json.dumps(report), flush=True)
    return 0

