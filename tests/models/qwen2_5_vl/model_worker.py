"""torchrun worker for tests/models/qwen2_5_vl/test_model.py (2 processes, gloo, CPU).

For each HF directory given, at (TP, PP) = (1, 1) [DP 2], (2, 1) and (1, 2), every rank:
1. runs megavrl's parity check against transformers (text, image, video, mixed batches of 2,
   left-padded) -- rank 0 prints ``PARITY <preset> <tp> <pp> <json>``;
2. exports the sharded model back to HF tensors (``export_hf_weights``, every rank) and compares
   each with the tensor on disk, bit for bit, and the set of names with the checkpoint's
   -- prints ``EXPORT <preset> <tp> <pp> rank=<r> tensors=<n>``;
3. backpropagates a next-token NLL through Megatron's pipeline schedule with the trainer's DDP
   wrapper and grad finalisation (data-parallel reduction; with tied embeddings at PP=2 the first
   stage's embedding gradient and the last stage's output-layer gradient are summed) and compares
   every gradient, embedding and output layer included, with transformers'
   -- prints ``GRADS <preset> <tp> <pp> rank=<r> worst=<d> tensors=<n>``.
Any mismatch raises, so the test sees a non-zero exit.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4


def _build(hf_dir, tp, pp, **kw):
    from megavrl.checkpoint.hf_io import load_hf_weights
    from megavrl.models.qwen2_5_vl.config import build_configs
    from megavrl.models.qwen2_5_vl.model import Qwen2_5_VLModel

    configs = build_configs(hf_dir, tp=tp, pp=pp)
    model = Qwen2_5_VLModel(configs, rope_convention="transformers", **kw)
    load_hf_weights(model, hf_dir)
    return model, configs


def check_export(hf_dir, preset, tp, pp, rank) -> None:
    from megavrl.checkpoint.hf_io import HFCheckpointReader, export_hf_weights
    from megavrl.checkpoint.mapping import to_published

    model, _ = _build(hf_dir, tp, pp)
    seen = []
    with HFCheckpointReader(hf_dir) as reader:
        expected = {to_published(n) for n in reader.names()}
        for name, tensor in export_hf_weights(model, ranks="all"):
            disk = reader.read(name)
            assert tensor.dtype == disk.dtype and tensor.shape == disk.shape, (name, tensor.shape, disk.shape)
            assert torch.equal(tensor, disk), f"{name} differs after export at tp={tp} pp={pp}"
            seen.append(name)
    assert len(seen) == len(set(seen)) and set(seen) == expected, sorted(expected ^ set(seen))
    rank0_only = sum(1 for _ in export_hf_weights(model, ranks="rank0", dtype=torch.bfloat16))
    assert rank0_only == (len(seen) if rank == 0 else 0), rank0_only
    print(f"EXPORT {preset} {tp} {pp} rank={rank} tensors={len(seen)}", flush=True)


def _nll(logits_or_logp, input_ids, attention_mask, vocab, vocab_parallel):
    from megavrl.rl.logprobs import next_token_logprobs

    logp, _ = next_token_logprobs(logits_or_logp, input_ids, vocab_size=vocab, vocab_parallel=vocab_parallel)
    real = (attention_mask[:, 1:] * attention_mask[:, :-1]).float()
    return -(logp * real).sum() / real.sum()


def check_grads(hf_dir, preset, tp, pp, rank) -> None:
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megavrl.checkpoint.hf_io import export_hf_weights
    from megavrl.checkpoint.mapping import to_published
    from megavrl.models.qwen2_5_vl.model import MODEL_INPUTS
    from megavrl.checks.parity import build_parity_batches
    from megavrl.rl.optim import wrap_ddp

    batch = build_parity_batches(hf_dir, ("mixed",))["mixed"]
    model, configs = _build(hf_dir, tp, pp)
    (ddp,) = wrap_ddp([model], configs.language, use_distributed_optimizer=False)  # as the trainer's actor
    configs.language.finalize_model_grads_func = finalize_model_grads
    configs.language.no_sync_func = ddp.no_sync
    vocab = configs.vocab_size
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}

    def step(data_iterator, stage_model):
        data = next(data_iterator)
        out = stage_model(**data)
        return out, lambda output: (lambda loss: (loss, {"loss": loss.detach()}))(
            _nll(output, data["input_ids"], data["attention_mask"], vocab, True))

    ddp.zero_grad_buffer()
    losses = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([inputs]), model=[ddp],
                                         num_microbatches=1, seq_length=batch["input_ids"].shape[1],
                                         micro_batch_size=batch["input_ids"].shape[0], forward_only=False)
    for p in model.parameters():  # DDP accumulates into main_grad; export reads .grad
        if p.requires_grad:
            p.grad = p.main_grad
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32,
                                                            attn_implementation="eager")
    ref_loss = _nll(hf_logits_with_grad(hf, batch), batch["input_ids"], batch["attention_mask"], vocab, False)
    ref_loss.backward()
    if losses:
        assert abs(losses[0]["loss"].item() - ref_loss.item()) < 1e-5, (losses[0]["loss"].item(), ref_loss.item())
    ref = {to_published(n): p.grad for n, p in hf.named_parameters() if p.grad is not None}
    worst, seen = 0.0, set()
    for name, grad in export_hf_weights(model, ranks="all", of="grads"):
        diff = (grad - ref[name]).abs().max().item()
        assert diff <= GRAD_ATOL + GRAD_RTOL * ref[name].abs().max().item(), (name, diff)
        worst = max(worst, diff)
        seen.add(name)
    # the embedding (tied: holding both uses' gradient) and, untied, the output layer were compared
    assert "model.embed_tokens.weight" in seen and ("lm_head.weight" in seen) == ("lm_head.weight" in ref), seen
    assert seen == set(ref), sorted(set(ref) ^ seen)
    print(f"GRADS {preset} {tp} {pp} rank={rank} worst={worst:.2e} tensors={len(seen)}", flush=True)


def hf_logits_with_grad(hf, batch):
    inputs = {k: v for k, v in batch.items()}
    hf.model.rope_deltas = None
    return hf(**inputs).logits


def check_freeze(hf_dir) -> None:
    from megavrl.parallel import init_distributed

    init_distributed(tp=1, pp=1)
    model, _ = _build(hf_dir, 1, 1, freeze_vision=True)
    v = model.vision_model
    assert not any(p.requires_grad for p in v.decoder.parameters())
    assert all(p.requires_grad for p in v.merger.parameters())
    model, _ = _build(hf_dir, 1, 1, freeze_vision=True, freeze_projector=True)
    assert not any(p.requires_grad for p in model.vision_model.parameters())
    assert all(p.requires_grad for p in model.language_model.parameters())
    print("FREEZE ok", flush=True)


def main(hf_dirs: list[str]) -> None:
    from megavrl.checks.parity import check_parity
    from megavrl.parallel import destroy_distributed

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    for hf_dir in hf_dirs:
        preset = json.loads((Path(hf_dir) / "megavrl_tiny.json").read_text())["preset"]
        for tp, pp in LAYOUTS:
            if world % (tp * pp):
                continue
            report = check_parity(hf_dir, tp, pp)
            if report is not None:
                print(f"PARITY {preset} {tp} {pp} {json.dumps(report)}", flush=True)
            if tp * pp > 1:
                check_export(hf_dir, preset, tp, pp, rank)
            check_grads(hf_dir, preset, tp, pp, rank)
    check_freeze(hf_dirs[0])
    destroy_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
