"""Rollout throughput: RolloutEngine (vLLM) tokens/s vs transformers ``generate``, same prompts and model.

Both sides sample ``n`` responses of exactly ``max_new_tokens`` tokens (EOS ignored) for the same
video prompts (distinct frames per prompt, so vLLM's prefix cache cannot share the video) with a
random Qwen2.5-VL debug model in fp32 on CPU: ``--preset small`` (default, ~30M parameters) or
``tiny`` (4M). transformers gets the whole batch in one ``generate`` call (num_return_sequences=n,
left padding), its best case. Timed after one warm-up call each; the best of ``--repeats`` runs
counts for vLLM (the machine is shared), of ``--baseline-repeats`` (default 1) for transformers.
Engine start-up is not counted.

Why ``small`` by default: at the 4M-parameter ``tiny`` size both sides are bound by per-decode-step
overheads, not by the model, which says nothing about a real one. Measured on the idle 2-core CPU
machine (2026-11-30): small 0.97x (12.1 s vs 11.7 s for 8192 tokens); tiny 0.73-0.94x
(2026-11-21/22, ``--preset tiny``: rollout_tiny.json). On 2 CPU cores both run the same matmuls;
vLLM's advantages (paged KV cache, continuous batching, prefill shared by the n samples, CUDA
graphs) need a GPU. Ratios from a loaded machine are not trustworthy here (transformers' 2-thread
OpenMP regions stall when a thread is descheduled: the 7.3x and 11.9x once reported came from
that): run it on an idle machine.

Usage: python -m bench.bench_rollout [--preset small] [--prompts 8] [--n 8] [--max-new-tokens 128]
Writes bench/results/rollout.json (--preset tiny: rollout_tiny.json).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import Figure, write_result

QUESTION = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>when does the square move<|im_end|>\n" \
           "<|im_start|>assistant\n"


def make_videos(count: int, frames: int = 8, height: int = 112, width: int = 168):
    from megavrl.rollout import VideoInput

    rng = np.random.default_rng(0)
    return [VideoInput.from_frames(rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8), sample_fps=2.0)
            for _ in range(count)]


def bench_vllm(model_dir: Path, videos, n: int, max_new_tokens: int, repeats: int) -> tuple[float, dict]:
    from megavrl.rollout import RolloutConfig, RolloutEngine, RolloutPrompt

    config = RolloutConfig(dtype="float32", n=n, max_new_tokens=max_new_tokens, ignore_eos=True,
                           max_model_len=1024, cpu_kv_cache_mb=256)
    prompts = [RolloutPrompt(prompt=QUESTION, videos=[v]) for v in videos]
    with RolloutEngine(model_dir, config) as engine:
        engine.generate(prompts[:1], max_new_tokens=4)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            engine.reset_caches()  # no reuse of the previous repeat's video embeddings or prefixes
            start = time.perf_counter()
            groups = engine.generate(prompts)
            best = min(best, time.perf_counter() - start)
        tokens = sum(g.num_response_tokens for g in groups)
    assert tokens == len(videos) * n * max_new_tokens, tokens
    return tokens / best, {"seconds": best, "tokens": tokens}


def bench_transformers(model_dir: Path, videos, n: int, max_new_tokens: int, repeats: int) -> tuple[float, dict]:
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"

    def run(vs, new_tokens):
        metadata = [{k: v for k, v in x.metadata().items() if k != "do_sample_frames"} for x in vs]
        inputs = processor(text=[QUESTION] * len(vs), videos=[x.frames for x in vs], video_metadata=metadata,
                           do_resize=False, do_sample_frames=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 num_return_sequences=n, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        return (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]

    run(videos[:1], 4)  # warm-up
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run(videos, max_new_tokens)
        best = min(best, time.perf_counter() - start)
    assert tokens == len(videos) * n * max_new_tokens, tokens
    return tokens / best, {"seconds": best, "tokens": tokens, "torch_threads": torch.get_num_threads()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["small", "tiny"],
                    help="the random debug model: small (~30M params, default) or tiny (4M)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--baseline-repeats", type=int, default=1)
    args = ap.parse_args(argv)

    from megavrl.checkpoint.tiny import make_tiny_model

    with tempfile.TemporaryDirectory(prefix="megavrl-bench-rollout-") as tmp:
        model_dir = make_tiny_model(Path(tmp) / args.preset, preset=args.preset, seed=0)
        videos = make_videos(args.prompts)
        hf_tps, hf_info = bench_transformers(model_dir, videos, args.n, args.max_new_tokens,
                                             args.baseline_repeats)
        vllm_tps, vllm_info = bench_vllm(model_dir, videos, args.n, args.max_new_tokens, args.repeats)
    name = "rollout" if args.preset == "small" else f"rollout_{args.preset}"
    write_result(name, [Figure(f"rollout tokens/s (vLLM RolloutEngine), {args.preset}", vllm_tps, hf_tps, "tokens/s",
                               baseline_name="transformers generate",
                               notes={"vllm": vllm_info, "transformers": hf_info})],
                 config={**vars(args), "model": f"{args.preset} (fp32)", "video": "8 frames 112x168, 96 tokens",
                         "sampling": "temperature 1, EOS ignored"})


if __name__ == "__main__":
    main()
