"""What the rollout engine returns: per prompt, the exact prompt tokens and n sampled responses."""
from __future__ import annotations

from dataclasses import dataclass, field

from megavrl.rollout.inputs import RolloutPrompt


@dataclass
class RolloutSample:
    """One sampled response.

    token_ids: the response tokens, [L].
    logprobs: log-probability (nats) of each sampled token under softmax(logits / temperature),
        the distribution it was sampled from (``RolloutConfig.logprobs_mode`` "auto"; vLLM's raw
        log-probs, temperature 1, with ``raw_logprobs``), [L]; empty when the engine was asked for
        no log-probabilities.
    finish_reason: "stop" (EOS or a stop string/token), "length" (hit max_new_tokens) or "abort".
    stop_reason: the stop token id or string that ended it, None for EOS or length.
    """

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str
    stop_reason: int | str | None = None

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class RolloutGroup:
    """The n responses to one prompt.

    prompt_token_ids: the prompt exactly as vLLM ran it, with each video/image pad token expanded
        to the item's token count, so ``prompt_token_ids + sample.token_ids`` is the sequence the
        trainer re-scores.
    """

    prompt_index: int
    prompt: RolloutPrompt
    prompt_token_ids: list[int]
    samples: list[RolloutSample] = field(default_factory=list)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_response_tokens(self) -> int:
        return sum(len(s) for s in self.samples)


def group_from_request_output(output, index: int, prompt: RolloutPrompt, with_logprobs: bool) -> RolloutGroup:
    """Convert one vLLM ``RequestOutput`` (n completions) to a ``RolloutGroup``."""
    samples = []
    for completion in sorted(output.outputs, key=lambda c: c.index):
        token_ids = list(completion.token_ids)
        logprobs: list[float] = []
        if with_logprobs:
            if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
                raise RuntimeError(f"vLLM returned {0 if completion.logprobs is None else len(completion.logprobs)} "
                                   f"log-probabilities for {len(token_ids)} tokens of prompt {index}")
            # Each position maps token id -> Logprob; the sampled token is always present.
            logprobs = [float(step[tok].logprob) for step, tok in zip(completion.logprobs, token_ids)]
        samples.append(RolloutSample(token_ids=token_ids, logprobs=logprobs,
                                     finish_reason=str(completion.finish_reason), text=completion.text,
                                     stop_reason=completion.stop_reason))
    return RolloutGroup(prompt_index=index, prompt=prompt, prompt_token_ids=list(output.prompt_token_ids),
                        samples=samples)
