"""Runs under torchrun (2 processes) for tests/rl/test_trainer.py; writes a JSON report.

usage: trainer_worker.py SCENARIO WORKDIR HF_DIR DATA_DIR
  tp2: GRPO at TP=2: (A) 3 steps with a checkpoint at step 2 and an HF export; (B) the same run
       stopped after step 2 and resumed to step 3, which must repeat A's step 3 exactly;
       (C) a NaN injected into the loss of step 1 is skipped and counted; and whether the policy
       learned what the reward prefers (checked against transformers on the exported model).
  pp2: GRPO at PP=2, 2 steps.
The reward prefers responses whose first character is a lowercase ASCII letter: a random tiny
model produces those about a third of the time, so groups have reward variance from step 1.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def preferred(text: str) -> bool:
    return bool(text) and text[0].isascii() and text[0].islower()


def install_reward() -> None:
    from megavrl.rewards import RewardResult, register_reward

    def lowercase_start(response, sample, config):
        ok = preferred(response)
        return RewardResult(total=float(ok), components={"lowercase_start": float(ok)}, parsed={})

    for task in ("tvg", "mcq", "gqa"):
        register_reward(task, replace=True)(lowercase_start)


def config(workdir: Path, hf_dir: str, data_dir: str, name: str, **over):
    from megavrl.config import load_config

    overrides = [
        f"model.hf_dir={hf_dir}", "model.dtype=float32",
        f"data.train=[{{json_path: {data_dir}/train.jsonl, data_folder: {data_dir}}}]", "data.val=[]",
        "data.video.fps=1.0", "data.video.min_pixels=3136", "data.video.max_pixels=25088", "data.num_workers=1",
        "rollout.n=4", "rollout.max_new_tokens=12", "rollout.dtype=float32", "rollout.cpu_kv_cache_mb=128",
        "rollout.max_model_len=1024",
        "algorithm.kl_coef=0.01", "optimizer.lr=2e-3", "optimizer.weight_decay=0.0",
        "trainer.prompts_per_step=4", "trainer.micro_batch_size=2", "trainer.seed=7",
        f"trainer.output_dir={workdir / name}", "checkpoint.export_hf_at_end=false", "checkpoint.save_every=0",
    ] + [f"{k}={v}" for k, v in over.items()]
    return load_config([], overrides)


class Recorder:
    """Per step: the prompt ids, one RNG draw, the sampled tokens (rank 0)."""

    def __init__(self, trainer):
        self.steps: list[dict] = []
        take, gen, step = trainer._next_prompts, None, trainer.train_step

        def train_step():
            self.steps.append({"rand": torch.rand(1).item()})
            return step()

        def next_prompts(n):
            items = take(n)
            self.steps[-1]["ids"] = [p.sample.id for p in items]
            return items

        trainer.train_step, trainer._next_prompts = train_step, next_prompts
        if trainer.engine is not None:
            gen = trainer.engine.generate

            def generate(prompts, **kw):
                groups = gen(prompts, **kw)
                self.steps[-1]["tokens"] = [s.token_ids for g in groups for s in g.samples]
                return groups

            trainer.engine.generate = generate
            self._restore = (trainer.engine, gen)

    def detach(self):
        if hasattr(self, "_restore"):
            engine, gen = self._restore
            engine.generate = gen


def params(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.actor.model.parameters()]


def changed(before, after) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after))


def metrics_of(workdir: Path, name: str) -> list[dict]:
    from megavrl.run_metrics import read_metrics_jsonl

    return read_metrics_jsonl(workdir / name / "tensorboard" / "metrics.jsonl")


def preferred_mass(hf_dir: str, prepared) -> float:
    """Probability that the first response token starts with a lowercase letter (transformers)."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([i for i in range(model.config.text_config.vocab_size)
                        if i < len(tok) and preferred(tok.decode([i]))])
    masses = []
    with torch.no_grad():
        for p in prepared:
            logits = model(input_ids=p.input_ids[None], pixel_values_videos=p.pixel_values_videos,
                           video_grid_thw=p.video_grid_thw, second_per_grid_ts=p.second_per_grid_ts).logits
            masses.append(logits[0, -1].softmax(-1)[ids].sum().item())
    return sum(masses) / len(masses)


def scenario_tp2(workdir: Path, hf_dir: str, data_dir: str) -> dict:
    from megavrl.rl.trainer import Trainer

    report: dict = {}
    # A: three uninterrupted steps, checkpoint at 2.
    a = Trainer(config(workdir, hf_dir, data_dir, "A", **{"parallel.tp": 2, "trainer.total_steps": 3,
                                                          "checkpoint.save_every": 2}))
    rank = torch.distributed.get_rank()
    engine = a.engine
    rec_a, w0 = Recorder(a), params(a)
    a.run()
    rec_a.detach()
    report["A"] = {"steps": rec_a.steps, "metrics": metrics_of(workdir, "A") if rank == 0 else [],
                   "weights_changed": changed(w0, params(a))}
    # B: the same run stopped after step 2, then resumed from its checkpoint to step 3.
    b1 = Trainer(config(workdir, hf_dir, data_dir, "B", **{"parallel.tp": 2, "trainer.total_steps": 2,
                                                           "checkpoint.save_every": 2}), engine=engine)
    rec_b1 = Recorder(b1)  # the same draws as in A, so the RNG streams are comparable
    b1.run()
    rec_b1.detach()
    b2 = Trainer(config(workdir, hf_dir, data_dir, "B", **{"parallel.tp": 2, "trainer.total_steps": 3,
                                                           "checkpoint.save_every": 2}), engine=engine)
    rec_b = Recorder(b2)
    b2.run()
    rec_b.detach()
    report["B"] = {"resumed_at": 2, "steps": rec_b.steps, "metrics": metrics_of(workdir, "B") if rank == 0 else []}
    # C: NaN in the loss of the first step.
    c = Trainer(config(workdir, hf_dir, data_dir, "C", **{"parallel.tp": 2, "trainer.total_steps": 1}), engine=engine)
    make = c._loss_fn
    calls = {"n": 0}

    def poisoned(mini):
        fn = make(mini)

        def loss(batch, logprobs, entropy):
            value, metrics = fn(batch, logprobs, entropy)
            if c.step == 0:
                calls["n"] += 1
                return value * float("nan"), {**metrics, "loss": float("nan")}
            return value, metrics
        return loss

    c._loss_fn = poisoned
    wc0 = params(c)
    c.run()
    report["C"] = {"unchanged_after_nan": not changed(wc0, params(c)), "nonfinite_total": c.nonfinite_total,
                   "poisoned_calls": calls["n"]}
    # D: learning. Short responses and a larger step size make the signal clear in 6 steps; the
    # exported model is checked with transformers.
    d = Trainer(config(workdir, hf_dir, data_dir, "D", **{"parallel.tp": 2, "trainer.total_steps": 6,
                                                          "optimizer.lr": 5e-3, "rollout.max_new_tokens": 4,
                                                          "checkpoint.export_hf_at_end": "true"}), engine=engine)
    d.run()
    if rank == 0:
        from megavrl.data.datasets import VideoTaskDataset

        prepared = d.dataset.take(4, iter(VideoTaskDataset(d.cfg.data, builder=d.builder, split="train")))
        report["learning"] = {"before": preferred_mass(hf_dir, prepared),
                              "after": preferred_mass(str(workdir / "D" / "hf"), prepared),
                              "reward": [m["reward/total"] for m in metrics_of(workdir, "D")]}
    return report


def scenario_pp2(workdir: Path, hf_dir: str, data_dir: str) -> dict:
    from megavrl.rl.trainer import Trainer

    t = Trainer(config(workdir, hf_dir, data_dir, "P", **{"parallel.pp": 2, "trainer.total_steps": 2}))
    w0 = params(t)
    t.run()
    rank = torch.distributed.get_rank()
    return {"weights_changed": changed(w0, params(t)), "metrics": metrics_of(workdir, "P") if rank == 0 else [],
            "last_stage": t.actor.is_last_stage}


def main() -> None:
    scenario, workdir, hf_dir, data_dir = sys.argv[1:5]
    workdir = Path(workdir)
    install_reward()
    report = {"tp2": scenario_tp2, "pp2": scenario_pp2}[scenario](workdir, hf_dir, data_dir)
    rank = torch.distributed.get_rank()
    (workdir / f"report_{scenario}_rank{rank}.json").write_text(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
