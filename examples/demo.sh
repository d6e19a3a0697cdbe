#!/usr/bin/env bash
# The embedded CPU demo: a tiny random Qwen2.5-VL, built locally, run through what megavrl has.
# Usage: examples/demo.sh [OUT_DIR]   (make demo runs it with runs/demo)
set -euo pipefail
out=${1:-runs/demo}
bin=$(dirname "$0")/../.venv/bin
mkdir -p "$out"
"$bin/megavrl" make-tiny-model --out "$out/tiny-hf" --preset tiny --force
echo "demo: tiny model in $out/tiny-hf"
