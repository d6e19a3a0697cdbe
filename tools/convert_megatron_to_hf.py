#!/usr/bin/env python
"""megavrl Megatron checkpoint (any TP/PP; converter output, trainer step or root) -> Hugging Face directory.

Same code and options as ``megavrl convert megatron-to-hf`` (megavrl/commands/convert.py):

    python tools/convert_megatron_to_hf.py --ckpt runs/exp1/checkpoints --out exp1-hf --dtype bf16
"""
import argparse
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megavrl.commands.convert import MEGATRON_TO_HF_DESCRIPTION, add_megatron_to_hf_parser, megatron_to_hf

    parser = argparse.ArgumentParser(description=MEGATRON_TO_HF_DESCRIPTION)
    add_megatron_to_hf_parser(parser)
    sys.exit(megatron_to_hf(parser.parse_args()))
