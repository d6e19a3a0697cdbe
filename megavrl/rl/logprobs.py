"""Log-probabilities and entropy of tokens from vocab-parallel logits, without gathering the vocabulary.

With tensor parallelism the output layer leaves each TP rank with a slice of the vocabulary:
rank r holds logits [..., r*Vl:(r+1)*Vl] of the padded vocabulary (Vl = padded_vocab / TP).
Gathering [B, S, V] on one rank costs B*S*V floats (152k per token for Qwen2.5); instead each
rank reduces its slice to a few numbers per token and the TP group all-reduces those:

    m      = max over the vocabulary               (all-reduce MAX, no gradient: a stabiliser)
    Z      = sum_v exp(l_v - m)                     (all-reduce SUM)
    l_y    = logit of the target token y            (all-reduce SUM, 0 on ranks not holding y)
    log p(y) = l_y - m - log Z
    H      = log Z - sum_v p_v (l_v - m)            (all-reduce SUM)

Rows of the padded vocabulary (ids >= the real vocab size) are masked out: they are not
tokens, and their zero-initialised logits would otherwise take probability mass. The sums use
Megatron's ``reduce_from_tensor_model_parallel_region`` (all-reduce forward, identity backward),
so both outputs are differentiable with respect to the local logits: the GRPO loss
backpropagates through them.

Everything runs in float32. Targets are the *next* tokens: for logits [B, S, V] of a sequence
``input_ids``, score ``input_ids[:, 1:]`` with ``logits[:, :-1]`` (see :func:`next_token_logprobs`).
"""
from __future__ import annotations

import torch


def _tp_group_and_rank(vocab_parallel: bool):
    if not vocab_parallel:
        return None, 0, 1
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, 0, 1
    size = ps.get_tensor_model_parallel_world_size()
    if size == 1:
        return None, 0, 1
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), size


def _sum_over_tp(x: torch.Tensor, group) -> torch.Tensor:
    if group is None:
        return x
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    return reduce_from_tensor_model_parallel_region(x, group=group)


def token_logprobs(logits: torch.Tensor, target: torch.Tensor, vocab_size: int | None = None,
                   temperature: float = 1.0, with_entropy: bool = False, vocab_parallel: bool = True,
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of ``target`` under ``softmax(logits / temperature)``, and optionally the entropy.

    logits: [..., Vl] this TP rank's slice of the (padded) vocabulary (``vocab_parallel=True``,
        the layout of Megatron's output layer with parallel_output), or the whole vocabulary
        (``vocab_parallel=False``, or TP = 1).
    target: [...] token ids (global ids, any rank), long.
    vocab_size: the real vocabulary size; ids >= it are padding and get probability 0. Default: no
        padding.
    temperature: divide logits first (use the rollout's sampling temperature).
    Returns (logprobs [...], entropy [...] or None), float32, identical on every TP rank.
    """
    import torch.distributed as dist

    group, rank, _ = _tp_group_and_rank(vocab_parallel)
    local = logits.float()
    if temperature != 1.0:
        local = local / temperature
    width = local.shape[-1]
    start = rank * width
    ids = torch.arange(start, start + width, device=local.device)
    padded = ids >= vocab_size if vocab_size is not None else None
    if padded is not None and padded.any():
        local = local.masked_fill(padded, float("-inf"))

    with torch.no_grad():
        m = local.max(dim=-1, keepdim=True).values
        if group is not None:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shifted = local - m  # -inf on padded rows
    exp = shifted.exp()
    z = _sum_over_tp(exp.sum(dim=-1), group)
    log_z = z.log()

    in_range = (target >= start) & (target < start + width)
    local_target = (target - start).clamp(0, width - 1)
    picked = shifted.gather(-1, local_target.unsqueeze(-1)).squeeze(-1)
    picked = torch.where(in_range, picked, torch.zeros_like(picked))
    logprobs = _sum_over_tp(picked, group) - log_z

    entropy = None
    if with_entropy:
        finite = torch.where(torch.isfinite(shifted), shifted, torch.zeros_like(shifted))
        weighted = _sum_over_tp((exp * finite).sum(dim=-1), group)
        entropy = log_z - weighted / z
    return logprobs, entropy


def next_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, vocab_size: int | None = None,
                        temperature: float = 1.0, with_entropy: bool = False, vocab_parallel: bool = True,
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of each next token: logits [B, S, V(l)] and input_ids [B, S] -> [B, S - 1]
    (position t scores input_ids[:, t + 1])."""
    return token_logprobs(logits[:, :-1], input_ids[:, 1:], vocab_size=vocab_size, temperature=temperature,
                          with_entropy=with_entropy, vocab_parallel=vocab_parallel)
