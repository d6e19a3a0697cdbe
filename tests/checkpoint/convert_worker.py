"""Worker processes of the conversion tests (Megatron's CPU mode patches torch: not in pytest's process).

    torchrun --nproc-per-node 2 -m tests.checkpoint.convert_worker trainer-save HF_DIR ROOT TP PP
    torchrun --nproc-per-node 2 -m tests.checkpoint.convert_worker logits CKPT HF_DIR OUT_DIR LAYOUT...
    python -m tests.checkpoint.convert_worker export CKPT OUT DTYPE [CKPT OUT DTYPE ...]
    python -m tests.checkpoint.convert_worker errors TINY_HF_DIR TINY_TIED_HF_DIR WORK_DIR

``trainer-save``: the trainer's MegatronActor (model, DDP, Adam) at (TP, PP) loaded from the HF
directory, saved by the trainer's CheckpointManager as ROOT/step_00000007 with Megatron's own
writer (model and optimizer states), without hf/ files.
``logits``: for each LAYOUT ("TP,PP", or "hf"), Megatron's groups are rebuilt at (TP, PP) on the
same processes (the rest is data parallel), the real model is built, loaded from the checkpoint
with ``load_megatron_weights`` (``dist_checkpointing.load(model.sharded_state_dict())``, as the
trainer loads ``model.megatron_ckpt``) and run on one text + video batch with ``pipeline_forward``;
the rank holding the logits saves them as OUT_DIR/ckpt_tp{T}_pp{P}.pt. "hf" loads the HF
safetensors with load_hf_weights at (1, 1) instead: the reference (OUT_DIR/hf_tp1_pp1.pt).
``export``: convert_megatron_to_hf for each (CKPT, OUT, DTYPE), in one process.
``errors``: runs every refusal case of :data:`ERROR_CASES` and prints one JSON line per case
(``{"case", "error", "message"}``; error None if nothing was raised).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

# A text + video batch: 2 temporal x 8 x 8 patches -> 32 merged video tokens.
GRID = [[2, 8, 8]]


def make_batch(configs) -> dict:
    hf = configs.hf_config
    n_video_tokens = GRID[0][0] * GRID[0][1] * GRID[0][2] // configs.vision_sizes.spatial_merge_size ** 2
    gen = torch.Generator().manual_seed(0)
    text = torch.randint(0, 700, (12,), generator=gen)
    ids = torch.cat([text[:6], torch.tensor([hf.vision_start_token_id]),
                     torch.full((n_video_tokens,), hf.video_token_id), torch.tensor([hf.vision_end_token_id]),
                     text[6:]])[None]
    n_patches = GRID[0][0] * GRID[0][1] * GRID[0][2]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values_videos": torch.randn(n_patches, configs.vision_sizes.patch_dim, generator=gen),
            "video_grid_thw": torch.tensor(GRID), "second_per_grid_ts": torch.tensor([1.0])}


def logits_at(ckpt: str, hf_dir: str, layout: str, out_dir: Path) -> None:
    from megatron.core import parallel_state as ps

    from megavrl.checkpoint.convert import load_megatron_weights
    from megavrl.checkpoint.hf_io import load_hf_weights
    from megavrl.models.qwen2_5_vl.config import build_configs
    from megavrl.models.qwen2_5_vl.model import Qwen2_5_VLModel, pipeline_forward
    from megavrl.parallel import init_distributed

    tp, pp = (1, 1) if layout == "hf" else (int(x) for x in layout.split(","))
    init_distributed(tp, pp)
    configs = build_configs(hf_dir, tp=tp, pp=pp)
    model = Qwen2_5_VLModel(configs)
    if layout == "hf":
        load_hf_weights(model, hf_dir)
        name = "hf_tp1_pp1"
    else:
        load_megatron_weights(model, ckpt)
        name = f"ckpt_tp{tp}_pp{pp}"
    logits = pipeline_forward(model, make_batch(configs), gather_vocab=True)
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(logits[..., :configs.vocab_size].contiguous(), out_dir / f"{name}.pt")
        print(f"OK {name} {tuple(logits.shape)}", flush=True)
    torch.distributed.barrier()


# ----------------------------------------------------------------------------------- refusals


def _rewrite_weights(src: Path, dst: Path, edit) -> Path:
    """Copy a HF directory, passing its tensors (on-disk names) through ``edit(dict) -> dict``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    save_file(edit(dict(state)), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _rewrite_config(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _drop(name):
    return lambda s: {k: v for k, v in s.items() if k != name}


def _add(name, like):
    return lambda s: {**s, name: s[like].clone()}


def _replace(name, fn):
    return lambda s: {**s, name: fn(s[name])}


def _set_text(key, value):
    def edit(config):
        config["text_config"][key] = value
    return edit


def _set(key, value):
    def edit(config):
        config[key] = value
    return edit


def _tie(value: bool):
    def edit(config):  # transformers 5 keeps the flag at the top and in text_config
        config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = value
    return edit


def _text_layers(n: int):
    def edit(config):
        config["text_config"]["num_hidden_layers"] = n
        config["text_config"]["layer_types"] = config["text_config"]["layer_types"][:n]
    return edit


def run_error_cases(tiny: Path, tied: Path, work: Path) -> None:
    from megavrl.checkpoint.convert import convert_hf_to_megatron, convert_megatron_to_hf

    work.mkdir(parents=True, exist_ok=True)
    good = work / "good_ckpt"
    convert_hf_to_megatron(tiny, good, progress=False)
    tied_ckpt = work / "tied_ckpt"
    convert_hf_to_megatron(tied, tied_ckpt, progress=False)
    trainer_like = work / "trainer_like"  # a step directory without hf/
    shutil.copytree(good, trainer_like, ignore=shutil.ignore_patterns("hf"))

    def h2m(src):
        return lambda: convert_hf_to_megatron(src, work / f"out_h2m_{src.name}", progress=False)

    def m2h(ckpt, hf_config=None):
        out = work / f"out_m2h_{Path(hf_config or ckpt).name}"
        return lambda: convert_megatron_to_hf(ckpt, out, hf_config=hf_config, progress=False)

    cases = {
        # HF -> Megatron: the safetensors against their own config.json
        "h2m_missing": h2m(_rewrite_weights(tiny, work / "missing", _drop("model.layers.1.mlp.up_proj.weight"))),
        "h2m_unexpected": h2m(_rewrite_weights(tiny, work / "unexpected", _add(
            "model.layers.9.mlp.up_proj.weight", like="model.layers.1.mlp.up_proj.weight"))),
        "h2m_shape": h2m(_rewrite_weights(tiny, work / "shape",
                                          _replace("visual.blocks.0.attn.qkv.weight", lambda t: t[:300].clone()))),
        "h2m_config": h2m(_rewrite_config(tiny, work / "config", _set_text("intermediate_size", 384))),
        "h2m_model_type": h2m(_rewrite_config(tiny, work / "llama", _set("model_type", "llama"))),
        "h2m_tp": lambda: convert_hf_to_megatron(tiny, work / "out_tp3", tp=3, progress=False),
        "h2m_out_not_empty": lambda: convert_hf_to_megatron(tiny, tiny.parent, progress=False),
        # Megatron -> HF: the checkpoint's tensors against the HF config
        "m2h_config_layers": m2h(good, _rewrite_config(tiny, work / "cfg_layers", _text_layers(3))),
        "m2h_missing_untied": m2h(tied_ckpt, _rewrite_config(tied, work / "cfg_untied", _tie(False))),
        "m2h_unexpected_tied": m2h(good, _rewrite_config(tiny, work / "cfg_tied", _tie(True))),
        "m2h_model_type": m2h(good, _rewrite_config(tiny, work / "cfg_llama", _set("model_type", "llama"))),
        "m2h_not_a_checkpoint": m2h(work / "missing"),
        "m2h_no_hf_files": m2h(trainer_like),
        "m2h_out_not_empty": lambda: convert_megatron_to_hf(good, tiny.parent, progress=False),
    }
    for name, fn in cases.items():
        try:
            fn()
            result = {"case": name, "error": None, "message": ""}
        except Exception as e:  # noqa: BLE001 -- reported to the test
            result = {"case": name, "error": type(e).__name__, "message": str(e)}
        print("CASE " + json.dumps(result), flush=True)


def main(argv: list[str]) -> None:
    mode = argv[0]
    if mode == "trainer-save":
        from megavrl.checkpoint.manager import CheckpointManager
        from megavrl.config import OptimizerConfig
        from megavrl.parallel import init_distributed
        from megavrl.rl.actor import MegatronActor

        hf_dir, root, tp, pp = argv[1], argv[2], int(argv[3]), int(argv[4])
        init_distributed(tp, pp)
        actor = MegatronActor(hf_dir, tp, pp, dtype="float32", trainable=True, optimizer_config=OptimizerConfig())
        path = CheckpointManager(root).save(7, actor.sharded_state_dict(), metadata={"tp": tp, "pp": pp})
        print(f"OK trainer-save {path}", flush=True)
    elif mode == "logits":
        ckpt, hf_dir, out_dir = argv[1], argv[2], Path(argv[3])
        for layout in argv[4:]:
            logits_at(ckpt, hf_dir, layout, out_dir)
    elif mode == "export":
        from megavrl.checkpoint.convert import convert_megatron_to_hf

        for ckpt, out, dtype in zip(argv[1::3], argv[2::3], argv[3::3]):
            convert_megatron_to_hf(ckpt, out, dtype=dtype, max_shard_size="4MB", progress=False)
            print(f"OK export {out}", flush=True)
    elif mode == "errors":
        run_error_cases(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    from megavrl.parallel import destroy_distributed

    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
