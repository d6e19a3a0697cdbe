"""Rollout throughput on a GRPO step: RolloutEngine (vLLM) tokens/s vs transformers ``generate``.

The workload is a GRPO step's: ``--prompts`` video prompts of ``len(--video-sizes)`` different lengths
(distinct random frames per prompt, so no prompt shares another's video), ``--n`` responses per
prompt, each response ending at its own length drawn from ``--response-min``..``--response-max``
(``--lengths uniform`` or the long-tailed ``loguniform``, as bench_packing draws them). A response
ends where the model would have emitted EOS: both engines get the same list of lengths, vLLM as
each request's ``max_tokens`` (one request per response, which is how vLLM runs ``n`` samples
anyway), transformers as EOS forced at that step (and suppressed before it) by a logits
processor. Both therefore produce exactly the same number of tokens per response, and tokens/s
counts those tokens.

transformers gets the whole step in one ``generate`` call (num_return_sequences=n, left padding):
its best case, and what a transformers-based trainer does. It pays for what static batching
costs in RL: every one of the n copies of a prompt is prefilled (and its video encoded), and the
finished rows keep being computed until the longest response ends. vLLM prefills a shared prompt
once for its n samples (prefix cache), drops a response when it ends and keeps its batch full.
``--lengths fixed`` instead makes every response exactly ``--response-max`` tokens (EOS ignored):
the same matmuls on both sides, which measures the engines' per-token cost only.

Model: a random Qwen2.5-VL debug model in fp32 on CPU: ``--preset small`` (default, ~30M
parameters, compute-bound) or ``tiny`` (4M, bound by per-step overheads: says nothing about a real
model). Timed after one warm-up call each; the best of ``--repeats`` runs counts for vLLM, of
``--baseline-repeats`` (default 1) for transformers; vLLM's caches are reset before every run (no
reuse across runs). Engine start-up is not counted. Both sides keep freed memory instead of
handing it back to the kernel (``bench.common.keep_freed_memory``: without it transformers spent
60 % of its time in page faults, and the ratio read 18x). Run it on an idle machine: transformers'
OpenMP regions stall when a thread is descheduled, which once inflated this ratio to 7-12x.

Usage: python -m bench.bench_rollout [--preset small] [--prompts 8] [--n 8] [--lengths uniform]
           [--response-min 16] [--response-max 512] [--video-sizes 112x168 168x224]
Writes bench/results/rollout.json (rollout_loguniform.json, rollout_fixed.json for those length
mixes; a _tiny suffix for --preset tiny).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import RESPONSE_DISTRIBUTIONS, Figure, keep_freed_memory, response_lengths, write_result

QUESTION = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>when does the square move<|im_end|>\n" \
           "<|im_start|>assistant\n"


def make_videos(count: int, sizes: list[tuple[int, int]], frames: int = 16):
    """``count`` random videos cycling through ``sizes`` (height, width): 2-3 prompt lengths."""
    from megavrl.rollout import VideoInput

    rng = np.random.default_rng(0)
    return [VideoInput.from_frames(rng.integers(0, 256, (frames, *sizes[i % len(sizes)], 3), dtype=np.uint8),
                                   sample_fps=2.0) for i in range(count)]


def bench_vllm(model_dir: Path, videos, lengths: list[list[int]], repeats: int) -> tuple[float, dict]:
    from megavrl.rollout import RolloutConfig, RolloutEngine, RolloutPrompt

    longest = max(max(row) for row in lengths)
    config = RolloutConfig(dtype="float32", n=1, max_new_tokens=longest, ignore_eos=True,
                           max_model_len=2048, cpu_kv_cache_mb=1024)
    prompts, budgets = [], []
    for video, row in zip(videos, lengths):
        for length in row:
            prompts.append(RolloutPrompt(prompt=QUESTION, videos=[video]))
            budgets.append(length)
    with RolloutEngine(model_dir, config) as engine:
        engine.generate(prompts[:1], max_new_tokens=4)  # warm-up
        best, tokens, prompt_tokens = float("inf"), 0, 0
        for _ in range(repeats):
            engine.reset_caches()  # no reuse of the previous repeat's video embeddings or prefixes
            start = time.perf_counter()
            groups = engine.generate(prompts, max_new_tokens=budgets)
            best = min(best, time.perf_counter() - start)
            tokens = sum(g.num_response_tokens for g in groups)
            prompt_tokens = sum(len(g.prompt_token_ids) for g in groups[::len(lengths[0])])
    assert tokens == sum(map(sum, lengths)), (tokens, sum(map(sum, lengths)))
    return tokens / best, {"seconds": best, "tokens": tokens, "prompt_tokens": prompt_tokens}


class ForcedLengths:
    """A logits processor ending row r's response after exactly ``lengths[r]`` tokens (EOS there, not before)."""

    def __init__(self, lengths: list[int], prompt_width: int, eos: int):
        import torch

        self.lengths = torch.tensor(lengths)
        self.prompt_width, self.eos = prompt_width, eos

    def __call__(self, input_ids, scores):
        import torch

        step = input_ids.shape[1] - self.prompt_width  # tokens generated so far
        ending = self.lengths == step + 1
        scores[:, self.eos] = torch.where(ending, scores[:, self.eos], torch.tensor(float("-inf")))
        scores[ending] = torch.where(torch.arange(scores.shape[1]) == self.eos, 0.0, float("-inf"))
        return scores


def bench_transformers(model_dir: Path, videos, lengths: list[list[int]], repeats: int) -> tuple[float, dict]:
    import torch
    from transformers import AutoProcessor, LogitsProcessorList, Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else eos

    def run(vs, rows):
        metadata = [{k: v for k, v in x.metadata().items() if k != "do_sample_frames"} for x in vs]
        inputs = processor(text=[QUESTION] * len(vs), videos=[x.frames for x in vs], video_metadata=metadata,
                           do_resize=False, do_sample_frames=False, padding=True, return_tensors="pt")
        width = inputs["input_ids"].shape[1]
        flat = [length for row in rows for length in row]
        forced = ForcedLengths(flat, width, eos)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 num_return_sequences=len(rows[0]), max_new_tokens=max(flat),
                                 eos_token_id=eos, pad_token_id=pad, logits_processor=LogitsProcessorList([forced]))
        response = out[:, width:]
        ended = (response == eos).int().argmax(dim=1) + 1  # every row ends with exactly one EOS
        assert ended.tolist() == flat, "transformers did not end the responses where told"
        return int(ended.sum()), int(response.numel())

    run(videos[:1], [[4] * len(lengths[0])])  # warm-up
    best, tokens, computed = float("inf"), 0, 0
    for _ in range(repeats):
        start = time.perf_counter()
        tokens, computed = run(videos, lengths)
        best = min(best, time.perf_counter() - start)
    return tokens / best, {"seconds": best, "tokens": tokens, "computed_response_tokens": computed,
                           "torch_threads": torch.get_num_threads()}


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(x) for x in text.lower().split("x"))
    return height, width


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["small", "tiny"],
                    help="the random debug model: small (~30M params, default) or tiny (4M)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--lengths", default="uniform", choices=[*RESPONSE_DISTRIBUTIONS, "fixed"],
                    help="response lengths: drawn uniformly or long-tailed from --response-min..max, or all max")
    ap.add_argument("--response-min", type=int, default=16)
    ap.add_argument("--response-max", type=int, default=512)
    ap.add_argument("--video-sizes", type=parse_size, nargs="+", default=[(112, 168), (168, 224)],
                    help="frame sizes HxW (multiples of 28) the prompts cycle through; 16 frames each")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--baseline-repeats", type=int, default=1)
    args = ap.parse_args(argv)
    keep_freed_memory()

    from megavrl.checkpoint.tiny import make_tiny_model

    count = args.prompts * args.n
    flat = ([args.response_max] * count if args.lengths == "fixed"
            else response_lengths(count, args.response_min, args.response_max, args.lengths))
    lengths = [flat[i * args.n:(i + 1) * args.n] for i in range(args.prompts)]
    with tempfile.TemporaryDirectory(prefix="megavrl-bench-rollout-") as tmp:
        model_dir = make_tiny_model(Path(tmp) / args.preset, preset=args.preset, seed=0)
        videos = make_videos(args.prompts, args.video_sizes)
        hf_tps, hf_info = bench_transformers(model_dir, videos, lengths, args.baseline_repeats)
        vllm_tps, vllm_info = bench_vllm(model_dir, videos, lengths, args.repeats)
    name = "rollout" + ("" if args.lengths == "uniform" else f"_{args.lengths}") + \
        ("" if args.preset == "small" else f"_{args.preset}")
    mix = (f"all {args.response_max} tokens" if args.lengths == "fixed"
           else f"{args.lengths} {args.response_min}-{args.response_max} tokens")
    write_result(name, [Figure(f"rollout tokens/s (vLLM RolloutEngine), {args.preset}, responses {mix}",
                               vllm_tps, hf_tps, "tokens/s", baseline_name="transformers generate",
                               notes={"vllm": vllm_info, "transformers": hf_info,
                                      "response_lengths": {"mean": sum(flat) / count, "max": max(flat),
                                                           "min": min(flat)}})],
                 config={**vars(args), "video_sizes": [f"{h}x{w}" for h, w in args.video_sizes],
                         "model": f"{args.preset} (fp32)", "video": "16 frames at 2 fps per prompt",
                         "sampling": "temperature 1; responses end at the drawn lengths"})


if __name__ == "__main__":
    main()
