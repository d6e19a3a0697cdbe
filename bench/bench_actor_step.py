"""Actor training step tokens/s: megavrl's Megatron actor vs transformers + plain PyTorch, same batch.

One training step = forward + backward over every micro-batch + one optimizer step (gradient
clipping at 1.0, then Adam with decoupled weight decay), fp32, loss = token-mean cross entropy
of the response tokens. Both sides start from the same random Qwen2.5-VL directory and train on
the same batch: ``--sequences`` sequences of exactly ``--seq-len`` tokens, each a synthetic
grounding video prompt built by megavrl's data pipeline (decord decode, frame sampling, resize,
patchify, chat template, M-RoPE ids) followed by random text tokens up to the length (the
"response"), split into micro-batches of ``--micro-batch-size``. ``--fps 0`` uses text-only
sequences instead (the language model alone; results in actor_step_text_only.json).

- megavrl: ``MegatronActor.train_step`` (Megatron-Core DDP + Megatron's Adam, local layer spec,
  CPU mode over gloo), TP=1 in this process.
- baseline: ``Qwen2_5_VLForConditionalGeneration`` (transformers' default attention, SDPA), the
  same micro-batches with gradient accumulation, ``clip_grad_norm_`` and ``torch.optim.AdamW``
  with the same lr, betas, eps and weight decay.

Both sides keep freed memory in the process instead of handing it back to the kernel
(``bench.common.keep_freed_memory``): page faults otherwise cost the Megatron side about 7 % at 1
thread and transformers less. The two sides are timed in alternating rounds in one process (the machine is shared: load
changes hit both alike), after ``--warmup`` untimed steps each; the best of ``--steps`` rounds
counts; the median and the CPU seconds per step (all threads; tokens_per_cpu_second) are kept in
the notes. On a busy shared machine ``--threads 1`` gives by far the steadiest comparison
(2-thread OpenMP regions wait for whichever thread was descheduled, and the side with more, smaller
ops suffers more). Both compute the same loss before their first update (the step-1 losses are
printed and stored: a check that they train the same thing).

The actor is also timed at TP=2 under torchrun (2 processes, 1 thread each; ``--no-tp2`` skips
it), reported as a separate figure against the same baseline.

GPU (when ``torch.cuda.is_available()``, or ``--gpu``): model FLOPs utilisation (MFU) of the actor
step (``MegatronActor.train_step``, one GPU, TP=1) for Qwen2.5-VL-3B and -7B shapes (``GPU_SHAPES``:
config dicts shaped like the published config.json files, random weights, ``--gpu-dtype``
bfloat16), activation recompute off and on (full, uniform, 1 layer per checkpoint: the language
model's layers; the vision tower is not recomputed), ``--gpu-seq-lens`` (2048 4096 8192) tokens per
sequence, ``--gpu-tokens-per-step`` (16384) tokens per step, one sequence per micro-batch. Each
sequence is a video prompt like the reference recipe's (examples/configs/qwen2_5_vl_*_tvg.yaml):
a synthetic video whose merged tokens are about ``--gpu-video-share`` (0.5) of the sequence -- frames
of ``--gpu-frame-size`` (280x364 px, 130 tokens per 2 frames) at 2 fps, patchified by megavrl's
preprocessing, M-RoPE ids from get_rope_index -- between 80 prompt text tokens, then the response
up to the length. As in the recipe the vision encoder is frozen (forward only; ``--gpu-train-vision``
trains it) while the merger and the language model train. ``--gpu-video-share 0``: text-only
sequences, the whole tower frozen and idle (results in actor_step_gpu_mfu_text_only.json).
``--gpu-num-layers`` (default 8) and ``--gpu-vision-depth`` (default 8) build fewer decoder layers
and vision blocks than published (so that bf16 weights + fp32 grads, master copies and Adam state
fit one GPU; 0 = the published depth). The figures' notes hold the video and text tokens per
sequence, the vision share of the FLOPs, TFLOP/s, seconds per step, peak memory and the recompute
flag; the record holds the device name and the date. The CPU figures are skipped in that mode.
Not yet run on a GPU; ``--gpu --gpu-shapes tiny --gpu-dtype float32`` runs the same code on a CPU.

    MFU = model FLOPs per step / seconds per step / peak    (megavrl.models.qwen2_5_vl.flops)
    model FLOPs = 6 * N * n_seq * S + n_seq * 12 * L * h * S^2 / 2                  (language model)
                + n_seq * (k_enc * (2 * N_enc * P + 4 * d * sum_blocks sum_segments l^2)
                           + k_mrg * 2 * N_mrg * P / 4)                             (vision tower)

with N the active parameters of the language model that take part in matmuls (decoder layers and
the output layer, not the input-embedding lookup), S the sequence length, n_seq sequences per
step, L layers, h the hidden size (causal attention: half of the S^2 score and value matmuls);
P the video's patches per sequence (4 per video token), N_enc the parameters of the patch
embedding and vision blocks, d the vision width, l the patch counts of the attention segments
(112-px windows in window blocks, whole frames in full-attention blocks), N_mrg the merger's
parameters; k = 3 (forward + backward) for a part that trains, 1 (forward only) for a frozen one.
Recomputed activations are not counted (model FLOPs, not hardware FLOPs). peak = ``--peak-tflops``,
dense bf16: 989 for H100 SXM and for H200 (H100 PCIe: 756).

Usage: python -m bench.bench_actor_step [--preset small [tiny]] [--sequences 8] [--seq-len 512]
           [--micro-batch-size 4] [--warmup 1] [--steps 5] [--no-tp2]
       python -m bench.bench_actor_step --gpu [--peak-tflops 989] [--gpu-seq-lens 2048 4096 8192]
           [--gpu-shapes Qwen2.5-VL-3B Qwen2.5-VL-7B] [--gpu-video-share 0.5] [--gpu-frame-size 280 364]
           [--gpu-num-layers 8] [--gpu-vision-depth 8] [--gpu-train-vision] [--results-dir DIR]
The default preset is ``small`` (~30M parameters): at the 4M ``tiny`` size both sides are bound by
per-op overheads, which says little about a real model's step.
Writes bench/results/actor_step.json (other --preset choices: actor_step_<presets>.json; GPU mode:
actor_step_gpu_mfu[_<shapes>][_text_only].json).

On one H100 SXM or H200 (both 989 dense bf16 TFLOP/s), 3B and 7B, recompute off and on in one run:

    python -m bench.bench_actor_step --gpu --peak-tflops 989 --warmup 2 --steps 5
    python -m bench.bench_actor_step --gpu --peak-tflops 989 --gpu-shapes Qwen2.5-VL-3B   # one model
    python -m bench.bench_actor_step --gpu --peak-tflops 989 --gpu-video-share 0          # text only
    python -m bench.bench_actor_step --gpu --peak-tflops 989 --gpu-shapes Qwen2.5-VL-3B --gpu-num-layers 0
        --gpu-vision-depth 0   # the published depths; 18 bytes per trained parameter (bf16 weight, fp32
                               # grad, master copy and Adam moments): ~56 GB for the 3B before activations,
                               # ~137 GB for the 7B (too much for one GPU with activations)

Dry run on a CPU (tiny shapes, ~30 s): python -m bench.bench_actor_step --gpu --gpu-shapes tiny
    --gpu-dtype float32 --gpu-seq-lens 256 --gpu-tokens-per-step 512 --warmup 1 --steps 1
    --results-dir /tmp/mfu
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Figure, keep_freed_memory, write_result
from megavrl.checks.gpu import GPU_SHAPES, PUBLISHED_SHAPES, first_special_id, gpu_model_config
from megavrl.models.qwen2_5_vl.flops import (FLOPS_FORMULA, actor_step_flops, lm_matmul_params,
                                             vision_encoder_params)

LR = 1e-5
ADAM = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
CLIP_GRAD = 1.0

# ------------------------------------------------------------------------------------ inputs


def make_model(out: Path, preset: str) -> Path:
    """A random Qwen2.5-VL HF directory of one of megavrl's debug presets ("tiny": 4M parameters,
    "small": ~30M, see megavrl.models.qwen2_5_vl.args.TINY_PRESETS)."""
    from megavrl.checkpoint.tiny import make_tiny_model

    return make_tiny_model(out, preset=preset, seed=0, force=True)


def make_batch(hf_dir: Path, data_dir: Path, sequences: int, seq_len: int, micro_batch_size: int,
               fps: float, seed: int = 0) -> tuple[list[dict], dict]:
    """The micro-batches (collated) of ``sequences`` video prompts + random text up to ``seq_len``.

    fps <= 0: text-only sequences (random prompt of 3/4 of ``seq_len``, then the response), to
    time the language model without the vision tower."""
    from transformers import AutoTokenizer

    from megavrl.rl.batch import TrainSequence, collate, split_micro_batches
    from megavrl.rl.experience import prompt_positions, vision_inputs

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    # Response (and text-only prompt) tokens: ordinary BPE tokens only (ids below the first
    # special token), so neither model mistakes one for a vision placeholder.
    first_special = min(tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens)
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    if fps <= 0:
        for _ in range(sequences):
            seqs.append(TrainSequence(input_ids=torch.randint(0, first_special, (seq_len,), generator=gen),
                                      prompt_len=3 * seq_len // 4))
        info = {"prompt_tokens": [s.prompt_len for s in seqs], "video_tokens": 0}
    else:
        prepared = video_prompts(hf_dir, data_dir, sequences, fps, seed)
        for p in prepared:
            if p.num_tokens >= seq_len:
                raise ValueError(f"prompt of {p.num_tokens} tokens does not fit --seq-len {seq_len}: raise it "
                                 "or lower --fps")
            response = torch.randint(0, first_special, (seq_len - p.num_tokens,), generator=gen)
            seqs.append(TrainSequence(input_ids=torch.cat([p.input_ids, response]), prompt_len=p.num_tokens,
                                      vision=vision_inputs(p), **prompt_positions(p)))
        info = {"prompt_tokens": [p.num_tokens for p in prepared], "video_tokens": prepared[0].num_video_tokens,
                "video_frames": int(prepared[0].frames.shape[0]), "frame_size": list(prepared[0].frames.shape[-2:])}
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = [collate(mb, pad, seq_len) for mb in split_micro_batches(seqs, micro_batch_size)]
    info["loss_tokens"] = int(sum(b["loss_mask"].sum() for b in batches))
    return batches, info


def video_prompts(hf_dir: Path, data_dir: Path, count: int, fps: float, seed: int) -> list:
    """``count`` prepared grounding prompts of synthetic videos (megavrl's data pipeline)."""
    from megavrl.data.config import DataConfig
    from megavrl.data.datasets import VideoTaskDataset
    from megavrl.data.prompt import PromptBuilder
    from megavrl.data.synth import write_synthetic_dataset

    if not (data_dir / "train.jsonl").exists():
        write_synthetic_dataset(str(data_dir), tasks=("tvg",), n=max(count + 2, 8), seed=seed, val_fraction=0.0)
    data = DataConfig(train=[{"json_path": str(data_dir / "train.jsonl"), "data_folder": str(data_dir)}],
                      video={"fps": fps, "min_pixels": 3136, "max_pixels": 25088}, num_workers=0, shuffle=False)
    builder = PromptBuilder.from_hf_dir(str(hf_dir), data.prompt)
    return VideoTaskDataset(data, builder=builder).take(count)


def token_mean_ce(num_tokens: int):
    """The actor's loss_fn: cross entropy of the response tokens, divided by the batch's count."""
    def loss_fn(batch, logprobs, entropy):
        loss = -(logprobs * batch["loss_mask"]).sum() / num_tokens
        return loss, {"loss": loss.item()}
    return loss_fn


# ------------------------------------------------------------------------------------ the two sides


class MegatronSide:
    name = "megavrl MegatronActor"

    def __init__(self, hf_dir: Path, batches: list[dict], tp: int = 1, steps_hint: int = 100):
        from megavrl.config import OptimizerConfig
        from megavrl.parallel.distributed import init_distributed
        from megavrl.rl.actor import MegatronActor

        init_distributed(tp=tp, pp=1)
        opt = OptimizerConfig(lr=LR, weight_decay=ADAM["weight_decay"], adam_beta1=ADAM["betas"][0],
                              adam_beta2=ADAM["betas"][1], adam_eps=ADAM["eps"], clip_grad=CLIP_GRAD)
        self.actor = MegatronActor(str(hf_dir), tp=tp, pp=1, dtype="float32", optimizer_config=opt,
                                   total_steps=steps_hint)
        self.batches = batches
        self.seq_len = batches[0]["input_ids"].shape[1]
        self.loss_fn = token_mean_ce(int(sum(b["loss_mask"].sum() for b in batches)))

    def step(self) -> float:
        result = self.actor.train_step(self.batches, self.seq_len, self.loss_fn)
        assert result.applied, result
        return result.metrics["loss"]


class TransformersSide:
    name = "transformers + torch.optim.AdamW"

    def __init__(self, hf_dir: Path, batches: list[dict]):
        from transformers import Qwen2_5_VLForConditionalGeneration

        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=LR, **ADAM)
        self.batches = batches
        self.num_tokens = int(sum(b["loss_mask"].sum() for b in batches))
        self.attn = self.model.config._attn_implementation

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for b in self.batches:
            self.model.model.rope_deltas = None
            vision = {k: b[k] for k in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts") if k in b}
            logits = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                position_ids=b["position_ids"], use_cache=False, **vision).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).gather(-1, b["labels"][..., None]).squeeze(-1)
            loss = -(logprobs * b["loss_mask"]).sum() / self.num_tokens
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.params, CLIP_GRAD)
        self.opt.step()
        return total


def time_alternating(sides: list, warmup: int, steps: int) -> tuple[list[list[float]], list[list[float]], list[float]]:
    """Wall-clock and CPU seconds (all threads of this process) per step of each side, rounds
    alternating; also each side's first loss. CPU seconds hardly depend on what else the machine
    runs, wall-clock seconds do."""
    first_loss = [side.step() for side in sides]
    for _ in range(warmup - 1):
        for side in sides:
            side.step()
    seconds, cpu = [[] for _ in sides], [[] for _ in sides]
    for _ in range(steps):
        for i, side in enumerate(sides):
            t0, c0 = time.perf_counter(), time.process_time()
            side.step()
            seconds[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
    return seconds, cpu, first_loss


# ------------------------------------------------------------------------------------ TP=2 worker


def tp_worker(args) -> None:
    """Under torchrun: time the actor at --worker-tp; global rank 0 writes --worker-out (JSON)."""
    hf_dir, data_dir = Path(args.worker_hf_dir), Path(args.worker_data_dir)
    batches, _ = make_batch(hf_dir, data_dir, args.sequences, args.seq_len, args.micro_batch_size, args.fps)
    side = MegatronSide(hf_dir, batches, tp=args.worker_tp, steps_hint=args.warmup + args.steps + 1)
    (seconds,), (cpu,), (loss,) = time_alternating([side], args.warmup, args.steps)
    every: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(every, cpu)
    if torch.distributed.get_rank() == 0:
        Path(args.worker_out).write_text(json.dumps({"seconds": seconds, "cpu_seconds": [sum(x) for x in zip(*every)],
                                                     "first_loss": loss, "threads": torch.get_num_threads()}))


def run_tp2(args, hf_dir: Path, data_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="megavrl-bench-actor-tp2-") as tmp:
        out = Path(tmp) / "tp2.json"
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "bench.bench_actor_step", "--worker-tp", "2", "--worker-out", str(out),
               "--worker-hf-dir", str(hf_dir), "--worker-data-dir", str(data_dir),
               "--sequences", str(args.sequences), "--seq-len", str(args.seq_len),
               "--micro-batch-size", str(args.micro_batch_size), "--fps", str(args.fps),
               "--warmup", str(args.warmup), "--steps", str(args.steps)]
        subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parent.parent)
        return json.loads(out.read_text())


# ------------------------------------------------------------------------------------ CPU bench


def bench_cpu(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    figures, config = [], {**{k: v for k, v in vars(args).items() if not k.startswith("worker")},
                           "lr": LR, **ADAM, "clip_grad": CLIP_GRAD, "dtype": "float32"}
    with tempfile.TemporaryDirectory(prefix="megavrl-bench-actor-") as tmp:
        data_dir = Path(tmp) / "data"
        for preset in args.preset:
            hf_dir = make_model(Path(tmp) / preset, preset)
            batches, info = make_batch(hf_dir, data_dir, args.sequences, args.seq_len, args.micro_batch_size,
                                       args.fps)
            tokens = args.sequences * args.seq_len
            megatron = MegatronSide(hf_dir, batches, steps_hint=args.warmup + args.steps + 1)
            hf = TransformersSide(hf_dir, batches)
            n_params = sum(p.numel() for p in hf.params)
            (mg_s, hf_s), (mg_cpu, hf_cpu), (mg_loss, hf_loss) = time_alternating([megatron, hf], args.warmup,
                                                                                   args.steps)
            print(f"[{preset}] step-1 loss: megatron {mg_loss:.5f}, transformers {hf_loss:.5f}", flush=True)
            notes = {"preset": preset, "parameters": n_params, "tokens_per_step": tokens, **info,
                     "torch_threads": torch.get_num_threads(), "transformers_attention": hf.attn,
                     "step1_loss": {"megatron": mg_loss, "transformers": hf_loss},
                     "seconds_per_step": {"megatron": mg_s, "transformers": hf_s},
                     "median_tokens_per_s": {"megatron": tokens / statistics.median(mg_s),
                                             "transformers": tokens / statistics.median(hf_s)},
                     "cpu_seconds_per_step": {"megatron": mg_cpu, "transformers": hf_cpu},
                     "tokens_per_cpu_second": {"megatron": tokens / min(mg_cpu), "transformers": tokens / min(hf_cpu)}}
            kind = "text only" if args.fps <= 0 else f"video {info['video_tokens']} tokens"
            figures.append(Figure(f"actor step tokens/s, {preset} ({n_params / 1e6:.1f}M params), {kind}, TP=1",
                                  tokens / min(mg_s), tokens / min(hf_s), "tokens/s",
                                  baseline_name="transformers + AdamW", notes=notes))
            if args.tp2:
                del megatron
                tp2 = run_tp2(args, hf_dir, data_dir)
                figures.append(Figure(f"actor step tokens/s, {preset}, {kind}, TP=2 (2 processes x 1 thread)",
                                      tokens / min(tp2["seconds"]), tokens / min(hf_s), "tokens/s",
                                      baseline_name="transformers + AdamW (1 process, "
                                                    f"{torch.get_num_threads()} threads)",
                                      notes={"preset": preset, "step1_loss": tp2["first_loss"],
                                             "seconds_per_step": tp2["seconds"],
                                             "median_tokens_per_s": tokens / statistics.median(tp2["seconds"]),
                                             "cpu_seconds_per_step": tp2["cpu_seconds"],
                                             "tokens_per_cpu_second": tokens / min(tp2["cpu_seconds"])}))
            del hf
    name = "actor_step" if args.preset == ["small"] else "actor_step_" + "_".join(args.preset)
    name += "_text_only" if args.fps <= 0 else ""
    name += f"_{args.threads}thread" if args.threads else ""
    write_result(name, figures, config=config)


# ------------------------------------------------------------------------------------ GPU bench

# The shapes (GPU_SHAPES: the published 3B and 7B config.json dicts, and "tiny") and their cut to fewer
# layers are those of the GPU check (megavrl.checks.gpu), one table for both.
# The reference recipe (examples/configs/qwen2_5_vl_{3b,7b}_tvg.yaml, after Li et al., 2025) samples
# videos at 2 fps with a 2048-visual-token budget per video and answers in up to 2048 tokens: about
# half of a sequence is video. Its Charades frames (360x480, videos of 16 s or more) are resized to
# the per-frame floor of 128 * 28 * 28 pixels: 280x364, 10x13 = 130 merged tokens per temporal patch.
VIDEO_FPS = 2.0
DEFAULT_VIDEO_SHARE = 0.5
DEFAULT_FRAME_SIZE = (280, 364)
# Text of the prompt around the video (tokens): the chat header before it; the grounding question and
# the assistant header after it. Stand-ins of about the recipe's lengths, random ordinary tokens.
PROMPT_TEXT_TOKENS = (20, 60)


def video_frame_count(seq_len: int, video_share: float, frame_size: tuple[int, int], vision: dict) -> int:
    """Frames of the benchmark video: the multiple of the temporal patch size whose merged tokens
    (``frames / temporal_patch * (H / 28) * (W / 28)`` for Qwen2.5-VL) come nearest to
    ``video_share * seq_len``, at least one temporal patch; 0 when video_share is 0.

    frame_size: (H, W) pixels, multiples of patch_size * spatial_merge_size."""
    if video_share <= 0:
        return 0
    unit = vision["patch_size"] * vision["spatial_merge_size"]
    height, width = frame_size
    if height % unit or width % unit:
        raise ValueError(f"--gpu-frame-size {height} {width}: both must be multiples of {unit} (patch_size * "
                         "spatial_merge_size)")
    per_temporal_patch = (height // unit) * (width // unit)
    return max(1, round(video_share * seq_len / per_temporal_patch)) * vision["temporal_patch_size"]


def gpu_micro_batch(cfg: dict, seq_len: int, video_share: float, frame_size: tuple[int, int],
                    seed: int = 0) -> tuple[dict, dict]:
    """One collated sequence of exactly ``seq_len`` tokens (batch of 1) and a description of it.

    The sequence is a video prompt as the data pipeline builds it: PROMPT_TEXT_TOKENS[0] text tokens,
    ``<|vision_start|>``, one ``<|video_pad|>`` per merged patch, ``<|vision_end|>``,
    PROMPT_TEXT_TOKENS[1] text tokens; then a random response up to ``seq_len`` (the loss tokens).
    The video: megavrl.data.synth frames of ``frame_size`` pixels (video_frame_count of them, at
    VIDEO_FPS), patchified by megavrl.data.preprocess; M-RoPE ids from get_rope_index (the actor's
    "qwen" convention). video_share 0: the same prompt without the video (text only).

    Returns (batch, info): batch as megavrl.rl.batch.collate makes it (CPU tensors); info holds
    video_frames, frame_size, video_grid_thw ((t, h, w) patches, or None), video_tokens,
    prompt_text_tokens, response_tokens (all per sequence).
    """
    import numpy as np

    from megavrl.data.preprocess import VisionSpec, preprocess_video
    from megavrl.data.synth import DIFFICULTIES, plan_events, render_frames
    from megavrl.models.qwen2_5_vl.rope_index import get_rope_index
    from megavrl.rl.batch import TrainSequence, collate

    vision_cfg = cfg["vision_config"]
    # Ordinary tokens only (below the first special token): none is taken for a vision slot.
    first_special = first_special_id(cfg)
    gen = torch.Generator().manual_seed(seed)

    def text(n: int) -> torch.Tensor:
        return torch.randint(0, first_special, (n,), generator=gen)

    before, after = PROMPT_TEXT_TOKENS
    frames = video_frame_count(seq_len, video_share, frame_size, vision_cfg)
    vision, positions, grid, video_tokens = {}, {}, None, 0
    if frames == 0:
        prompt = torch.cat([text(before), text(after)])
    else:
        height, width = frame_size
        rng = np.random.default_rng(seed)
        level = DIFFICULTIES["easy"]
        pixels = render_frames(plan_events(rng, frames, width, height, level), frames, width, height, level, rng)
        spec = VisionSpec(patch_size=vision_cfg["patch_size"], temporal_patch_size=vision_cfg["temporal_patch_size"],
                          merge_size=vision_cfg["spatial_merge_size"])
        video = preprocess_video(torch.from_numpy(pixels).permute(0, 3, 1, 2), VIDEO_FPS, spec)
        grid = tuple(int(x) for x in video.video_grid_thw[0])
        video_tokens = grid[0] * grid[1] * grid[2] // spec.merge_size ** 2
        prompt = torch.cat([text(before), torch.tensor([cfg["vision_start_token_id"]]),
                            torch.full((video_tokens,), cfg["video_token_id"]),
                            torch.tensor([cfg["vision_end_token_id"]]), text(after)])
        ids, delta = get_rope_index(prompt[None], video_grid_thw=video.video_grid_thw,
                                    second_per_grid_ts=video.second_per_grid_ts, image_token_id=cfg["image_token_id"],
                                    video_token_id=cfg["video_token_id"], spatial_merge_size=spec.merge_size,
                                    tokens_per_second=vision_cfg["tokens_per_second"], convention="qwen")
        vision = {"pixel_values_videos": video.pixel_values_videos, "video_grid_thw": video.video_grid_thw,
                  "second_per_grid_ts": video.second_per_grid_ts}
        positions = {"prompt_position_ids": ids[:, 0], "rope_delta": int(delta[0, 0])}
    if len(prompt) >= seq_len:
        raise ValueError(f"a prompt of {len(prompt)} tokens ({video_tokens} video tokens: {frames} frames of "
                         f"{frame_size[0]}x{frame_size[1]} px) leaves no response in a sequence of {seq_len} "
                         "tokens: lower --gpu-video-share or --gpu-frame-size, or raise --gpu-seq-lens")
    seq = TrainSequence(input_ids=torch.cat([prompt, text(seq_len - len(prompt))]), prompt_len=len(prompt),
                        vision=vision, **positions)
    info = {"video_frames": frames, "frame_size": list(frame_size) if frames else None,
            "video_grid_thw": grid, "video_tokens": video_tokens,
            "prompt_text_tokens": len(prompt) - video_tokens, "response_tokens": seq.response_len}
    return collate([seq], pad_id=0, seq_len=seq_len), info


# ---------------------------------------------------------------- the GPU run


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_train_steps(actor, micro_batches: list[dict], seq_len: int, warmup: int, steps: int) -> float:
    """Seconds per ``actor.train_step`` over ``micro_batches``, the mean of ``steps`` after ``warmup``."""
    loss_fn = token_mean_ce(int(sum(b["loss_mask"].sum() for b in micro_batches)))
    for _ in range(warmup):
        actor.train_step(micro_batches, seq_len, loss_fn)
    _synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        result = actor.train_step(micro_batches, seq_len, loss_fn)
        assert result.applied, result
    _synchronize()
    return (time.perf_counter() - t0) / steps


def bench_gpu(args) -> None:
    from megavrl.config import OptimizerConfig
    from megavrl.parallel.distributed import init_distributed
    from megavrl.rl.actor import MegatronActor

    cuda = torch.cuda.is_available()  # False: --gpu on a CPU machine, a dry run of this code path
    device = "cuda" if cuda else "cpu"
    init_distributed(tp=1, pp=1)
    with_video = args.gpu_video_share > 0
    # As the reference recipe: the vision encoder frozen, the merger (projector) and the LM train.
    # Text only: nothing of the tower runs, so all of it is frozen (no Adam state).
    train_encoder, train_merger = with_video and args.gpu_train_vision, with_video
    figures = []
    for shape in args.gpu_shapes:
        cfg = gpu_model_config(shape, args.gpu_num_layers, args.gpu_vision_depth)
        layers, depth = cfg["num_hidden_layers"], cfg["vision_config"]["depth"]
        inputs = {s: gpu_micro_batch(cfg, s, args.gpu_video_share, tuple(args.gpu_frame_size))
                  for s in args.gpu_seq_lens}
        for recompute in (False, True):
            with tempfile.TemporaryDirectory(prefix="megavrl-bench-mfu-") as tmp:
                (Path(tmp) / "config.json").write_text(json.dumps(cfg))
                actor = MegatronActor(tmp, tp=1, pp=1, dtype=args.gpu_dtype, recompute=recompute,
                                      freeze_vision=not train_encoder, freeze_projector=not train_merger,
                                      optimizer_config=OptimizerConfig(lr=LR), total_steps=1000, random_init=True)
            for seq_len, (batch, info) in inputs.items():
                n_seq = max(1, args.gpu_tokens_per_step // seq_len)
                mb = {k: v.to(device) for k, v in batch.items()}
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                try:
                    seconds = time_train_steps(actor, [mb] * n_seq, seq_len, args.warmup, args.steps)
                except torch.OutOfMemoryError:
                    print(f"[{shape}] seq {seq_len} recompute={recompute}: out of GPU memory, skipped", flush=True)
                    torch.cuda.empty_cache()
                    continue
                flops = actor_step_flops(cfg, n_seq, seq_len, info["video_grid_thw"], train_encoder=train_encoder,
                                         train_merger=train_merger)
                achieved = flops.total / seconds / 1e12
                kind = (f"video {info['video_tokens']}/{seq_len} tokens ({depth} vision blocks, "
                        f"{'trained' if train_encoder else 'frozen'})" if with_video else "text only")
                figures.append(Figure(
                    f"MFU {shape} ({layers} LM layers), seq {seq_len}, {kind}, "
                    f"recompute {'on' if recompute else 'off'}",
                    100 * achieved / args.peak_tflops, 50.0, "% MFU", baseline_name="DESIGN.md target",
                    notes={"tflops": achieved, "peak_tflops": args.peak_tflops, "seconds_per_step": seconds,
                           "recompute": recompute, "sequences_per_step": n_seq, "seq_len": seq_len,
                           "tokens_per_s": n_seq * seq_len / seconds, **info,
                           "text_tokens": seq_len - info["video_tokens"],
                           "model_tflops_per_step": {"language": flops.language / 1e12, "vision": flops.vision / 1e12},
                           "vision_flops_share": flops.vision_share,
                           "lm_layers": layers, "vision_depth": depth,
                           "vision_encoder": "trained" if train_encoder else "frozen",
                           "vision_merger": "trained" if train_merger else "frozen",
                           "lm_matmul_params": lm_matmul_params(cfg),
                           "vision_encoder_params": vision_encoder_params(cfg["vision_config"]),
                           "dtype": args.gpu_dtype,
                           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}))
            del actor
            if cuda:
                torch.cuda.empty_cache()
    name = "actor_step_gpu_mfu"
    if args.gpu_shapes != PUBLISHED_SHAPES:
        name += "_" + "_".join(s.removeprefix("Qwen2.5-VL-") for s in args.gpu_shapes)
    name += "" if with_video else "_text_only"
    write_result(name, figures, config={**{k: v for k, v in vars(args).items() if k.startswith("gpu")},
                                        "peak_tflops": args.peak_tflops, "warmup": args.warmup, "steps": args.steps,
                                        "video_fps": VIDEO_FPS, "prompt_text_tokens": list(PROMPT_TEXT_TOKENS),
                                        "formula": FLOPS_FORMULA})



# ------------------------------------------------------------------------------------ main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", nargs="+", default=["small"], choices=["tiny", "small"],
                    help="small (default): ~30M params, matmul-bound like real sizes; tiny: megavrl's 4M debug "
                         "model, bound by per-op overheads")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--fps", type=float, default=2.0,
                    help="video frames per second sampled (8 s videos); 0: text-only sequences")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads of the TP=1 comparison (0: torch's default, the cores)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tp2", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the actor at TP=2 under torchrun (default on)")
    ap.add_argument("--gpu", action="store_true", help="GPU MFU mode (default when CUDA is available)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    ap.add_argument("--gpu-seq-lens", type=int, nargs="+", default=[2048, 4096, 8192])
    ap.add_argument("--gpu-tokens-per-step", type=int, default=16384)
    ap.add_argument("--gpu-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--gpu-num-layers", type=int, default=8,
                    help="decoder layers built (default 8: bf16 weights + fp32 grads, master copies and Adam state "
                         "of the 7B fit one 80 GB GPU; 0: the published depth)")
    ap.add_argument("--gpu-shapes", nargs="+", default=PUBLISHED_SHAPES, choices=list(GPU_SHAPES),
                    help="model shapes (tiny: debug sizes, a dry run of this mode on a CPU in seconds)")
    ap.add_argument("--gpu-video-share", type=float, default=DEFAULT_VIDEO_SHARE,
                    help="video tokens as a share of each sequence (default 0.5, as the reference recipe: a "
                         "2048-token video budget, up to 2048 response tokens); 0: text only, tower idle")
    ap.add_argument("--gpu-frame-size", type=int, nargs=2, default=list(DEFAULT_FRAME_SIZE), metavar=("H", "W"),
                    help="video frame size in pixels, multiples of 28 (default 280 364: 130 merged tokens "
                         "per 2 frames, the recipe's 360x480 frames at its per-frame floor of 128*28*28 pixels)")
    ap.add_argument("--gpu-vision-depth", type=int, default=8,
                    help="vision blocks built (default 8: the published pattern of 7 window blocks then a "
                         "full-attention one, in about the published ratio to --gpu-num-layers 8; 0: all 32)")
    ap.add_argument("--gpu-train-vision", action="store_true",
                    help="train the vision encoder too (default: frozen, forward only, as the recipe)")
    ap.add_argument("--results-dir", help="where the result file goes (default bench/results)")
    ap.add_argument("--worker-tp", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--worker-hf-dir", help=argparse.SUPPRESS)
    ap.add_argument("--worker-data-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.results_dir:
        import bench.common

        bench.common.RESULTS = Path(args.results_dir)  # write_result reads it at call time
    if args.worker_tp:
        tp_worker(args)
    elif args.gpu or torch.cuda.is_available():
        bench_gpu(args)
    else:
        keep_freed_memory()  # both sides, and the TP=2 workers (through the environment)
        bench_cpu(args)


if __name__ == "__main__":
    main()
