"""CLI: ``megavrl make-tiny-model``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from megavrl.models.qwen2_5_vl.args import TINY_PRESETS

    p = sub.add_parser(
        "make-tiny-model",
        help="write a random tiny Qwen2.5-VL Hugging Face directory (tokenizer and processor included)",
        description="Write a random tiny Qwen2.5-VL Hugging Face directory with a tokenizer that holds "
                    "the Qwen special tokens, the chat template and the processor configs. Loadable by "
                    "transformers, vLLM and megavrl; deterministic from --seed.",
    )
    p.add_argument("--out", required=True, help="directory to create")
    p.add_argument("--preset", default="tiny", choices=sorted(TINY_PRESETS),
                   help="tiny: untied embeddings (like 7B); tiny-tied: tied (like 3B). Default: tiny")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    p.add_argument("--layout", default="published", choices=["published", "transformers"],
                   help="tensor names on disk: as Qwen's released checkpoints (visual.*, model.*) "
                        "or as transformers 5 saves them (model.visual.*, model.language_model.*)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=_make_tiny_model)


def _make_tiny_model(args: argparse.Namespace) -> int:
    from megavrl.checkpoint.tiny import make_tiny_model

    make_tiny_model(args.out, preset=args.preset, seed=args.seed, layout=args.layout, force=args.force)
    return 0
