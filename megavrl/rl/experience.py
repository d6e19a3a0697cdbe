"""From prepared prompts and rollouts to training sequences (pure functions, no engine, no model).

The GRPO step: :func:`megavrl.rollout.inputs.rollout_prompt` hands each :class:`PreparedPrompt`
to the rollout engine, ``score_groups`` rewards every response, ``group_advantages`` (megavrl.rl)
turns rewards into advantages, and ``grpo_sequences`` pairs each response with the exact prompt
tokens and pixels the trainer must re-score. SFT uses ``sft_sequences`` with :func:`reference_response`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megavrl.log import get_logger
from megavrl.rl.batch import TrainSequence

log = get_logger(__name__)


def prompt_positions(prepared) -> dict:
    """The prompt's M-RoPE ids and the offset of generated tokens (TrainSequence fields)."""
    if prepared.position_ids is None or prepared.rope_delta is None:
        raise ValueError("prepared prompts need M-RoPE position ids: keep data.prompt.compute_position_ids=true")
    return {"prompt_position_ids": prepared.position_ids, "rope_delta": int(prepared.rope_delta)}


def vision_inputs(prepared) -> dict:
    """The trainer-side pixel inputs of a prepared prompt (see megavrl.rl.batch.VISION_KEYS)."""
    return {"pixel_values_videos": prepared.pixel_values_videos, "video_grid_thw": prepared.video_grid_thw,
            "second_per_grid_ts": prepared.second_per_grid_ts}


def ground_truth(sample) -> dict:
    """The reward's view of a dataset row."""
    return {"id": sample.id, "task": sample.task, "question": sample.question, "options": sample.options,
            "answer": sample.answer, "timestamps": sample.timestamps, "duration": sample.duration,
            "meta": sample.meta}  # meta.spans: every ground-truth segment (NExT-GQA)


def score_groups(groups, prepared: list, reward_config) -> list[list]:
    """RewardResult of every response: [num_prompts][n]."""
    from megavrl.rewards import score

    return [[score(p.sample.task, s.text, ground_truth(p.sample), reward_config) for s in g.samples]
            for g, p in zip(groups, prepared)]


def sample(engine, prepared: list, seeds: list[int], rollout_config=None) -> list:
    """Roll out every prepared prompt (``rollout.n`` responses each) with its own sampling seed:
    one RolloutGroup per prompt. rollout_config: sample as it says (n, temperature, top-p/k, lengths,
    stops), whatever config the engine was started with; None: as the engine's."""
    from megavrl.rollout.inputs import rollout_prompt

    overrides = {} if rollout_config is None else rollout_config.sampling()
    return engine.generate([rollout_prompt(p, i) for i, p in enumerate(prepared)], seed=seeds, **overrides)


def keep_informative(groups: list, prepared: list, rewards: list[list], n_prompts: int,
                     max_refills: int | None) -> tuple[list[tuple], dict]:
    """The step's ``(group, prepared, rewards)`` triples. With ``max_refills`` (the zero-variance
    filter on), groups whose n rewards are all equal are dropped and replaced from the spare
    prompts beyond ``n_prompts``, at most ``max_refills`` of them; without it the spares are unused."""
    from megavrl.rl.selection import ZeroVarianceFilter

    triples = list(zip(groups, prepared, rewards))
    if max_refills is None:
        return triples[:n_prompts], {}
    zf = ZeroVarianceFilter(max_refills=max_refills, rewards_of=lambda t: t[2])
    zf.push(triples[n_prompts:])
    kept = zf.filter(triples[:n_prompts])
    return list(kept.groups), {"filter/dropped_groups": kept.num_dropped, "filter/refilled_groups": kept.num_refilled,
                               "filter/kept_groups": len(kept.groups)}


@dataclass
class EngineShare:
    """What one engine's share of a step adds to the step's metrics: picklable, no pixels. The
    shares of all engines, put back in the step's order, give the metrics one engine would give."""

    tasks: list = field(default_factory=list)
    """Task of each scored prompt (the engine's share of ``prompts_per_step``, spares excluded)."""
    rewards: list = field(default_factory=list)
    """RewardResults of those prompts' responses: [prompt][n]."""
    filter_counts: dict = field(default_factory=dict)
    kept_totals: list = field(default_factory=list)
    """Reward totals of the groups kept for training: [group][n]."""
    response_lengths: list = field(default_factory=list)
    """Per kept group: the sampled responses' lengths in tokens."""
    truncated: list = field(default_factory=list)
    """Per kept group: how many responses stopped at max_new_tokens."""
    prompt_lengths: list = field(default_factory=list)
    """Per kept group: prompt tokens."""
    mismatched_prompts: int = 0
    skipped_rows: int = 0
    """Rows this engine's data shard has skipped so far (bad videos, malformed rows)."""
    train_tokens: int = 0
    """Tokens of the training sequences built from this share."""


def share_metrics(shares: list[EngineShare], advantage_kwargs: dict | None) -> dict:
    """The step's experience metrics from every engine's share (in engine order); the GRPO
    metrics only with ``advantage_kwargs`` (None: SFT)."""
    from megavrl.rl.placement import interleave

    metrics: dict = {"data/skipped": sum(s.skipped_rows for s in shares)}
    if advantage_kwargs is None:
        return metrics
    tasks, rewards = interleave([s.tasks for s in shares]), interleave([s.rewards for s in shares])
    from megavrl.rewards import RewardStats

    stats = RewardStats()
    for task, rs in zip(tasks, rewards):
        stats.add_many([task] * len(rs), rs)
    metrics.update(stats.summary(prefix="reward/"))
    for key in sorted({k for s in shares for k in s.filter_counts}):
        metrics[key] = sum(s.filter_counts.get(key, 0) for s in shares)
    kept = interleave([s.kept_totals for s in shares])
    if kept:
        from megavrl.rl.advantages import group_advantages

        totals = torch.tensor(kept, dtype=torch.float32)
        adv, zero_var = group_advantages(totals, **advantage_kwargs)
        lengths = torch.tensor([x for g in interleave([s.response_lengths for s in shares]) for x in g],
                               dtype=torch.float32)
        prompt_lengths = interleave([s.prompt_lengths for s in shares])
        metrics.update({
            "advantage/mean": float(adv.mean()), "advantage/abs_mean": float(adv.abs().mean()),
            "advantage/zero_variance_groups": int(zero_var.sum()),
            "reward/group_std": float(totals.std(dim=1, unbiased=False).mean()),
            "response_len/mean": float(lengths.mean()), "response_len/max": float(lengths.max()),
            "response_len/truncated_fraction": sum(sum(s.truncated) for s in shares) / max(1, len(lengths)),
            "prompt_len/mean": sum(prompt_lengths) / len(prompt_lengths)})
    metrics["data/prompt_token_mismatch"] = sum(s.mismatched_prompts for s in shares)
    return metrics


@dataclass
class SequenceBuild:
    sequences: list[TrainSequence]
    mismatched_prompts: int
    """Groups dropped because the engine's expanded prompt differed from the trainer's tokens."""


def grpo_sequences(groups, prepared: list, advantages: torch.Tensor, rewards: list[list] | None = None) -> SequenceBuild:
    """One TrainSequence per response: the trainer's prompt ids + the sampled tokens.

    advantages: [num_prompts, n]. A group whose prompt tokens, as the engine expanded them,
    differ from the trainer's (``prepared.input_ids``) would train on a different sequence than
    was sampled; it is dropped with a warning and counted.
    """
    sequences, mismatched = [], 0
    for g_idx, (group, prep) in enumerate(zip(groups, prepared)):
        prompt_ids = prep.input_ids
        if list(group.prompt_token_ids) != prompt_ids.tolist():
            mismatched += 1
            log.warning("prompt %s: the rollout engine's %d prompt tokens differ from the trainer's %d: group skipped",
                        prep.sample.id, len(group.prompt_token_ids), len(prompt_ids))
            continue
        for s_idx, sample in enumerate(group.samples):
            if not sample.token_ids:
                continue
            sequences.append(TrainSequence(
                input_ids=torch.cat([prompt_ids, torch.tensor(sample.token_ids, dtype=torch.long)]),
                prompt_len=len(prompt_ids), vision=vision_inputs(prep),
                advantage=float(advantages[g_idx, s_idx]),
                rollout_logprobs=torch.tensor(sample.logprobs) if sample.logprobs else None,
                group=g_idx, **prompt_positions(prep),
                info={"id": prep.sample.id, "task": prep.sample.task,
                      "reward": rewards[g_idx][s_idx].total if rewards else None,
                      "finish_reason": sample.finish_reason}))
    return SequenceBuild(sequences=sequences, mismatched_prompts=mismatched)


def _span(sample) -> str:
    start, end = sample.timestamps
    return f"{start:.1f} to {end:.1f}"


def reference_response(sample) -> str:
    """The answer a perfect model gives, in the format the prompts ask for (SFT targets)."""
    if sample.task == "tvg":
        return f"<think>It happens from {_span(sample)} seconds.</think><answer>{_span(sample)}</answer>"
    if sample.task == "mcq":
        return f"<think>It is {sample.answer_text}.</think><answer>{sample.answer}</answer>"
    if sample.task == "gqa":
        return (f"<think>It is {sample.answer_text}, from {_span(sample)} seconds.</think>"
                f"<answer>({sample.answer}) {_span(sample)}</answer>")
    raise ValueError(f"no reference response for task {sample.task!r}")


def sft_sequences(prepared: list, tokenizer, end_token: str = "<|im_end|>") -> list[TrainSequence]:
    """Prompt + reference response + end-of-turn token, for cross-entropy training."""
    end_id = tokenizer.convert_tokens_to_ids(end_token)
    out = []
    for p in prepared:
        response = tokenizer.encode(reference_response(p.sample), add_special_tokens=False) + [end_id]
        out.append(TrainSequence(input_ids=torch.cat([p.input_ids, torch.tensor(response, dtype=torch.long)]),
                                 prompt_len=p.num_tokens, vision=vision_inputs(p), **prompt_positions(p),
                                 info={"id": p.sample.id, "task": p.sample.task}))
    return out
