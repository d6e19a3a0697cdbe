"""One GRPO update on a realistic length mix, packed vs padded: tokens/s of megavrl's actor both ways.

The batch is a GRPO step's: ``--prompts`` synthetic grounding video prompts built by megavrl's data
pipeline (decord decode, frame sampling at each of ``--fps`` in turn -- so 2-3 different prompt
lengths --, resize, patchify, chat template, M-RoPE ids), each with ``--n`` responses whose lengths
are drawn from ``--response-min``..``--response-max`` tokens (random ordinary tokens; random
advantages), once per ``--lengths`` mix, one figure each: ``uniform`` (every length equally likely)
and ``loguniform`` (long-tailed: many short responses, a few long ones, as GRPO on reasoning tasks
produces; median 91 tokens for 16-512). Packing saves the padding, so the ratio follows the mix:
with uniform lengths the padded side computes about 1.4x the real tokens, with long tails more. One update is what ``megavrl train`` does per step with the default config
(one epoch, one mini-batch, KL to a reference): a forward-only log-prob pass (the reference's; the
frozen copy costs the same as the actor, so the actor runs it) and one ``train_step`` with the
GRPO loss (clipped ratio, k3 KL, token mean).

- padded (the baseline, ``trainer.packing=false``): micro-batches of ``--micro-batch-size``
  sequences, each padded to the step's longest sequence;
- packed (``trainer.packing=true``, ``trainer.max_tokens_per_micro_batch`` = micro-batch size x
  the padded width: the same tokens per micro-batch as the padded side's): the sequences binned
  under that budget and packed end to end (THD).

Both sides share one actor (fp32, TP=1, Megatron-Core on CPU) and run alternately after
``--warmup`` untimed rounds; the best of ``--steps`` rounds counts. tokens/s counts the real tokens
of the batch (the same on both sides), so the ratio is the ratio of update times. Before timing,
both compute the log-probs of the batch: their largest difference is in the notes (fp32: ~0).

The defaults (8 sequences a mix, one timed round, a few CPU-minutes) keep ``make bench`` short;
``--n 4 --steps 2`` (16 sequences, best of 2) took about 10 CPU-minutes on the 2-core machine. Wall-clock
seconds on a shared machine move with its load: the CPU seconds per update and the tokens each
side computes are in the notes too.

Usage: python -m bench.bench_packing [--preset small] [--prompts 4] [--n 2] [--fps 1 2]
           [--response-min 16] [--response-max 512] [--lengths uniform loguniform]
           [--micro-batch-size 4] [--warmup 1] [--steps 1]
Writes bench/results/packing.json (``--preset tiny``: packing_tiny.json).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from bench.bench_actor_step import make_model, time_alternating, video_prompts
from bench.common import RESPONSE_DISTRIBUTIONS, Figure, keep_freed_memory, response_lengths, write_result

LR = 1e-6


def grpo_sequences(hf_dir: Path, data_dir: Path, prompts: int, n: int, fps: list[float], response_range,
                   seed: int = 0, lengths: str = "uniform") -> list:
    """``prompts`` video prompts (fps cycling through ``fps``) x ``n`` responses of random lengths
    (``lengths``: how they are drawn, see ``bench.common.response_lengths``)."""
    from transformers import AutoTokenizer

    from megavrl.rl.batch import TrainSequence
    from megavrl.rl.experience import prompt_positions, vision_inputs

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    first_special = min(tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens)
    by_fps = {f: video_prompts(hf_dir, data_dir, sum(1 for i in range(prompts) if fps[i % len(fps)] == f), f, seed)
              for f in set(fps)}
    gen = torch.Generator().manual_seed(seed)
    drawn = iter(response_lengths(prompts * n, *response_range, lengths, seed))
    seqs = []
    for i in range(prompts):
        p = by_fps[fps[i % len(fps)]].pop(0)
        for _ in range(n):
            length = next(drawn)
            response = torch.randint(0, first_special, (length,), generator=gen)
            seqs.append(TrainSequence(input_ids=torch.cat([p.input_ids, response]), prompt_len=p.num_tokens,
                                      vision=vision_inputs(p), advantage=float(torch.randn(1, generator=gen)),
                                      **prompt_positions(p)))
    return seqs


class UpdateSide:
    """One GRPO update (log-prob pass + train_step) on micro-batches cut one way."""

    def __init__(self, name: str, actor, sequences: list, how, pad_id: int):
        from megavrl.rl.batch import padded_length
        from megavrl.rl.micro_batches import rank_micro_batches

        self.name, self.actor, self.sequences = name, actor, sequences
        self.seq_len = padded_length(sequences)
        self.cut = rank_micro_batches(sequences, 0, 1, how, pad_id, self.seq_len)
        self.batches = self.cut.batches

    def logprobs(self) -> dict[int, torch.Tensor]:
        values = self.actor.logprobs(self.batches, self.seq_len)
        out = {}
        for v, group in zip(values, self.cut.groups):
            for row, s in enumerate(group):
                if not s.info.get("padding"):
                    out[id(s)] = v[row, s.prompt_len - 1:len(s) - 1]
        return out

    def step(self) -> float:
        from megavrl.rl.policy_loss import policy_loss

        values = self.actor.logprobs(self.batches, self.seq_len)
        for batch, v in zip(self.batches, values):
            batch["old_logprobs"] = batch["ref_logprobs"] = v
        num_tokens, num_seqs = sum(s.response_len for s in self.sequences), len(self.sequences)

        def loss_fn(batch, logprobs, entropy):
            return policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], batch["loss_mask"],
                               ref_logprobs=batch["ref_logprobs"], entropy=entropy, kl_coef=0.01,
                               global_num_tokens=num_tokens, global_num_seqs=num_seqs)

        result = self.actor.train_step(self.batches, self.seq_len, loss_fn)
        assert result.applied, result
        return result.metrics["loss"]


def measure(actor, hf_dir: Path, data_dir: Path, args, lengths: str, pad: int) -> Figure:
    """One length mix: the update padded and packed, timed alternately; its figure."""
    from megavrl.rl.batch import padded_length
    from megavrl.rl.micro_batches import MicroBatching, micro_batch_metrics

    seqs = grpo_sequences(hf_dir, data_dir, args.prompts, args.n, args.fps, (args.response_min, args.response_max),
                          lengths=lengths)
    width = padded_length(seqs)
    budget = args.micro_batch_size * width
    padded = UpdateSide("padded", actor, seqs, MicroBatching(args.micro_batch_size, packing=False), pad)
    packed = UpdateSide("packed", actor, seqs, MicroBatching(max_tokens_per_micro_batch=budget, packing=True), pad)
    ref, got = padded.logprobs(), packed.logprobs()
    max_diff = max((ref[k] - got[k]).abs().max().item() for k in ref)
    (pad_s, pack_s), (pad_cpu, pack_cpu), (pad_loss, pack_loss) = time_alternating([padded, packed], args.warmup,
                                                                                    args.steps)
    tokens = sum(len(s) for s in seqs)
    n_params = sum(p.numel() for p in actor.model.parameters())
    notes = {"preset": args.preset, "parameters": n_params, "sequences": len(seqs), "real_tokens": tokens,
             "response_length_distribution": lengths,
             "prompt_lengths": sorted({s.prompt_len for s in seqs}), "response_lengths": [s.response_len for s in seqs],
             "padded_width": width, "token_budget": budget,
             "computed_tokens": {"padded": padded.cut.computed_tokens, "packed": packed.cut.computed_tokens},
             "micro_batches": {"padded": len(padded.batches), "packed": len(packed.batches)},
             "padding_fraction": {"padded": micro_batch_metrics([padded.cut])["micro_batches/padding_fraction"],
                                  "packed": micro_batch_metrics([packed.cut])["micro_batches/padding_fraction"]},
             "max_abs_logprob_diff": max_diff, "step1_loss": {"padded": pad_loss, "packed": pack_loss},
             "seconds_per_update": {"padded": pad_s, "packed": pack_s},
             "median_tokens_per_s": {"padded": tokens / statistics.median(pad_s),
                                     "packed": tokens / statistics.median(pack_s)},
             "cpu_seconds_per_update": {"padded": pad_cpu, "packed": pack_cpu},
             "torch_threads": torch.get_num_threads()}
    return Figure(f"GRPO update tokens/s, {args.preset} ({n_params / 1e6:.1f}M params), responses {lengths} "
                  f"{args.response_min}-{args.response_max}, packed vs padded, TP=1",
                  tokens / min(pack_s), tokens / min(pad_s), "tokens/s", baseline_name="padded", notes=notes)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small"],
                    help="small (default): ~30M parameters, compute-bound; tiny: megavrl's 4M debug model")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=2, help="responses per prompt")
    ap.add_argument("--fps", type=float, nargs="+", default=[1.0, 2.0],
                    help="frame rates the prompts cycle through (each gives another prompt length)")
    ap.add_argument("--response-min", type=int, default=16)
    ap.add_argument("--response-max", type=int, default=512)
    ap.add_argument("--lengths", nargs="+", default=list(RESPONSE_DISTRIBUTIONS), choices=RESPONSE_DISTRIBUTIONS,
                    help="how response lengths are drawn, one figure each: uniform, loguniform (long-tailed)")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--results-name", help="result file name (default packing, packing_tiny with --preset tiny)")
    args = ap.parse_args(argv)
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoTokenizer

    from megavrl.config import OptimizerConfig
    from megavrl.parallel.distributed import init_distributed
    from megavrl.rl.actor import MegatronActor

    with tempfile.TemporaryDirectory(prefix="megavrl-bench-packing-") as tmp:
        hf_dir = make_model(Path(tmp) / args.preset, args.preset)
        init_distributed(tp=1, pp=1)
        actor = MegatronActor(str(hf_dir), 1, 1, dtype="float32", optimizer_config=OptimizerConfig(lr=LR),
                              total_steps=len(args.lengths) * 2 * (args.warmup + args.steps + 1))
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        figures = [measure(actor, hf_dir, Path(tmp) / "data", args, lengths, pad) for lengths in args.lengths]
    name = args.results_name or ("packing" if args.preset == "small" else f"packing_{args.preset}")
    write_result(name, figures, config={k: v for k, v in vars(args).items()})


if __name__ == "__main__":
    main()
