"""Video decode + preprocess throughput: megavrl.data against qwen-vl-utils + the transformers processor.

Both sides start from the same mp4 files and end with ``pixel_values_videos``, ``video_grid_thw``
and ``second_per_grid_ts`` for the model; the script asserts that they are equal, then prints
frames per second of each and their ratio, and writes bench/results/video_preprocess.json.

- baseline: ``qwen_vl_utils.fetch_video`` (decord backend) then ``Qwen2_5_VLProcessor`` on the
  returned frames and metadata (the Qwen team's recipe);
- megavrl: ``VideoSampler`` (decord, same frames, same resize) then ``preprocess_video``.

Figures (sampled frames per second, median of the rounds; the pipelines run interleaved so that load
from other processes hits them alike; the figures' ratios are of the medians, notes.paired_ratios
holds the medians of per-round ratios and notes.cpu_ratios the same in CPU seconds):

- ``loader`` (the headline): megavrl's ``VideoTaskDataset`` as training runs it, decoding in its
  two background threads and building full prompts (tokens, M-RoPE ids), against the baseline;
- ``serial``: one video after another on both sides, decode + preprocess only;
- ``prompt`` (printed, and in notes): serial, with the text side too (the processor's chat text
  with the expanded placeholder against ``PromptBuilder.build``).

Run: ``python -m bench.bench_video_preprocess [--rounds 3] [--quick]``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from fractions import Fraction

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import Figure, write_result  # noqa: E402  (after the path set-up: runnable as a file too)

# (width, height, fps, seconds): common web-video sizes, none on the 28-pixel grid.
VIDEOS = [(640, 360, 30, 8), (480, 270, 25, 10), (854, 480, 24, 6), (320, 240, Fraction(30000, 1001), 12),
          (400, 300, 30, 10), (720, 404, 25, 6)]


def write_video(path: str, width: int, height: int, fps, seconds: float, seed: int) -> None:
    """Moving gradients and blocks: cheap to encode, every frame different, keyframes every 2 s."""
    import av

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1),
                     (xx + yy) * 255 // (width + height)], axis=-1).astype(np.uint8)
    frames = int(round(float(fps) * seconds))
    with av.open(path, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "g": str(int(round(float(fps) * 2)))}
        for i in range(frames):
            img = np.roll(base, shift=(3 * i) % width, axis=1)
            for k in range(4):
                y, x = (int(rng.integers(0, height - 40)), int(rng.integers(0, width - 40)))
                img[y:y + 40, x:x + 40] = rng.integers(0, 255, size=3)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def baseline(paths, processor, text):
    """qwen-vl-utils + transformers: returns the per-video outputs."""
    from qwen_vl_utils import vision_process as vp

    out = []
    for path in paths:
        video, meta = vp.fetch_video({"video": path}, return_video_metadata=True)
        feats = processor(text=[text], videos=[video], video_metadata=[meta], return_tensors="pt")
        out.append((feats, video.shape[0]))
    return out


def ours(paths, sampler, spec):
    from megavrl.data.preprocess import preprocess_video

    out = []
    for path in paths:
        video = sampler(path)
        out.append((preprocess_video(video.frames, video.sample_fps, spec), video.frames.shape[0]))
    return out


def ours_prompts(paths, sampler, builder, sample):
    from dataclasses import replace

    return [(builder.build(replace(sample, video=p), sampler(p)), None) for p in paths]


def ours_loader(data_config, builder):
    from megavrl.data.datasets import VideoTaskDataset

    dataset = VideoTaskDataset(data_config, builder, split="val")
    return [(p, p.frames.shape[0]) for p in dataset]


def check_equal(base, mine) -> None:
    import torch

    for (ref, _), (got, _) in zip(base, mine):
        pv = got.pixel_values_videos
        assert ref["pixel_values_videos"].shape == pv.shape, "pixel_values_videos shapes differ"
        assert torch.equal(ref["pixel_values_videos"], pv), "pixel_values_videos differ"
        assert torch.equal(ref["video_grid_thw"], got.video_grid_thw), "video_grid_thw differ"
        assert torch.allclose(ref["second_per_grid_ts"].float(), got.second_per_grid_ts), "second_per_grid_ts differ"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per pipeline (the median counts)")
    parser.add_argument("--quick", action="store_true", help="3 videos, 2 rounds")
    parser.add_argument("--name", default="video_preprocess", help="result name: bench/results/NAME.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoProcessor

    from qwen_vl_utils import vision_process as vp
    vp.FORCE_QWENVL_VIDEO_READER = "decord"  # the reference reader; torchcodec is not installed on CPU
    vp.get_video_reader_backend.cache_clear()

    from megavrl.data.config import DataConfig, DatasetSpec
    from megavrl.data.prompt import PromptBuilder
    from megavrl.data.schema import Sample
    from megavrl.data.video import VideoSampler
    from megavrl.checkpoint.tiny import make_tiny_model

    import transformers
    transformers.logging.set_verbosity_error()
    specs = VIDEOS[:3] if args.quick else VIDEOS
    rounds = 2 if args.quick else args.rounds
    work = tempfile.mkdtemp(prefix="megavrl-bench-video-")
    paths = []
    for i, (w, h, fps, seconds) in enumerate(specs):
        path = os.path.join(work, f"v{i}_{w}x{h}.mp4")
        write_video(path, w, h, fps, seconds, seed=i)
        paths.append(path)
    hf_dir = make_tiny_model(os.path.join(work, "tiny"))
    processor = AutoProcessor.from_pretrained(hf_dir)
    processor.video_processor.cap_pixels_per_frame = False  # qwen-vl-utils already applied its budget
    builder = PromptBuilder.from_hf_dir(str(hf_dir))
    sampler = VideoSampler()
    # an mcq row: its template does not mention the duration, so one text serves every video
    sample = Sample(id="bench", video="", task="mcq", question="Which colour was the square that moved?",
                    options=["red", "green", "blue", "yellow"], answer="A")
    rows = os.path.join(work, "rows.jsonl")
    with open(rows, "w") as f:
        for i, p in enumerate(paths):
            f.write(json.dumps({**sample.to_row(), "id": f"v{i}", "video": p}) + "\n")
    data_config = DataConfig(val=[DatasetSpec(json_path=rows)])  # default loader settings: 2 workers
    text = builder.prompt_text(sample, 10.0)

    # warm-up, and the equality check on every video
    base = baseline(paths, processor, text)
    mine = ours(paths, sampler, builder.spec)
    check_equal(base, mine)
    prompts = ours_prompts(paths, sampler, builder, sample)
    for (ref, _), (got, _) in zip(base, prompts):
        assert torch.equal(ref["input_ids"][0], got.input_ids), "input_ids differ"
    check_equal(base, [(_as_features(p), None) for p, _ in prompts])
    check_equal(base, [(_as_features(p), None) for p, _ in ours_loader(data_config, builder)])
    frames = sum(n for _, n in mine)

    names = ("baseline", "serial", "prompt", "loader")
    runs = {
        "baseline": lambda: baseline(paths, processor, text),
        "serial": lambda: ours(paths, sampler, builder.spec),
        "prompt": lambda: ours_prompts(paths, sampler, builder, sample),
        "loader": lambda: ours_loader(data_config, builder),
    }
    wall = {k: [] for k in names}
    cpu = {k: [] for k in names}
    for _ in range(rounds):  # interleaved, so load from other processes hits all pipelines alike
        for k in names:
            c0 = time.process_time()
            wall[k].append(timed(runs[k])[0])
            cpu[k].append(time.process_time() - c0)
    med = statistics.median
    fps = {k: frames / med(wall[k]) for k in names}
    # paired ratios (each round's baseline against the same round's pipeline), median over rounds
    ratio = {k: med([b / t for b, t in zip(wall["baseline"], wall[k])]) for k in names[1:]}
    cpu_ratio = {k: med([b / t for b, t in zip(cpu["baseline"], cpu[k])]) for k in names[1:]}

    load = os.getloadavg()[0]
    print(f"{len(paths)} videos, {frames} sampled frames, median of {rounds} interleaved rounds "
          f"(torch threads {torch.get_num_threads()}, load average {load:.1f} on {os.cpu_count()} cpus)")
    print(f"  {'pipeline':40s} {'frames/s':>9s} {'ratio':>7s} {'cpu ratio':>10s}")
    labels = {"baseline": "qwen-vl-utils + transformers processor", "serial": "megavrl sampler + preprocess (serial)",
              "prompt": "megavrl + prompt building (serial)", "loader": "megavrl dataset loader (2 threads) <- figure"}
    for k in names:
        r = "" if k == "baseline" else f"{ratio[k]:6.2f}x {cpu_ratio[k]:9.2f}x"
        print(f"  {labels[k]:40s} {fps[k]:9.1f} {r}")
    print("  (ratio: wall-clock throughput against the baseline; cpu ratio: CPU seconds the baseline spends "
          "per CPU second of the pipeline)")
    print("  pixel_values_videos, video_grid_thw, second_per_grid_ts and input_ids: equal")

    notes = {
        "paired_ratios": {k: round(v, 3) for k, v in ratio.items()},
        "cpu_ratios": {k: round(v, 3) for k, v in cpu_ratio.items()},
        "wall_seconds": {k: [round(t, 4) for t in v] for k, v in wall.items()},
        "cpu_seconds": {k: [round(t, 4) for t in v] for k, v in cpu.items()},
        "videos": [{"width": w, "height": h, "fps": float(f), "seconds": s} for w, h, f, s in specs],
        "frames": frames, "pixels_equal": True, "torch_threads": torch.get_num_threads(),
        "load_average": round(load, 2), "transformers": transformers.__version__,
    }
    unit = "sampled frames/s"
    baseline_name = "qwen-vl-utils + Qwen2_5_VLProcessor"
    write_result(args.name, [
        Figure("decode + preprocess + prompt, megavrl dataset loader (2 decoding threads)", fps["loader"],
               fps["baseline"], unit, baseline_name=baseline_name, notes=notes),
        Figure("decode + preprocess, megavrl sampler (serial)", fps["serial"], fps["baseline"], unit,
               baseline_name=baseline_name),
    ], config={"rounds": rounds, "quick": args.quick})
    return 0


def _as_features(prepared):
    from megavrl.data.preprocess import VideoFeatures

    return VideoFeatures(prepared.pixel_values_videos, prepared.video_grid_thw, prepared.second_per_grid_ts)


if __name__ == "__main__":
    sys.exit(main())
