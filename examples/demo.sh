#!/usr/bin/env bash
# The embedded CPU demo (`make demo`): a tiny random Qwen2.5-VL learns video tasks on synthetic
# videos. Megatron-Core TP=2 over 2 CPU processes (gloo), vLLM on CPU, real video decoding.
#   1. make a tiny random Qwen2.5-VL (Hugging Face format) and a synthetic video dataset;
#   2. SFT warm start (cross-entropy on reference answers), exported to Hugging Face format;
#   3. GRPO from the SFT model with the dual reward, vLLM rollouts and weight sync every step.
# Each training run prints evaluation metrics before -> after and where its TensorBoard logs are;
# at the end a table gives each task's primary metric on the held-out rows, SFT before -> after and
# GRPO before -> after, beside its blind baseline (the best constant answer on those rows).
# Usage: examples/demo.sh [OUT_DIR] [extra config overrides for both runs...]
set -euo pipefail
out=${1:-runs/demo}
shift || true
here=$(cd "$(dirname "$0")" && pwd)
megavrl="$here/../.venv/bin/megavrl"
python="$here/../.venv/bin/python"
[ -x "$megavrl" ] || megavrl=megavrl
[ -x "$python" ] || python=python3
config="$here/configs/tiny_cpu_tvg.yaml"
common=(model.hf_dir="$out/tiny-hf"
        "data.train=[{json_path: $out/data/train.jsonl, data_folder: $out/data, name: synth_train}]"
        "data.val=[{json_path: $out/data/val.jsonl, data_folder: $out/data, name: synth_val}]"
        checkpoint.resume=none "$@")

echo "== 1/3 tiny model and synthetic data in $out"
"$megavrl" make-tiny-model --out "$out/tiny-hf" --preset tiny --seed 0 --force
"$megavrl" data synth --out "$out/data" --tasks tvg,mcq,gqa --n 96 --seed 0 --size 112x84 --val-fraction 0.25

echo "== 2/3 SFT warm start"
"$megavrl" train --config "$config" "${common[@]}" algorithm.name=sft trainer.total_steps=240 logging.log_every=10 checkpoint.save_every=60 \
    optimizer.lr=1e-3 trainer.output_dir="$out/sft"

echo "== 3/3 GRPO from the SFT model"
"$megavrl" train --config "$config" "${common[@]}" model.hf_dir="$out/sft/hf" trainer.output_dir="$out/grpo"

echo "== held-out results (blind: the best constant answer on the same rows; a model at or below it ignores the video)"
"$python" -m megavrl.eval.summary SFT="$out/sft" GRPO="$out/grpo"

echo "== demo done"
echo "  SFT:  evaluation in $out/sft/eval/{before,after}/metrics.md, TensorBoard $out/sft/tensorboard"
echo "  GRPO: evaluation in $out/grpo/eval/{before,after}/metrics.md, TensorBoard $out/grpo/tensorboard"
echo "  trained model (Hugging Face format): $out/grpo/hf"
echo "  tensorboard --logdir $out"
