#!/usr/bin/env python
"""Hugging Face Qwen2.5-VL directory -> megavrl Megatron checkpoint at a TP/PP layout.

Same code and options as ``megavrl convert hf-to-megatron`` (megavrl/commands/convert.py):

    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-VL-7B-Instruct --out ckpt/7b-tp4 --tp 4 --pp 1

Outside torchrun it starts tp*pp processes itself (re-running this script under torchrun).
"""
import argparse
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from megavrl.commands.convert import HF_TO_MEGATRON_DESCRIPTION, add_hf_to_megatron_parser, hf_to_megatron

    parser = argparse.ArgumentParser(description=HF_TO_MEGATRON_DESCRIPTION)
    add_hf_to_megatron_parser(parser)
    sys.exit(hf_to_megatron(parser.parse_args(), argv=[os.path.abspath(__file__), *sys.argv[1:]]))
