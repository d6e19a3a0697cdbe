"""From prepared prompts and rollouts to training sequences (pure functions, no engine, no model).

The GRPO step: ``rollout_prompt`` hands each :class:`PreparedPrompt` to the vLLM engine,
``score_groups`` rewards every response, ``group_advantages`` (megavrl.rl) turns rewards into
advantages, and ``grpo_sequences`` pairs each response with the exact prompt tokens and pixels
the trainer must re-score. SFT uses ``sft_sequences`` with :func:`reference_response`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megavrl.log import get_logger
from megavrl.rl.batch import TrainSequence

log = get_logger(__name__)


def rollout_prompt(prepared, index: int | None = None):
    """The rollout engine's input for one prepared prompt: the same frames, one video placeholder."""
    from megavrl.data.prompt import vllm_inputs
    from megavrl.rollout.inputs import RolloutPrompt

    vin = vllm_inputs(prepared)
    return RolloutPrompt(prompt_token_ids=vin["prompt_token_ids"], videos=vin["multi_modal_data"]["video"],
                         mm_processor_kwargs=vin["mm_processor_kwargs"],
                         meta={"id": prepared.sample.id, "index": index})


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
