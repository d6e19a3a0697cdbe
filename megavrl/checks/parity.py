"""Logit parity of the Megatron Qwen2.5-VL against transformers, at any (TP, PP) layout.

``check_parity(hf_dir, tp, pp)`` (every rank calls it, under torchrun for tp * pp > 1) loads the
HF directory twice, into transformers (fp32, eager attention, on every rank) and into the sharded
Megatron model, and runs the same inputs through both. The inputs are built by the HF processor
of the directory, batch of 2 with left padding: text-only prompts, image prompts (1 and 2
images), video prompts (frames of a given video decoded with decord, or synthetic frames), and a
mixed batch (image + video in one row, video in the other). Logits are compared on real (not
padded) tokens over the real vocabulary; the vision tower's merged embeddings are compared on the
first stage. The CLI is ``megavrl check-parity`` (:mod:`megavrl.commands.check_parity`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from megavrl.log import get_logger

log = get_logger(__name__)

KINDS = ("text", "image", "video", "mixed")
_PROMPTS = ("what happens in the video", "describe the shape and its color then give the answer in seconds")


def _frames(video: str | os.PathLike | None, n: int, seed: int) -> np.ndarray:
    """[n, H, W, 3] uint8 frames: n frames sampled uniformly from ``video``, or synthetic ones."""
    if video is not None:
        import decord

        reader = decord.VideoReader(str(video))
        idx = np.linspace(0, len(reader) - 1, n).round().astype(int).tolist()
        return reader.get_batch(idx).asnumpy()
    rng = np.random.default_rng(seed)
    frames = np.zeros((n, 56, 84, 3), np.uint8) + rng.integers(0, 60, (1, 1, 1, 3), dtype=np.uint8)
    for i in range(n):  # a bright square that moves, over low-amplitude noise
        frames[i] += rng.integers(0, 30, frames.shape[1:], dtype=np.uint8)
        x = 4 + 8 * i
        frames[i, 10:30, x:x + 20] = (230, 40, 40)
    return frames


def _image(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def build_parity_batches(hf_dir: str | os.PathLike, kinds=KINDS, video: str | os.PathLike | None = None,
                         ) -> dict[str, dict]:
    """Processor outputs (batch 2, left-padded) for each kind, as plain dicts of tensors."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(hf_dir)
    processor.tokenizer.padding_side = "left"

    def chat(parts):
        return processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                             tokenize=False)

    def text(t):
        return {"type": "text", "text": t}

    image, video_part = {"type": "image"}, {"type": "video"}
    batches = {}
    for kind in kinds:
        images, videos = None, None
        if kind == "text":
            texts = [chat([text(_PROMPTS[0])]), chat([text(_PROMPTS[1])])]
        elif kind == "image":
            texts = [chat([image, text(_PROMPTS[0])]), chat([text("compare"), image, text("and"), image,
                                                             text(_PROMPTS[1])])]
            images = [_image(1, 56, 84), _image(2, 84, 56), _image(3, 56, 56)]
        elif kind == "video":
            texts = [chat([video_part, text(_PROMPTS[1])]), chat([text(_PROMPTS[0]), video_part])]
            videos = [_frames(video, 4, 1), _frames(video, 2, 2)]
        elif kind == "mixed":
            texts = [chat([image, text("and"), video_part, text(_PROMPTS[0])]), chat([video_part, text("ok")])]
            images, videos = [_image(4, 56, 84)], [_frames(video, 4, 3), _frames(video, 2, 4)]
        else:
            raise ValueError(f"unknown parity input kind {kind!r}; choose from {KINDS}")
        kwargs = {}
        if videos is not None:
            kwargs["videos"] = [torch.from_numpy(v).permute(0, 3, 1, 2) for v in videos]
            kwargs["videos_kwargs"] = {"do_sample_frames": False}
        out = processor(text=texts, images=images, padding=True, return_tensors="pt", **kwargs)
        batches[kind] = {k: v for k, v in out.items() if torch.is_tensor(v)}
    return batches


def hf_logits(hf_model, batch: dict) -> torch.Tensor:
    """transformers' logits [B, S, V]; text-only rows get padding-aware positions as Megatron does
    (transformers would count pads in when no image/video is present)."""
    inputs = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    has_vision = "pixel_values" in batch or "pixel_values_videos" in batch
    if has_vision:
        inputs["mm_token_type_ids"] = batch["mm_token_type_ids"]
    else:
        inputs["position_ids"], _ = hf_model.model.get_rope_index(
            batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"], attention_mask=batch["attention_mask"])
    hf_model.model.rope_deltas = None
    with torch.no_grad():
        return hf_model(**inputs).logits


def _vision_diff(hf_model, model, batch: dict) -> float:
    worst = 0.0
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if pixels not in batch:
            continue
        with torch.no_grad():
            ref = hf_model.model.visual(batch[pixels], grid_thw=batch[grid]).pooler_output
            got = model.vision_model(batch[pixels], batch[grid])
        worst = max(worst, (ref - got).abs().max().item())
    return worst


def check_parity(hf_dir: str | os.PathLike, tp: int = 1, pp: int = 1, video: str | os.PathLike | None = None,
                 kinds=KINDS, ckpt: str | os.PathLike | None = None) -> dict | None:
    """Run the comparison on this rank (all ranks must call it). Returns the report on global
    rank 0 (None elsewhere): overall and per-kind max/mean |logit diff|, argmax agreement (fraction of
    real tokens whose top token agrees) and the vision tower's max |diff|.

    ckpt: a megavrl Megatron checkpoint (converter output, step directory or root) to load the
    Megatron model from instead of ``hf_dir``'s safetensors; transformers still loads ``hf_dir``."""
    import torch.distributed as dist
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megavrl.checkpoint.hf_io import load_hf_weights
    from megavrl.models.qwen2_5_vl.config import build_configs
    from megavrl.models.qwen2_5_vl.model import Qwen2_5_VLModel, pipeline_forward
    from megavrl.parallel import init_distributed

    layout = init_distributed(tp=tp, pp=pp)
    configs = build_configs(hf_dir, tp=tp, pp=pp)
    model = Qwen2_5_VLModel(configs, rope_convention="transformers").eval()  # the reference's positions
    if ckpt is not None:
        from megavrl.checkpoint.convert import load_megatron_weights

        load_megatron_weights(model, ckpt)
    else:
        load_hf_weights(model, hf_dir)
    hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
    batches = build_parity_batches(hf_dir, kinds, video)
    vocab = configs.vocab_size
    per_kind = {}
    stats = torch.zeros(5, dtype=torch.float64)  # max diff, sum diff, compared logits, tokens, agreeing
    vision_worst = 0.0
    for kind, batch in batches.items():
        logits = pipeline_forward(model, batch, gather_vocab=True)
        if model.pre_process and kind != "text":
            vision_worst = max(vision_worst, _vision_diff(hf_model, model, batch))
        if logits is None:
            continue
        ref = hf_logits(hf_model, batch)
        real = batch["attention_mask"].bool()
        diff = (logits[..., :vocab] - ref).abs()[real]
        agree = (logits[..., :vocab].argmax(-1) == ref.argmax(-1))[real]
        per_kind[kind] = {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item(),
                          "argmax_agreement": agree.float().mean().item(), "tokens": int(real.sum())}
        stats += torch.tensor([0.0, diff.sum().item(), diff.numel(), agree.numel(), agree.sum().item()],
                              dtype=torch.float64)
        stats[0] = max(stats[0].item(), diff.max().item())
    # Rank 0 (first stage) reports; the last stage holds the logits, the first the vision tower.
    payload = [per_kind, stats.tolist(), vision_worst]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, payload)
    if layout.rank != 0:
        return None
    kinds_report, totals, vision = {}, [0.0] * 5, 0.0
    for rank_kinds, rank_stats, rank_vision in gathered:
        if rank_kinds and not kinds_report:  # one last-stage rank suffices (TP ranks agree)
            kinds_report, totals = rank_kinds, rank_stats
        vision = max(vision, rank_vision)
    return {"max_abs_logit_diff": totals[0], "mean_abs_logit_diff": totals[1] / max(totals[2], 1),
            "argmax_agreement": totals[4] / max(totals[3], 1), "vision_max_abs_diff": vision,
            "tp": tp, "pp": pp, "hf_dir": str(Path(hf_dir)), **({"ckpt": str(Path(ckpt))} if ckpt else {}),
            "per_kind": kinds_report}


def main(argv: list[str] | None = None) -> int:
    """Entry point of one worker: ``python -m megavrl.checks.parity --hf-dir D --tp T --pp P``."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--video", default=None)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--tolerance", type=float, default=None)
    p.add_argument("--ckpt", default=None)
    args = p.parse_args(argv)
    return run_worker(args.hf_dir, args.tp, args.pp, args.video, tuple(args.kinds.split(",")), args.tolerance,
                      args.ckpt)


def run_worker(hf_dir, tp, pp, video=None, kinds=KINDS, tolerance=None, ckpt=None) -> int:
    """One rank of ``check-parity``: prints the JSON line on rank 0; exit code 1 when a tolerance
    is given and exceeded (or argmax agreement is below 100%)."""
    from megavrl.parallel import destroy_distributed

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, tp * pp)))
    report = check_parity(hf_dir, tp, pp, video, kinds, ckpt)
    failed = False
    if report is not None:
        print(json.dumps(report), flush=True)
        if tolerance is not None:
            failed = report["max_abs_logit_diff"] > tolerance or report["argmax_agreement"] < 1.0
    destroy_distributed()
    return 1 if failed else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
