#!/usr/bin/env bash
# The embedded CPU demo (`make demo`): a tiny random Qwen2.5-VL learns video tasks on synthetic
# videos. Megatron-Core TP=2 over 2 CPU processes (gloo), vLLM on CPU, real video decoding.
#   1. make a tiny random Qwen2.5-VL (Hugging Face format) and a synthetic video dataset;
#   2. SFT warm start (cross-entropy on reference answers), exported to Hugging Face format;
#   3. GRPO from the SFT model with the dual reward, vLLM rollouts and weight sync every step.
# Each training run prints evaluation metrics before -> after and where its TensorBoard logs are;
# at the end a table gives each task's primary metric on the held-out rows, SFT before -> after and
# GRPO before -> after, beside its blind baseline (the best constant answer on those rows).
# Usage: [DEMO_SEED=N] examples/demo.sh [OUT_DIR] [extra config overrides for both runs...]
# DEMO_SEED (default 0) seeds the tiny model, the synthetic data and both training runs.
set -euo pipefail
out=${1:-runs/demo}
shift || true
seed=${DEMO_SEED:-0}
here=$(cd "$(dirname "$0")" && pwd)
megavrl="$here/../.venv/bin/megavrl"
python="$here/../.venv/bin/python"
[ -x "$megavrl" ] || megavrl=megavrl
[ -x "$python" ] || python=python3
config="$here/configs/tiny_cpu_tvg.yaml"
common=(model.hf_dir="$out/tiny-hf"
        "data.train=[{json_path: $out/data/train.jsonl, data_folder: $out/data, name: synth_train}]"
        "data.val=[{json_path: $out/data/val.jsonl, data_folder: $out/data, name: synth_val}]"
        trainer.seed=$((1234 + seed)) checkpoint.resume=none "$@")

echo "== 1/3 tiny model and synthetic data in $out"
"$megavrl" make-tiny-model --out "$out/tiny-hf" --preset tiny --seed "$seed" --force
# tvg only, one event a video that fills the screen (--shape-size 1), on a background that brightens
# with time: what a random 4M-parameter model learns to ground in minutes (see README). 504 videos
# for training, 216 held out (one held-out video is 0.46 mIoU points).
"$megavrl" data synth --out "$out/data" --tasks tvg --n 720 --seed "$seed" --size 56x56 --shape-size 1 \
    --distractors 0 --val-fraction 0.3

echo "== 2/3 SFT warm start"
"$megavrl" train --config "$config" "${common[@]}" algorithm.name=sft trainer.total_steps=600 logging.log_every=50 \
    checkpoint.save_every=200 trainer.prompts_per_step=16 trainer.micro_batch_size=16 optimizer.lr=5e-4 \
    optimizer.lr_decay_style=cosine optimizer.lr_warmup_steps=20 trainer.output_dir="$out/sft"

echo "== 3/3 GRPO from the SFT model"
"$megavrl" train --config "$config" "${common[@]}" model.hf_dir="$out/sft/hf" trainer.output_dir="$out/grpo"

echo "== held-out results (blind: the best constant answer on the same rows; a model at or below it ignores the video)"
"$python" -m megavrl.eval.summary SFT="$out/sft" GRPO="$out/grpo"

echo "== demo done"
echo "  SFT:  evaluation in $out/sft/eval/{before,after}/metrics.md, TensorBoard $out/sft/tensorboard"
echo "  GRPO: evaluation in $out/grpo/eval/{before,after}/metrics.md, TensorBoard $out/grpo/tensorboard"
echo "  trained model (Hugging Face format): $out/grpo/hf"
echo "  tensorboard --logdir $out"
