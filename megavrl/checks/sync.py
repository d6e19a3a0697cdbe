"""The weight-sync check behind ``megavrl check-sync`` (:mod:`megavrl.commands.check_sync` says
what it proves and prints): vLLM starts from re-randomised weights, the trainer's own sync
(``MegatronActor.sync_weights_into``) streams the Megatron weights in, vLLM samples and Megatron
re-scores the samples (``token_mult_prob_error``; 1.0 = equal); ``--step-check`` adds an optimizer
step with the trainer's SFT loss, a measurement before the next sync and one after it.
"""
from __future__ import annotations

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
        """The trainer's own weight sync (``MegatronActor.sync_weights_into``)."""
        stats = self.actor.sync_weights_into(self.engine)
        return stats.as_dict() if stats is not None else {}

    def sample(self, seed: int):
        from megavrl.rl.experience import grpo_sequences
        from megavrl.rollout.inputs import rollout_prompt

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

    def sft_step(self, sequences) -> None:
        """One optimizer step of the trainer's SFT loss on ``sequences``."""
        from megavrl.rl.batch import collate, padded_length
        from megavrl.rl.policy_loss import sft_loss

        seq_len = padded_length(sequences)
        batch = collate(sequences, self.pad_id, seq_len)
        n_tok = float(batch["loss_mask"].sum())
        self.actor.train_step([batch], seq_len, lambda b, logprobs, entropy: sft_loss(logprobs, b["loss_mask"], n_tok))


def check_sync(hf_dir: str, tp: int, pp: int, video: str | None = None, n: int = 4, max_new_tokens: int = 24,
               step_check: bool = False, seed: int = 0) -> dict | None:
    """Run the check on every rank of a TP*PP job; returns the report on rank 0, None elsewhere."""
    from transformers import AutoTokenizer

    from megavrl.rl.config import OptimizerConfig
    from megavrl.parallel.distributed import init_distributed
    from megavrl.rl.actor import MegatronActor
    from megavrl.rollout.config import RolloutConfig
    from megavrl.rollout.engine import RolloutEngine

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
