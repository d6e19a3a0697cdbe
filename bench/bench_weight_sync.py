"""Weight sync: ``RolloutEngine.update_weights`` vs saving an HF directory and restarting vLLM from it.

Both move the same new weights (the tiny preset with another seed) into a running engine on CPU.
- update_weights: the tensors stream through /dev/shm buckets into the live engine (best of
  ``--repeats``; seconds and MB/s).
- baseline: write the weights as an HF directory (safetensors + config and tokenizer files), stop
  the engine and start a new one from the directory, until it is ready to sample.
Both end with an engine that samples the same greedy tokens (checked).

Usage: python -m bench.bench_weight_sync [--repeats 3] [--bucket-mb 512]
Writes bench/results/weight_sync.json.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import Figure, write_result

PROMPT = "<|im_start|>user\nname a color<|im_end|>\n<|im_start|>assistant\n"


def greedy(engine) -> list[int]:
    return engine.generate([PROMPT], n=1, temperature=0.0, max_new_tokens=8, ignore_eos=True)[0].samples[0].token_ids


def save_hf_dir(state: dict, like: Path, out: Path) -> None:
    """What a trainer without in-place sync does each step: a loadable HF directory."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    for f in like.iterdir():
        if f.name != "model.safetensors":
            shutil.copy2(f, out / f.name)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=512)
    args = ap.parse_args(argv)

    from safetensors.torch import load_file

    from megavrl.checkpoint.tiny import make_tiny_model
    from megavrl.rollout import RolloutConfig, RolloutEngine

    config = RolloutConfig(dtype="float32", max_model_len=1024, cpu_kv_cache_mb=64)
    with tempfile.TemporaryDirectory(prefix="megavrl-bench-wsync-") as tmp:
        tmp = Path(tmp)
        current = make_tiny_model(tmp / "current", preset="tiny", seed=0)
        new_state = load_file(make_tiny_model(tmp / "new", preset="tiny", seed=1) / "model.safetensors")

        engine = RolloutEngine(current, config)
        try:
            greedy(engine)  # warm-up
            runs = []
            for _ in range(args.repeats):
                stats = engine.update_weights(iter(new_state.items()), bucket_mb=args.bucket_mb)
                runs.append(stats)
            synced_tokens = greedy(engine)
            best = min(runs, key=lambda s: s.seconds)

            start = time.perf_counter()
            save_hf_dir(new_state, current, tmp / "saved")
            saved = time.perf_counter()
            engine.shutdown()
            engine = RolloutEngine(tmp / "saved", config)
            restart_seconds = time.perf_counter() - start
            save_seconds = saved - start
            assert greedy(engine) == synced_tokens, "restarted engine samples differently from the synced one"
        finally:
            engine.shutdown()

    mb = best.bytes_moved / 1e6
    write_result("weight_sync", [
        Figure("update_weights seconds (tiny, fp32)", best.seconds, restart_seconds, "s", higher_is_better=False,
               baseline_name="save HF dir + restart vLLM",
               notes={"baseline_save_s": save_seconds, "baseline_restart_s": restart_seconds - save_seconds,
                      "all_sync_s": [s.seconds for s in runs]}),
        Figure("update_weights MB/s (tiny, fp32)", best.mb_per_s, mb / restart_seconds, "MB/s",
               baseline_name="save HF dir + restart vLLM",
               notes={"mb": mb, "buckets": best.num_buckets, "tensors": best.num_tensors,
                      "transport": best.transport}),
    ], config=vars(args))


if __name__ == "__main__":
    main()
