"""The one-command GPU check: bf16 logit parity with transformers, then a packed Megatron train step
on the 3B and 7B shapes, each reported as one JSON line (``tools/gpu_check.sh`` runs it).

    python -m megavrl.checks.gpu                 # one GPU: real shapes, bf16 (a few minutes)
    python -m megavrl.checks.gpu --dry-run       # CPU: the same code on the "tiny" shape (seconds)

Lines, in order (every one has ``check`` and ``device``):

- ``parity``: a random Qwen2.5-VL of the 7B shape cut to PARITY_LM_LAYERS decoder layers and
  PARITY_VISION_DEPTH vision blocks (the first full-attention block included) is written as a HF
  directory (bf16 safetensors), loaded by transformers and by megavrl's Megatron model (the one
  HF<->Megatron mapping, :func:`megavrl.checkpoint.hf_io.load_hf_weights`), and both score the same
  image prompt in bf16. Reported: max / mean |logit diff| between them. The bar is bf16's own
  rounding, measured rather than assumed: transformers in fp32 on the same (bf16-exact) weights is
  the exact answer, and Megatron-bf16 passes when its max and mean distance to that answer are at
  most BF16_TOLERANCE_FACTOR times those of transformers-bf16 (bf16 keeps 8 significant bits,
  about 2-3 decimal digits; two bf16 implementations that round in different places each land
  about that far from the exact logits, so a factor of a few separates rounding from a wrong weight,
  which moves the logits by the weights' own scale).
- ``train_step``, per shape (3B, 7B cut to TRAIN_LM_LAYERS decoder layers): ``MegatronActor.train_step``
  (Megatron DDP, bf16 weights with fp32 grads, master copies and Adam, local or Transformer Engine
  layers) on one packed micro-batch of ``--tokens`` tokens (4 text sequences laid end to end by
  :func:`megavrl.rl.micro_batches.rank_micro_batches` with ``packing`` and a token budget, the
  trainer's path), ``--warmup`` untimed steps then ``--steps`` timed ones: tokens/s, model FLOPs
  (:mod:`megavrl.models.qwen2_5_vl.flops`), MFU against the device's dense bf16 peak
  (BF16_PEAK_TFLOPS; null for an unknown device or the CPU), peak memory.
- ``summary``: ok when parity passed and every train step finished; the exit status says the same.

Sizes: 8 layers of the 7B hold ~3.0B trained parameters (8 x 233M decoder layers, 545M embedding,
545M output layer); 18 bytes each (bf16 weight, fp32 grad, master copy and two Adam moments) is
~53 GB before activations, which fits one 80 GB H100 or a 141 GB H200.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

# Sizes of the published Qwen2.5-VL-{3B,7B}-Instruct config.json files (one vision tower for both,
# its out_hidden_size = the LM width), and "tiny": debug sizes with the same vision geometry (patch,
# merge, window) and its own special-token ids, so that a dry run takes seconds on a CPU.
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
               spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
               tokens_per_second=2, in_chans=3, hidden_act="silu")
_COMMON = dict(model_type="qwen2_5_vl", architectures=["Qwen2_5_VLForConditionalGeneration"], hidden_act="silu",
               max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1000000.0,
               rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, bos_token_id=151643,
               eos_token_id=151645, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
               vision_end_token_id=151653, torch_dtype="bfloat16")
GPU_SHAPES = {
    "Qwen2.5-VL-3B": dict(_COMMON, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                          vision_config=dict(_VISION, out_hidden_size=2048)),
    "Qwen2.5-VL-7B": dict(_COMMON, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
                          vision_config=dict(_VISION, out_hidden_size=3584)),
    "tiny": dict(_COMMON, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=2048, tie_word_embeddings=False,
                 rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]}, bos_token_id=2000, eos_token_id=2001,
                 vision_start_token_id=2002, vision_end_token_id=2003, image_token_id=2004, video_token_id=2005,
                 vision_config=dict(_VISION, depth=4, hidden_size=64, intermediate_size=128, num_heads=2,
                                    fullatt_block_indexes=[3], out_hidden_size=128)),
}
PUBLISHED_SHAPES = ["Qwen2.5-VL-3B", "Qwen2.5-VL-7B"]
SPECIAL_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "vision_start_token_id", "vision_end_token_id",
                      "image_token_id", "video_token_id")

# Dense bf16 peak (TFLOP/s, no sparsity) by a piece of torch.cuda.get_device_name(); first match wins.
BF16_PEAK_TFLOPS = (("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
                    ("A100", 312.0))

PARITY_SHAPE = "Qwen2.5-VL-7B"
PARITY_LM_LAYERS = 2
PARITY_VISION_DEPTH = 8  # blocks 0-6 window attention, block 7 full attention, as published
PARITY_GRID = (1, 16, 16)  # image patches (t, h, w): 64 merged tokens, wider than one 112-px window
BF16_TOLERANCE_FACTOR = 3.0
# The negative control's target: one decoder layer's MLP output projection.
PERTURBED_WEIGHT = "language_model.decoder.layers.0.mlp.linear_fc2.weight"
TRAIN_LM_LAYERS = 8
TRAIN_VISION_DEPTH = 8
TRAIN_TOKENS = 4096
SEQUENCE_SHARES = (3, 2, 2, 1)  # the packed sequences' lengths, as parts of the row
LR = 1e-5


def gpu_model_config(shape: str, num_layers: int = 0, vision_depth: int = 0) -> dict:
    """The config.json dict of ``shape`` (a GPU_SHAPES key) cut to its first ``num_layers`` decoder
    layers and ``vision_depth`` vision blocks (0 or more than published: all of them). Full-attention
    vision blocks beyond the cut go with it (depth 8 keeps one: 7 window blocks, then block 7)."""
    cfg = dict(GPU_SHAPES[shape])
    vision = dict(cfg["vision_config"])
    if num_layers:
        cfg["num_hidden_layers"] = min(num_layers, cfg["num_hidden_layers"])
    if vision_depth:
        vision["depth"] = min(vision_depth, vision["depth"])
        vision["fullatt_block_indexes"] = [i for i in vision["fullatt_block_indexes"] if i < vision["depth"]]
    cfg["vision_config"] = vision
    return cfg


def first_special_id(cfg: dict) -> int:
    """Ids below this are ordinary text tokens: none is taken for a vision slot."""
    return min(cfg[k] for k in SPECIAL_TOKEN_KEYS)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device named as torch.cuda.get_device_name() names it; None if unknown."""
    for piece, tflops in BF16_PEAK_TFLOPS:
        if piece in device_name:
            return tflops
    return None


def _device() -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device()), torch.cuda.get_device_name()
    return torch.device("cpu"), "cpu"


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _layer_spec() -> str:
    from megavrl.parallel.distributed import transformer_engine_available

    return "transformer_engine" if transformer_engine_available() else "local"


# ------------------------------------------------------------------------------ parity


def write_random_hf_model(cfg: dict, out: Path, seed: int = 0) -> Path:
    """A HF directory of ``cfg`` (config.json dict) with transformers' random initialisation, saved
    in bf16 (the published checkpoints' dtype) with the published tensor names."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from megavrl.checkpoint.mapping import HF_OUTPUT, to_published

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    config = AutoConfig.from_pretrained(out)
    torch.manual_seed(seed)
    with torch.device(_device()[0]):  # initialised where it runs: seconds, not minutes, for 1.6B weights
        model = Qwen2_5_VLForConditionalGeneration(config)
    state = {to_published(k): v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop(HF_OUTPUT, None)
    del model
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def image_prompt(cfg: dict, text_tokens: int, grid_thw: tuple[int, int, int] = PARITY_GRID,
                 seed: int = 0) -> dict:
    """One row (batch 1, no padding): text, an image of ``grid_thw`` patches (random pixels), text;
    ``text_tokens`` ordinary tokens in all. Keys as the HF processor gives them, so
    :func:`megavrl.checks.parity.hf_logits` and the Megatron model take it alike."""
    vision = cfg["vision_config"]
    gen = torch.Generator().manual_seed(seed)
    t, h, w = grid_thw
    image_tokens = t * h * w // vision["spatial_merge_size"] ** 2
    before = text_tokens // 3
    ids = torch.cat([torch.randint(0, first_special_id(cfg), (before,), generator=gen),
                     torch.tensor([cfg["vision_start_token_id"]]), torch.full((image_tokens,), cfg["image_token_id"]),
                     torch.tensor([cfg["vision_end_token_id"]]),
                     torch.randint(0, first_special_id(cfg), (text_tokens - before,), generator=gen)])[None]
    patch_dim = vision["in_chans"] * vision["temporal_patch_size"] * vision["patch_size"] ** 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == cfg["image_token_id"]).long(),  # 1: image, as the processor marks it
            "pixel_values": torch.randn(t * h * w, patch_dim, generator=gen),
            "image_grid_thw": torch.tensor([grid_thw])}


def _transformers_logits(hf_dir: Path, batch: dict, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megavrl.checks.parity import hf_logits

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).to(device).eval()
    logits = hf_logits(model, batch).float()
    del model
    _release_memory()
    return logits


def _megatron_logits(hf_dir: Path, batch: dict, dtype: torch.dtype, perturb: bool) -> torch.Tensor:
    from megavrl.checkpoint.hf_io import load_hf_weights
    from megavrl.models.qwen2_5_vl.config import build_configs
    from megavrl.models.qwen2_5_vl.model import Qwen2_5_VLModel, pipeline_forward

    configs = build_configs(hf_dir, params_dtype=dtype)
    model = Qwen2_5_VLModel(configs, rope_convention="transformers").eval()  # the reference's positions
    load_hf_weights(model, hf_dir)
    if perturb:
        with torch.no_grad():
            weight = dict(model.named_parameters())[PERTURBED_WEIGHT]
            weight.add_(torch.randn_like(weight) * weight.float().std().to(weight.dtype))
    logits = pipeline_forward(model, batch, gather_vocab=True)[..., :configs.vocab_size].float()
    del model
    _release_memory()
    return logits


def _distance(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    diff = (logits - reference).abs()
    return {"max_abs_logit_diff": diff.max().item(), "mean_abs_logit_diff": diff.mean().item()}


def check_parity_bf16(shape: str = PARITY_SHAPE, lm_layers: int = PARITY_LM_LAYERS,
                      vision_depth: int = PARITY_VISION_DEPTH, text_tokens: int = 448, perturb: bool = False,
                      dtype: torch.dtype = torch.bfloat16, factor: float = BF16_TOLERANCE_FACTOR) -> dict:
    """The ``parity`` line (see the module docstring). perturb: the negative control, noise of the
    weight's own scale added to PERTURBED_WEIGHT after loading; parity must then fail."""
    device, name = _device()
    started = time.perf_counter()
    cfg = gpu_model_config(shape, lm_layers, vision_depth)
    batch = {k: v.to(device) for k, v in image_prompt(cfg, text_tokens).items()}
    with tempfile.TemporaryDirectory(prefix="megavrl-gpu-check-") as tmp:
        hf_dir = write_random_hf_model(cfg, Path(tmp))
        exact = _transformers_logits(hf_dir, batch, torch.float32, device)[0]
        reference = _transformers_logits(hf_dir, batch, dtype, device)[0]
        megatron = _megatron_logits(hf_dir, batch, dtype, perturb)[0]
    vs_transformers = _distance(megatron, reference)
    megatron_error, transformers_error = _distance(megatron, exact), _distance(reference, exact)
    passed = all(megatron_error[k] <= factor * transformers_error[k] for k in megatron_error)
    return {"check": "parity", "device": name, "shape": shape, "lm_layers": cfg["num_hidden_layers"],
            "vision_depth": cfg["vision_config"]["depth"], "dtype": str(dtype).removeprefix("torch."),
            "layer_spec": _layer_spec(), "tokens": int(batch["input_ids"].shape[1]), **vs_transformers,
            "argmax_agreement": (megatron.argmax(-1) == reference.argmax(-1)).float().mean().item(),
            "megatron_vs_fp32": megatron_error, "transformers_vs_fp32": transformers_error,
            "tolerance_factor": factor, "perturbed": PERTURBED_WEIGHT if perturb else None, "passed": passed,
            "seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------------ train step


def packed_sequences(cfg: dict, tokens: int, seed: int = 0) -> list:
    """Text sequences whose lengths are SEQUENCE_SHARES of ``tokens`` (the last takes the rest),
    each a prompt of a quarter of its length and a response (the loss tokens)."""
    from megavrl.rl.batch import TrainSequence

    gen = torch.Generator().manual_seed(seed)
    lengths = [tokens * share // sum(SEQUENCE_SHARES) for share in SEQUENCE_SHARES]
    lengths[-1] += tokens - sum(lengths)
    return [TrainSequence(input_ids=torch.randint(0, first_special_id(cfg), (n,), generator=gen), prompt_len=n // 4)
            for n in lengths]


def token_mean_ce(num_tokens: int):
    """The loss: cross entropy of the response tokens, divided by the step's count of them."""
    def loss_fn(batch, logprobs, entropy):
        loss = -(logprobs * batch["loss_mask"]).sum() / num_tokens
        return loss, {"loss": loss.item()}
    return loss_fn


def check_train_step(shape: str, lm_layers: int = TRAIN_LM_LAYERS, vision_depth: int = TRAIN_VISION_DEPTH,
                     tokens: int = TRAIN_TOKENS, warmup: int = 1, steps: int = 2,
                     dtype: torch.dtype = torch.bfloat16) -> dict:
    """The ``train_step`` line of ``shape`` (see the module docstring)."""
    from megavrl.dtypes import dtype_name
    from megavrl.models.qwen2_5_vl.flops import actor_step_flops, lm_matmul_params
    from megavrl.rl.actor import MegatronActor
    from megavrl.rl.batch import padded_length
    from megavrl.rl.config import OptimizerConfig
    from megavrl.rl.micro_batches import MicroBatching, rank_micro_batches

    device, name = _device()
    cfg = gpu_model_config(shape, lm_layers, vision_depth)
    sequences = packed_sequences(cfg, tokens)
    how = MicroBatching(packing=True, max_tokens_per_micro_batch=tokens)
    cut = rank_micro_batches(sequences, 0, 1, how, pad_id=cfg["eos_token_id"], seq_len=padded_length(sequences))
    loss_fn = token_mean_ce(int(sum(b["loss_mask"].sum() for b in cut.batches)))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="megavrl-gpu-check-") as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(cfg))
        # Text only, as the tower idles: it is frozen and holds no optimizer state.
        actor = MegatronActor(tmp, tp=1, pp=1, dtype=dtype_name(dtype), freeze_vision=True, freeze_projector=True,
                              optimizer_config=OptimizerConfig(lr=LR), total_steps=warmup + steps,
                              random_init=True)
    results = [actor.train_step(cut.batches, None, loss_fn) for _ in range(warmup)]
    _synchronize()
    started = time.perf_counter()
    results += [actor.train_step(cut.batches, None, loss_fn) for _ in range(steps)]
    _synchronize()
    seconds = (time.perf_counter() - started) / steps
    del actor
    _release_memory()
    flops = sum(actor_step_flops(cfg, 1, len(s)).total for s in sequences)
    peak = peak_tflops(name) if device.type == "cuda" else None
    achieved = flops / seconds / 1e12
    return {"check": "train_step", "device": name, "shape": shape, "lm_layers": cfg["num_hidden_layers"],
            "dtype": str(dtype).removeprefix("torch."), "layer_spec": _layer_spec(), "packed": True,
            "tokens": cut.real_tokens, "sequences": len(sequences), "micro_batches": len(cut.batches),
            "seconds_per_step": seconds, "tokens_per_s": cut.real_tokens / seconds,
            "model_tflops_per_step": flops / 1e12, "tflops": achieved, "peak_tflops": peak,
            "mfu": achieved / peak if peak else None, "lm_matmul_params": lm_matmul_params(cfg),
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "losses": [r.metrics.get("loss") for r in results],
            "finished": all(r.applied for r in results)}


# ------------------------------------------------------------------------------ the run


def _run(label: dict, check, *args, **kwargs) -> dict:
    """One check's line; a check that raises gets a line too (``error``), and the run goes on."""
    try:
        return check(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- an OOM or a missing kernel is a result to report
        _release_memory()
        return {**label, "device": _device()[1], "error": f"{type(e).__name__}: {e}"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true",
                   help="the same code on the CPU: the 'tiny' shape, --tokens 256 (tools/gpu_check.sh --dry-run "
                        "also hides the GPUs)")
    p.add_argument("--shapes", nargs="+", choices=list(GPU_SHAPES), default=None,
                   help=f"train-step shapes (default {' '.join(PUBLISHED_SHAPES)}; dry run: tiny)")
    p.add_argument("--tokens", type=int, default=None, help=f"tokens of the packed row (default {TRAIN_TOKENS}; "
                                                            "dry run 256)")
    p.add_argument("--warmup", type=int, default=1, help="untimed train steps (default 1)")
    p.add_argument("--steps", type=int, default=2, help="timed train steps (default 2)")
    p.add_argument("--perturb", action="store_true",
                   help=f"negative control: add noise to {PERTURBED_WEIGHT} before the parity check (it must fail)")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("megavrl.checks.gpu: no CUDA device; run with --dry-run on a CPU", file=sys.stderr)
        return 2
    try:
        import megatron.core  # noqa: F401
    except ImportError as e:
        print(f"megavrl.checks.gpu: megatron-core does not import ({e}): carry its wheel and run "
              "tools/gpu_check.sh --wheels DIR (README, GPU check)", file=sys.stderr)
        return 2
    started = time.perf_counter()
    shapes = args.shapes or (["tiny"] if args.dry_run else PUBLISHED_SHAPES)
    tokens = args.tokens or (256 if args.dry_run else TRAIN_TOKENS)
    # Megatron's bf16 optimizer wraps CUDA tensors only: on the CPU the train step runs in fp32.
    train_dtype = torch.float32 if args.dry_run else torch.bfloat16
    if args.dry_run:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    from megavrl.parallel import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1)
    parity_kwargs = dict(shape="tiny", text_tokens=64) if args.dry_run else {}
    lines = [_run({"check": "parity"}, check_parity_bf16, perturb=args.perturb, **parity_kwargs)]
    print(json.dumps(lines[-1]), flush=True)
    for shape in shapes:
        lines.append(_run({"check": "train_step", "shape": shape}, check_train_step, shape, tokens=tokens,
                          warmup=args.warmup, steps=args.steps, dtype=train_dtype))
        print(json.dumps(lines[-1]), flush=True)
    ok = bool(lines[0].get("passed")) and all(line.get("finished") for line in lines[1:])
    print(json.dumps({"check": "summary", "device": _device()[1], "ok": ok, "dry_run": args.dry_run,
                      "seconds": time.perf_counter() - started}), flush=True)
    destroy_distributed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
