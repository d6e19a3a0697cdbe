"""Rollout scaling: the rollout phase of one GRPO step with 1 engine vs 2 engines, same prompts.

The training job's placement (``rollout.engines``) is reproduced in processes of one thread each,
as torchrun starts them (OMP_NUM_THREADS=1): with ``engines=1`` one engine on one rank samples
every prompt of the step while the other rank waits; with ``engines=2`` (one per data-parallel
replica at DP=2) each of two engines samples half of the prompts, prompt i with the same seed as
in the one-engine run. A third figure gives the one engine both cores (2 threads), the best a single
engine can do on this machine. Engine start-up is not counted; each side takes the best of
``--repeats`` timed runs after a warm-up.

The model is the ``small`` preset of bench_actor_step (about 30M parameters), where the decoder's
matmuls, not per-step overheads, dominate: the 4M ``tiny`` preset would measure Python overhead.

Usage: python -m bench.bench_rollout_scaling [--prompts 16] [--n 4] [--max-new-tokens 64] [--repeats 2]
Writes bench/results/rollout_scaling.json.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from pathlib import Path

from bench.common import Figure, write_result

QUESTION = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>when does the square move<|im_end|>\n" \
           "<|im_start|>assistant\n"


def _engine_process(model_dir: str, shard: int, shards: int, args: dict, threads: int, ready, go, results) -> None:
    """One engine: start, warm up, then on ``go`` sample prompts ``shard, shard + shards, ...``."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    # As torchrun starts them: local rank ``shard`` of two processes per 2-core node, so that the
    # engine binds its threads to its own share of the cores; one engine given every core binds to all.
    os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(shard), str(max(shards, 2))
    if threads > 1:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:threads])
    import torch

    torch.set_num_threads(threads)
    from bench.bench_rollout import make_videos
    from megavrl.rollout import RolloutConfig, RolloutEngine, RolloutPrompt

    videos = make_videos(args["prompts"])
    mine = list(range(shard, args["prompts"], shards))
    prompts = [RolloutPrompt(prompt=QUESTION, videos=[videos[i]]) for i in mine]
    config = RolloutConfig(dtype="float32", n=args["n"], max_new_tokens=args["max_new_tokens"], ignore_eos=True,
                           max_model_len=1024, cpu_kv_cache_mb=256)
    with RolloutEngine(model_dir, config) as engine:
        engine.generate(prompts[:1], max_new_tokens=4, seed=[0])  # warm-up
        seconds, tokens = [], 0
        for _ in range(args["repeats"]):
            engine.reset_caches()
            ready.wait()  # every engine starts the step together
            go.wait()
            start = time.perf_counter()
            groups = engine.generate(prompts, seed=[1000 + i for i in mine])
            seconds.append(time.perf_counter() - start)
            tokens = sum(g.num_response_tokens for g in groups)
        results.put((shard, seconds, tokens))


def rollout_phase(model_dir: Path, engines: int, threads: int, args: dict) -> tuple[float, dict]:
    """Tokens/s of the step's rollout with ``engines`` engine processes of ``threads`` threads:
    all tokens over the slowest engine's time, best of the repeats."""
    ctx = mp.get_context("spawn")
    ready, go, results = ctx.Barrier(engines + 1), ctx.Barrier(engines + 1), ctx.Queue()
    procs = [ctx.Process(target=_engine_process, args=(str(model_dir), g, engines, args, threads, ready, go, results))
             for g in range(engines)]
    for p in procs:
        p.start()
    for _ in range(args["repeats"]):
        ready.wait()
        go.wait()
    per_engine = [results.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    step_seconds = [max(seconds[r] for _, seconds, _ in per_engine) for r in range(args["repeats"])]
    tokens = sum(t for _, _, t in per_engine)
    assert tokens == args["prompts"] * args["n"] * args["max_new_tokens"], tokens
    best = min(step_seconds)
    return tokens / best, {"seconds": best, "tokens": tokens, "engines": engines, "threads_per_engine": threads}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    args = ap.parse_args(argv)

    from bench.bench_actor_step import make_model

    cfg = vars(args)
    with tempfile.TemporaryDirectory(prefix="megavrl-bench-scaling-") as tmp:
        model_dir = make_model(Path(tmp) / args.preset, args.preset)
        one, one_info = rollout_phase(model_dir, engines=1, threads=1, args=cfg)
        two, two_info = rollout_phase(model_dir, engines=2, threads=1, args=cfg)
        wide, wide_info = rollout_phase(model_dir, engines=1, threads=os.cpu_count() or 2, args=cfg)
    write_result("rollout_scaling", [
        Figure("rollout tokens/s, 2 engines (1 per DP replica, 1 thread each)", two, one, "tokens/s",
               baseline_name="1 engine, 1 thread (rollout.engines=1 under torchrun)",
               notes={"two": two_info, "one": one_info}),
        Figure("rollout tokens/s, 2 engines vs 1 engine using every core", two, wide, "tokens/s",
               baseline_name=f"1 engine, {wide_info['threads_per_engine']} threads", notes={"wide": wide_info}),
    ], config={**cfg, "model": f"{args.preset} (fp32)", "video": "8 frames 112x168",
               "sampling": "temperature 1, EOS ignored, per-prompt seeds"})


if __name__ == "__main__":
    main()
