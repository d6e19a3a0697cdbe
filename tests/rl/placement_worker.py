"""Runs under torchrun for tests/rl/test_placement.py; writes a JSON report per rank.

usage: placement_worker.py SCENARIO WORKDIR HF_DIR DATA_DIR
  one:     world 2, TP=1 (DP=2), rollout.engines=1: one GRPO step, checkpoint at step 1.
  two:     the same with rollout.engines=2 (one engine per replica, each on its replica's rank).
  resume1: world 1 (DP=1): resume the "two" run's checkpoint and train step 2.
Each rank records, for the prompts its engine sampled, the prompt ids, token ids and texts.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.rl.trainer_worker import computed, config, install_reward, metrics_of  # noqa: E402


def record_samples(trainer) -> dict:
    """prompt id -> the sampled responses' token ids and texts, for the prompts this rank's engine sampled."""
    seen: dict = {}
    if trainer.engine is None:
        return seen
    generate = trainer.engine.generate

    def recording(prompts, **kwargs):
        groups = generate(prompts, **kwargs)
        for prompt, group in zip(prompts, groups):
            seen[prompt.meta["id"]] = {"tokens": [s.token_ids for s in group.samples],
                                       "texts": [s.text for s in group.samples]}
        return groups

    trainer.engine.generate = recording
    return seen


def main(scenario: str, workdir: Path, hf_dir: str, data_dir: str) -> None:
    from megavrl.parallel.collectives import global_rank
    from megavrl.rl.trainer import Trainer

    install_reward()
    common = {"trainer.prompts_per_step": 4, "trainer.micro_batch_size": 1, "checkpoint.save_every": 1,
              "algorithm.kl_coef": 0.0}
    if scenario == "resume1":
        cfg = config(workdir, hf_dir, data_dir, "two", **common, **{"trainer.total_steps": 2})
    else:
        cfg = config(workdir, hf_dir, data_dir, scenario, **common, **{
            "trainer.total_steps": 1, "rollout.engines": 1 if scenario == "one" else "auto"})
    trainer = Trainer(cfg)
    samples = record_samples(trainer)
    summary = trainer.run()
    rank = global_rank()
    report = {"samples": samples, "hosts_engine": trainer.placement.hosts_engine,
              "engines": trainer.placement.engines, "step": summary["step"],
              "metrics": computed(metrics_of(workdir, "two" if scenario == "resume1" else scenario)) if rank == 0 else []}
    trainer.close()
    (workdir / f"report_{scenario}_rank{rank}.json").write_text(json.dumps(report))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4])
