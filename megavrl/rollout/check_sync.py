"""``megavrl check-sync``: prove that the weight sync makes vLLM sample from the trainer's policy.

Megatron loads the HF directory at the given TP/PP; vLLM starts from a copy of it whose weights
are re-randomised, so only the sync can make the two agree. After the sync, vLLM samples from a
video prompt and Megatron re-scores the sampled tokens:

    token_mult_prob_error = mean over tokens of exp(|logp_megatron - logp_vllm|)   (1.0 = equal)

With ``--step-check`` it then takes one optimizer step (cross-entropy on the samples, a large
learning rate), measures again without syncing (the two must disagree), syncs and measures a third
time (they must agree again). Prints one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from megavrl.log import get_logger

log = get_logger(__name__)


def randomised_copy(hf_dir: str, out: Path, seed: int = 1) -> Path:
    """A copy of ``hf_dir`` whose every tensor is replaced by noise of the same shape and scale."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(hf_dir, out)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(f)
        noisy = {k: (torch.randn(v.shape, generator=gen) * (v.float().std() if v.numel() > 1 else 1.0)).to(v.dtype)
                 for k, v in tensors.items()}
        save_file(noisy, f, metadata={"format": "pt"})
    return out


def _probe_prompt(hf_dir: str, video: str | None, workdir: Path):
    """One prepared temporal-grounding prompt over ``video`` (a synthetic one when None)."""
    from megavrl.data.config import VideoConfig
    from megavrl.data.prompt import PromptBuilder
    from megavrl.data.schema import Sample

    if video is None:
        from megavrl.data.synth import write_synthetic_dataset

        write_synthetic_dataset(str(workdir / "synth"), n=1, seed=0, tasks=("tvg",), workers=1)
        video = str(next((workdir / "synth" / "videos").glob("*.mp4")))
    builder = PromptBuilder.from_hf_dir(hf_dir)
    spec = builder.spec
    sampler = VideoConfig(fps=1.0, min_pixels=3136, max_pixels=50176).sampler(
        patch_size=spec.patch_size, merge_size=spec.merge_size, temporal_patch_size=spec.temporal_patch_size)
    sampled = sampler(video)
    sample = Sample(id="probe", video=video, task="tvg", question="a shape appears", duration=sampled.duration,
                    video_path=video)
    return builder.build(sample, sampled)


class SyncProbe:
    """Rank 0 samples with vLLM; every rank re-scores with Megatron; rank 0 gets the comparison."""

    def __init__(self, actor, engine, prepared, n: int, max_new_tokens: int, pad_id: int):
        self.actor, self.engine, self.prepared = actor, engine, prepared
        self.n, self.max_new_tokens, self.pad_id = n, max_new_tokens, pad_id

    def sync(self) -> dict:
        stream = self.actor.export_hf_ranks0()
        if self.engine is not None:
            return self.engine.update_weights(stream).as_dict()
        for _ in stream:
            pass
        return {}

    def sample(self, seed: int):
        from megavrl.rl.experience import grpo_sequences, rollout_prompt

        seqs = None
        if self.engine is not None:
            groups = self.engine.generate([rollout_prompt(self.prepared)], n=self.n, seed=seed,
                                          max_new_tokens=self.max_new_tokens, temperature=1.0)
            advantages = torch.zeros(1, self.n)
            seqs = grpo_sequences(groups, [self.prepared], advantages).sequences
        box = [seqs]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def compare(self, sequences) -> dict:
        from megatron.core import parallel_state as ps

        from megavrl.rl.actor import reduce_metrics
        from megavrl.rl.batch import collate, padded_length

        seq_len = padded_length(sequences)
        batch = collate(sequences, self.pad_id, seq_len)
        out = self.actor.logprobs([batch], seq_len)
        local = []
        if out is not None and ps.get_data_parallel_rank() == 0:
            mask = batch["loss_mask"].bool()
            diff = (out[0] - batch["rollout_logprobs"])[mask].abs().double()
            local = [{"sum_exp": float(diff.exp().sum()), "sum_abs": float(diff.sum()),
                      "max_abs": float(diff.max()), "n": float(mask.sum())}]
        total = reduce_metrics(local)
        n = max(total.get("n", 0.0), 1.0)
        return {"token_mult_prob_error": total.get("sum_exp", 0.0) / n,
                "mean_abs_logprob_diff": total.get("sum_abs", 0.0) / n, "tokens": int(total.get("n", 0))}

    def sft_step(self, sequences, lr_scale_loss: float = 1.0) -> None:
        from megavrl.rl.batch import collate, padded_length

        seq_len = padded_length(sequences)
        batch = collate(sequences, self.pad_id, seq_len)
        n_tok = float(batch["loss_mask"].sum())

        def loss_fn(b, logprobs, entropy):
            nll = -(logprobs * b["loss_mask"]).sum() / n_tok * lr_scale_loss
            return nll, {"loss": nll.item()}
        self.actor.train_step([batch], seq_len, loss_fn)


def check_sync(hf_dir: str, tp: int, pp: int, video: str | None = None, n: int = 4, max_new_tokens: int = 24,
               step_check: bool = False, seed: int = 0) -> dict | None:
    """Run the check on every rank of a TP*PP job; returns the report on rank 0, None elsewhere."""
    from transformers import AutoTokenizer

    from megavrl.config import OptimizerConfig
    from megavrl.parallel.distributed import init_distributed
    from megavrl.rl.actor import MegatronActor
    from megavrl.rollout.engine import RolloutConfig, RolloutEngine

    layout = init_distributed(tp=tp, pp=pp, seed=seed)
    rank0 = layout.rank == 0
    actor = MegatronActor(hf_dir, tp, pp, dtype="float32", trainable=True,
                          optimizer_config=OptimizerConfig(lr=5e-3, weight_decay=0.0, clip_grad=0.0), total_steps=10)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    workdir = Path(tempfile.mkdtemp(prefix="megavrl-check-sync-"))
    engine = prepared = None
    try:
        if rank0:
            prepared = _probe_prompt(hf_dir, video, workdir)
            noisy = randomised_copy(hf_dir, workdir / "randomised")
            engine = RolloutEngine(str(noisy), RolloutConfig(n=n, max_new_tokens=max_new_tokens, dtype="float32",
                                                             cpu_kv_cache_mb=128, max_model_len=4096))
        probe = SyncProbe(actor, engine, prepared, n, max_new_tokens, tokenizer.pad_token_id or 0)
        report: dict = {"tp": tp, "pp": pp}
        if step_check:  # before the sync vLLM holds noise: the two must disagree
            report["before_sync"] = probe.compare(probe.sample(seed))
        t0 = time.perf_counter()
        stats = probe.sync()
        report.update({"bytes": stats.get("bytes_moved"), "seconds": time.perf_counter() - t0})
        after = probe.sample(seed + 1)
        report.update(probe.compare(after))
        if step_check:
            probe.sft_step(after)
            report["after_step"] = probe.compare(probe.sample(seed + 2))
            probe.sync()
            report["after_resync"] = probe.compare(probe.sample(seed + 3))
        return report if rank0 else None
    finally:
        if engine is not None:
            engine.shutdown()
        if rank0:
            shutil.rmtree(workdir, ignore_errors=True)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-sync", help="check that the Megatron -> vLLM weight sync makes both score alike",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="Hugging Face Qwen2.5-VL directory")
    p.add_argument("--tp", type=int, default=1, help="Megatron tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="Megatron pipeline-parallel size")
    p.add_argument("--video", default=None, help="video for the probe prompt (default: a synthetic one)")
    p.add_argument("--n", type=int, default=4, help="samples drawn by vLLM")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--step-check", action="store_true",
                   help="also show disagreement after an optimizer step and agreement after the next sync")
    p.set_defaults(func=_main)


def _main(args) -> int:
    from megavrl.checkpoint.hf_io import HFCheckpointReader
    from megavrl.errors import UserError
    from megavrl.models.qwen2_5_vl.config import require_hf_dir
    from megavrl.parallel.launch import ensure_launched

    require_hf_dir(args.hf_dir, "--hf-dir")  # before starting processes, each of which would fail alike
    HFCheckpointReader(args.hf_dir).close()  # a missing or truncated safetensors file, named
    if args.video is not None and not os.path.isfile(args.video):
        raise UserError(f"--video {args.video!r} is not a file")
    launched = ensure_launched(args.tp * args.pp)
    if launched is not None:
        return launched
    from megavrl.parallel.distributed import finish_distributed

    report = check_sync(args.hf_dir, args.tp, args.pp, args.video, args.n, args.max_new_tokens, args.step_check)
    finish_distributed()
    if report is not None:
        print(json.dumps(report), flush=True)
    return 0
