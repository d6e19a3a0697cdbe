"""Runs under torchrun (2 processes) for tests/rl/test_trainer.py; writes a JSON report.

usage: trainer_worker.py SCENARIO WORKDIR HF_DIR DATA_DIR
  tp2: GRPO at TP=2: (A) 4 steps with checkpoints at steps 2 and 4; (B) A's output directory as
       it was after step 2, resumed to step 4, which must repeat A's steps 3 and 4 exactly; (C) an infinite
       gradient with a finite loss at step 2 is skipped and counted, and a run whose every step
       has one stops after max_consecutive_nonfinite with a checkpoint; (E) A's checkpoint resumed
       at PP=2 and at TP=1; (D) whether the policy learned what the reward prefers (checked against
       transformers on the exported model, with an HF export at the end).
  pp2: GRPO at PP=2 with tied embeddings (the tiny-tied preset), 3 steps: step 2 with an infinite
       gradient, step 3 with a NaN loss; then (F) 2 steps with the zero-variance filter and refills,
       2 PPO epochs x 2 mini-batches and an evaluation every step.
  tp2 also runs (DP) one GRPO and one SFT step at DP=2 (TP=1) and at DP=1 (TP=2) on the same rollouts.
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
        # Sampling at 0.7, not 1: every run's token_mult_prob_error then also checks that the trainer
        # scores at the sampling temperature and that vLLM returns log-probs at it.
        "rollout.temperature=0.7",
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

        def train_step(*args, **kwargs):
            self.steps.append({"rand": torch.rand(1).item()})
            return step(*args, **kwargs)

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


# Metrics that measure time or memory rather than the computation: they differ between any two runs.
UNTIMED_PREFIXES = ("time/", "throughput/", "memory/", "weight_sync/")


def computed(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "time" and not k.startswith(UNTIMED_PREFIXES)} for m in metrics]


def hf_weights(trainer) -> dict:
    """Full HF-named weights on rank 0 (every rank drives the gathers): layout-independent."""
    return {name: t.clone() for name, t in trainer.actor.export_hf_ranks0()}


def optimizer_digest(trainer) -> dict:
    """Sums over every Adam moment, each shard counted once whatever the layout, and Adam's step."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, is_main_replica

    sums = torch.zeros(4, dtype=torch.float64)  # sum(m), sum(m^2), sum(v), sum(v^2)
    for t in nested_values(trainer.actor.sharded_state_dict()["optimizer"]):
        if not isinstance(t, ShardedTensor) or not is_main_replica(t.replica_id):
            continue
        x = t.data.double()
        if ".exp_avg_sq." in f".{t.key}.":
            sums[2:] += torch.stack([x.sum(), (x * x).sum()])
        elif ".exp_avg." in f".{t.key}.":
            sums[:2] += torch.stack([x.sum(), (x * x).sum()])
    torch.distributed.all_reduce(sums)
    return {"sums": sums.tolist(), "adam_step": trainer.actor.optim.adam_step()}


def optimizer_tensors(trainer) -> list[torch.Tensor]:
    opt = trainer.actor.optim.optimizer
    return [v.detach().clone() for o in getattr(opt, "chained_optimizers", [opt])
            for state in o.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def inf_gradient(trainer, when) -> dict:
    """Make the loss of the steps ``when(step)`` selects finite but its gradient infinite:
    d/dx sqrt(x) at x = 0 is inf, and 1e-30 * sqrt(0) adds 0 to the loss."""
    make, calls = trainer._loss_fn, {"n": 0}

    def poisoned(*normalisers):
        fn = make(*normalisers)

        def loss(batch, logprobs, entropy):
            value, metrics = fn(batch, logprobs, entropy)
            if when(trainer.step):
                calls["n"] += 1
                value = value + 1e-30 * torch.sqrt(logprobs - logprobs.detach()).sum()
            return value, metrics
        return loss

    trainer._loss_fn = poisoned
    return calls


def nan_loss(trainer, when) -> None:
    make = trainer._loss_fn

    def poisoned(*normalisers):
        fn = make(*normalisers)

        def loss(batch, logprobs, entropy):
            value, metrics = fn(batch, logprobs, entropy)
            if when(trainer.step):
                return value * float("nan"), {**metrics, "loss": float("nan")}
            return value, metrics
        return loss

    trainer._loss_fn = poisoned


def snapshot_before_step(trainer, step_index: int) -> dict:
    """Weights and optimizer tensors right before step ``step_index`` (0-based) runs."""
    taken, step = {}, trainer.train_step

    def train_step(*args, **kwargs):
        if trainer.step == step_index:
            taken.update(params=params(trainer), optim=optimizer_tensors(trainer))
        return step(*args, **kwargs)

    trainer.train_step = train_step
    return taken


def unchanged(before: dict, trainer) -> bool:
    return not changed(before["params"], params(trainer)) and not changed(before["optim"], optimizer_tensors(trainer))


def scenario_tp2(workdir: Path, hf_dir: str, data_dir: str) -> dict:
    from megavrl.rl.trainer import NonFiniteStop, Trainer

    report: dict = {}
    # A: four uninterrupted steps, checkpoint at 2 (and 4, at the end).
    a = Trainer(config(workdir, hf_dir, data_dir, "A", **{"parallel.tp": 2, "trainer.total_steps": 4,
                                                          "checkpoint.save_every": 2}))
    rank = torch.distributed.get_rank()
    engine = a.engine
    rec_a, w0 = Recorder(a), params(a)
    w0_hf = hf_weights(a)
    a.run()
    rec_a.detach()
    report["A"] = {"steps": rec_a.steps, "metrics": computed(metrics_of(workdir, "A")) if rank == 0 else [],
                   "weights_changed": changed(w0, params(a)), "optimizer": optimizer_digest(a)}
    a_weights = hf_weights(a)
    # B: the same run stopped after step 2 and resumed to step 4: A's output directory as it was
    # after step 2 (its step-2 checkpoint and its metrics, which still list steps 3 and 4; the
    # resumed run drops them), resumed with checkpoint.resume=auto.
    if rank == 0:
        import shutil

        shutil.copytree(workdir / "A" / "checkpoints" / "step_00000002", workdir / "B" / "checkpoints" / "step_00000002")
        shutil.copytree(workdir / "A" / "tensorboard", workdir / "B" / "tensorboard")
    torch.distributed.barrier()
    b2 = Trainer(config(workdir, hf_dir, data_dir, "B", **{"parallel.tp": 2, "trainer.total_steps": 4,
                                                           "checkpoint.save_every": 2}), engine=engine)
    b2_resumed_at, rec_b = b2.step, Recorder(b2)
    b2.run()
    rec_b.detach()
    b_weights = hf_weights(b2)
    report["B"] = {"resumed_at": b2_resumed_at, "steps": rec_b.steps,
                   "metrics": computed(metrics_of(workdir, "B")) if rank == 0 else [],
                   "optimizer": optimizer_digest(b2),
                   "weights_equal_A": rank != 0 or all(torch.equal(a_weights[k], b_weights[k]) for k in a_weights)}
    # C: an infinite gradient with a finite loss at step 2 changes nothing, then a run that keeps
    # producing them stops after trainer.max_consecutive_nonfinite steps, with a checkpoint.
    # Step 3 then has a NaN loss.
    c = Trainer(config(workdir, hf_dir, data_dir, "C", **{"parallel.tp": 2, "trainer.total_steps": 3}), engine=engine)
    calls = inf_gradient(c, when=lambda step: step == 1)
    nan_loss(c, when=lambda step: step == 2)
    before = snapshot_before_step(c, 1)
    c.run()
    c_metrics = metrics_of(workdir, "C") if rank == 0 else []
    report["C"] = {"unchanged_after_inf_and_nan": unchanged(before, c), "nonfinite_total": c.nonfinite_total,
                   "poisoned_calls": calls["n"], "metrics": c_metrics}
    c2 = Trainer(config(workdir, hf_dir, data_dir, "C2", **{"parallel.tp": 2, "trainer.total_steps": 6,
                                                            "trainer.max_consecutive_nonfinite": 2}), engine=engine)
    inf_gradient(c2, when=lambda step: True)
    try:
        c2.run()
        report["C2"] = {"stopped": False}
    except NonFiniteStop as e:
        report["C2"] = {"stopped": True, "message": str(e), "step": c2.step,
                        "checkpoints": [p.name for _, p in c2.ckpt.complete()],
                        "status": json.loads((workdir / "C2" / "run_status.json").read_text()) if rank == 0 else {}}
    # R: the engine (on rank 0 only) samples at 0.7 with processed log-probs; a run at temperature 1
    # needs raw ones and is refused on every rank, rank 1 (no engine) included, instead of one rank
    # raising and the other waiting for it.
    try:
        Trainer(config(workdir, hf_dir, data_dir, "R", **{"parallel.tp": 2, "rollout.temperature": 1.0}), engine=engine)
        report["R"] = {"refused": False}
    except ValueError as e:
        report["R"] = {"refused": True, "message": str(e)}
    # E: A's final checkpoint (TP=2, with optimizer) resumed at PP=2 and at TP=1 (DP=2): weights
    # and Adam state resharded, per-rank RNG restarted; then one more step at that layout.
    ckpt = str(workdir / "A" / "checkpoints" / "step_00000004")
    for name, over in (("E_pp2", {"parallel.pp": 2}), ("E_tp1", {"parallel.tp": 1})):
        e = Trainer(config(workdir, hf_dir, data_dir, name, **over, **{"trainer.total_steps": 5,
                                                                       "checkpoint.resume": ckpt}), engine=engine)
        loaded = {"optimizer": optimizer_digest(e), "step": e.step}
        e_weights = hf_weights(e)
        if rank == 0:
            loaded["weights_equal_A"] = all(torch.equal(a_weights[k], e_weights[k]) for k in a_weights)
        w_e = params(e)
        e.run()
        loaded["trained"] = changed(w_e, params(e))
        loaded["metrics"] = computed(metrics_of(workdir, name)) if rank == 0 else []
        report[name] = loaded
    # DP: one GRPO and one SFT step from the same start at DP=2 (TP=1) and at DP=1 (TP=2), on the
    # same rollouts (one engine, the same seeds). adam_eps=1 makes Adam's first step ~ lr * g (with
    # eps=1e-8 it is lr * sign(g), and a gradient within rounding of 0 could move a weight by
    # +-lr in one layout and not the other), so the weights after the step compare to rounding;
    # no gradient clipping (clip_grad=1e6), which would hide a gradient off by a constant factor.
    report["DP"] = {}
    for algo, extra in (("grpo", {}), ("sft", {"trainer.prompts_per_step": 3})):  # 3: a rank gets a filler
        runs = {}
        for name, over in (("dp1", {"parallel.tp": 2}), ("dp2", {"parallel.tp": 1})):
            t = Trainer(config(workdir, hf_dir, data_dir, f"DP_{algo}_{name}", **over, **extra, **{
                "algorithm.name": algo, "trainer.total_steps": 1, "optimizer.adam_eps": 1.0, "optimizer.clip_grad": 1e6,
                "rollout.engines": 1}),  # one engine for both layouts (engines per replica: test_placement.py)
                engine=engine if algo == "grpo" else None)
            rec = Recorder(t)
            t.run()
            rec.detach()
            weights = hf_weights(t)
            runs[name] = {"steps": rec.steps, "metrics": computed(metrics_of(workdir, f"DP_{algo}_{name}"))
                          if rank == 0 else [], "weights": weights}
        if rank == 0:
            w1, w2 = runs["dp1"].pop("weights"), runs["dp2"].pop("weights")
            runs["max_weight_diff"] = max((w1[k] - w2[k]).abs().max().item() for k in w1)
            runs["max_update"] = max((w1[k] - w0_hf[k]).abs().max().item() for k in w1)
        report["DP"][algo] = runs
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


def tied_copies_equal(trainer) -> bool:
    """At PP=2 with tied embeddings the first stage's embedding and the last stage's output layer
    are two copies of one HF tensor: after every update they must still be equal, bit for bit."""
    mine = trainer.actor.model.shared_embedding_or_output_weight().detach().clone()
    copies: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(copies, mine)
    return all(torch.equal(c, copies[0]) for c in copies)


def install_refill_reward() -> None:
    """mcq rows always score 1 (their groups have zero variance: dropped, refilled); tvg and gqa
    rows score a hash of the response, different for different responses."""
    import zlib

    from megavrl.rewards import RewardResult, register_reward

    def constant(response, sample, config):
        return RewardResult(total=1.0, components={"constant": 1.0}, parsed={})

    def hashed(response, sample, config):
        value = zlib.crc32(response.encode()) / 2**32
        return RewardResult(total=value, components={"hash": value}, parsed={})

    register_reward("mcq", replace=True)(constant)
    for task in ("tvg", "gqa"):
        register_reward(task, replace=True)(hashed)


class UpdateRecorder:
    """Every optimizer update's metrics (actor.train_step), and per step the prompts taken from the
    data stream and those trained on (rank 0)."""

    def __init__(self, trainer):
        import megavrl.rl.experience as experience

        self.updates: list[dict] = []
        self.taken: list[list[str]] = []
        self.trained: list[list[str]] = []
        step, build, take = trainer.actor.train_step, experience.grpo_sequences, trainer._next_prompts

        def next_prompts(n):
            items = take(n)
            self.taken.append([p.sample.id for p in items])
            return items

        def train_step(*args, **kwargs):
            result = step(*args, **kwargs)
            self.updates.append({"applied": result.applied, **result.metrics})
            return result

        def grpo_sequences(groups, prepared, *args, **kwargs):
            self.trained.append([p.sample.id for p in prepared])
            return build(groups, prepared, *args, **kwargs)

        trainer.actor.train_step, trainer._next_prompts = train_step, next_prompts
        experience.grpo_sequences = grpo_sequences
        self._restore = (experience, build)

    def detach(self):
        experience, build = self._restore
        experience.grpo_sequences = build


def scenario_pp2(workdir: Path, hf_dir: str, data_dir: str) -> dict:
    """hf_dir is the tied preset: PP=2 puts the embedding and its tied output copy on two stages."""
    from megavrl.rl.trainer import Trainer

    t = Trainer(config(workdir, hf_dir, data_dir, "P", **{"parallel.pp": 2, "trainer.total_steps": 3}))
    rank = torch.distributed.get_rank()
    engine = t.engine
    calls = inf_gradient(t, when=lambda step: step == 1)  # step 2 of 3: an infinite gradient
    nan_loss(t, when=lambda step: step == 2)  # step 3: a NaN loss
    before = snapshot_before_step(t, 1)
    w0 = params(t)
    t.run()
    report = {"weights_changed": changed(w0, params(t)), "metrics": metrics_of(workdir, "P") if rank == 0 else [],
              "last_stage": t.actor.is_last_stage, "unchanged_after_inf": unchanged(before, t),
              "nonfinite_total": t.nonfinite_total, "poisoned_calls": calls["n"], "tied_equal": tied_copies_equal(t)}
    # F: the zero-variance filter with refills, 2 PPO epochs x 2 mini-batches, an evaluation every
    # step; 2 steps.
    install_refill_reward()
    f = Trainer(config(workdir, hf_dir, data_dir, "F", **{
        "parallel.pp": 2, "trainer.total_steps": 2, "optimizer.lr": 5e-3, "algorithm.filter_zero_variance": "true",
        "selection.max_refills": 4, "algorithm.ppo_epochs": 2, "algorithm.mini_batches": 2,
        "trainer.eval_every": 1, "data.val": f"[{{json_path: {data_dir}/val.jsonl, data_folder: {data_dir}}}]"}),
        engine=engine)
    updates = UpdateRecorder(f)
    f.run()
    updates.detach()
    report["F"] = {"taken": updates.taken, "trained": updates.trained, "updates": updates.updates,
                   "adam_step": f.actor.optim.adam_step(), "tied_equal": tied_copies_equal(f),
                   "metrics": metrics_of(workdir, "F") if rank == 0 else [],
                   "eval_dirs": sorted(p.name for p in (workdir / "F" / "eval").iterdir()) if rank == 0 else []}
    return report


def main() -> None:
    scenario, workdir, hf_dir, data_dir = sys.argv[1:5]
    workdir = Path(workdir)
    install_reward()
    report = {"tp2": scenario_tp2, "pp2": scenario_pp2}[scenario](workdir, hf_dir, data_dir)
    rank = torch.distributed.get_rank()
    (workdir / f"report_{scenario}_rank{rank}.json").write_text(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
