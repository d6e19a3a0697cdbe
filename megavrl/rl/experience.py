"""From prepared prompts and rollouts to training sequences (pure functions, no engine, no model).

The GRPO step: :func:`megavrl.rollout.inputs.rollout_prompt` hands each :class:`PreparedPrompt`
to the rollout engine, ``score_groups`` rewards every response, ``group_advantages`` (megavrl.rl)
turns rewards into advantages, and ``grpo_sequences`` pairs each response with the exact prompt
tokens and pixels the trainer must re-score. SFT uses ``sft_sequences`` with :func:`reference_response`.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def sample(engine, prepared: list, seed: int) -> list:
    """Roll out every prepared prompt (``rollout.n`` responses each): one RolloutGroup per prompt."""
    from megavrl.rollout.inputs import rollout_prompt

    return engine.generate([rollout_prompt(p, i) for i, p in enumerate(prepared)], seed=seed)


def reward_metrics(prepared: list, rewards: list[list]) -> dict:
    """``reward/*`` of a step: means, standard deviations and parse failures, overall and per task."""
    from megavrl.rewards import RewardStats

    stats = RewardStats()
    for p, rs in zip(prepared, rewards):
        stats.add_many([p.sample.task] * len(rs), rs)
    return stats.summary(prefix="reward/")


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


def advantages_of(rewards: list[list], advantage_kwargs: dict) -> tuple[torch.Tensor, dict]:
    """Group advantages [num_prompts, n] of the rewards' totals, and ``advantage/*`` metrics."""
    from megavrl.rl.advantages import group_advantages

    totals = torch.tensor([[r.total for r in rs] for rs in rewards], dtype=torch.float32)
    adv, zero_var = group_advantages(totals, **advantage_kwargs)
    return adv, {"advantage/mean": float(adv.mean()), "advantage/abs_mean": float(adv.abs().mean()),
                 "advantage/zero_variance_groups": int(zero_var.sum()),
                 "reward/group_std": float(totals.std(dim=1, unbiased=False).mean())}


def length_metrics(groups: list, prepared: list) -> dict:
    """``response_len/*`` (sampled tokens, truncation at max_new_tokens) and ``prompt_len/mean``."""
    lengths = torch.tensor([len(s) for g in groups for s in g.samples], dtype=torch.float32)
    truncated = sum(s.finish_reason == "length" for g in groups for s in g.samples)
    return {"response_len/mean": float(lengths.mean()), "response_len/max": float(lengths.max()),
            "response_len/truncated_fraction": truncated / max(1, len(lengths)),
            "prompt_len/mean": sum(p.num_tokens for p in prepared) / len(prepared)}


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
