"""The GRPO policy loss: clipped surrogate, dual clip, KL to the reference, entropy bonus, TIS.

Pure functions over tensors of shape [B, T] (B sequences, T response positions; a 0/1 or bool
``response_mask`` marks the real response tokens). No distributed code: a trainer that splits a
batch into micro-batches or data-parallel ranks computes the global normalisers once for the
whole batch (``batch_normalisers`` on the full mask, all-reduced) and passes them to every call;
then the sum of the micro-batch losses is the full-batch loss and their gradients add up to the
full-batch gradient, whatever the split.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from megavrl.rl.config import KL_ESTIMATORS, LOSS_AGG_MODES

Number = Union[int, float, torch.Tensor]

_LOG_RATIO_LIMIT = 20.0  # exp(20) ~ 5e8: keeps ratios finite when log-probs drift far apart


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3",
               clamp: Optional[float] = 10.0) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi, shape [B, T].

    With d = logprobs - ref_logprobs (log pi(a|s) - log pi_ref(a|s)), following Schulman's
    "Approximating KL divergence":
        k1 = d                                      (unbiased, high variance, can be negative)
        k2 = 0.5 * d**2                             (biased, low variance, >= 0)
        k3 = exp(-d) - (-d) - 1
           = exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1
                                                    (unbiased, low variance, >= 0)
    For k3, -d is first clamped to [-20, 20] so that exp stays finite. The estimate is then
    clamped to [-clamp, clamp] (None: no clamp), which also zeroes its gradient beyond.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl estimator {estimator!r} is not one of {', '.join(map(repr, KL_ESTIMATORS))}")
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} "
                         f"differ in shape")
    diff = logprobs - ref_logprobs
    if estimator == "k1":
        kl = diff
    elif estimator == "k2":
        kl = 0.5 * diff.square()
    else:
        neg = (-diff).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
        kl = torch.exp(neg) - neg - 1.0
    if clamp is not None:
        kl = kl.clamp(-clamp, clamp)
    return kl


def batch_normalisers(response_mask: torch.Tensor) -> tuple[int, int]:
    """(number of response tokens, number of sequences with at least one response token) of a mask.

    Compute these on the *whole* batch (sum them over data-parallel ranks) and pass them as
    ``global_num_tokens`` and ``global_num_seqs`` to every micro-batch's loss.
    """
    mask = response_mask.bool()
    return int(mask.sum().item()), int((mask.sum(dim=-1) > 0).sum().item())


def aggregate_loss(loss_mat: torch.Tensor, response_mask: torch.Tensor, mode: str = "token-mean",
                   global_num_tokens: Optional[Number] = None, global_num_seqs: Optional[Number] = None,
                   max_response_len: Optional[int] = None) -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar, over the tokens where ``response_mask`` is set.

    With l_it the loss of token t of sequence i, n_i its number of response tokens, N_tok =
    ``global_num_tokens`` and N_seq = ``global_num_seqs`` (the whole batch's counts; default:
    this call's own, i.e. sum(n_i) and #{i: n_i > 0}), and L = ``max_response_len`` (default T):
        "token-mean":               sum_i sum_t l_it / N_tok
        "seq-mean-token-mean":      sum_i (sum_t l_it / n_i) / N_seq
        "seq-mean-token-sum":       sum_i sum_t l_it / N_seq
        "seq-mean-token-sum-norm":  sum_i sum_t l_it / (N_seq * L)      (Dr. GRPO)
    Each is a sum of per-token or per-sequence terms over one constant, so summing the results
    of the micro-batches of a batch (same global normalisers) gives the batch's value. For
    "seq-mean-token-sum-norm" pass a constant L (the rollout's max new tokens) so that the loss
    scale does not depend on how much a batch happens to be padded. (verl divides by T only,
    not by N_seq; here it is the normalised form of "seq-mean-token-sum".)
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"loss aggregation {mode!r} is not one of {', '.join(map(repr, LOSS_AGG_MODES))}")
    if loss_mat.shape != response_mask.shape or loss_mat.dim() != 2:
        raise ValueError(f"loss {tuple(loss_mat.shape)} and response_mask {tuple(response_mask.shape)} "
                         f"must both be [B, T]")
    valid = response_mask.bool()
    masked = torch.where(valid, loss_mat, torch.zeros_like(loss_mat))
    if mode == "token-mean":
        return masked.sum() / _denominator(global_num_tokens, valid.sum(), loss_mat)
    tokens_per_seq = valid.sum(dim=-1).to(loss_mat.dtype)
    num_seqs = _denominator(global_num_seqs, (tokens_per_seq > 0).sum(), loss_mat)
    seq_sums = masked.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        per_seq = seq_sums / tokens_per_seq.clamp(min=1.0)
    elif mode == "seq-mean-token-sum":
        per_seq = seq_sums
    else:
        length = loss_mat.shape[-1] if max_response_len is None else max_response_len
        if length <= 0:
            raise ValueError(f"max_response_len={max_response_len} must be a positive number of tokens")
        per_seq = seq_sums / float(length)
    return per_seq.sum() / num_seqs


def _denominator(given: Optional[Number], local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    value = local if given is None else torch.as_tensor(given)
    return value.to(device=like.device, dtype=like.dtype).clamp(min=1.0)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, *, ref_logprobs: Optional[torch.Tensor] = None,
                rollout_logprobs: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
                clip_low: float = 0.2, clip_high: float = 0.28, dual_clip: Optional[float] = 3.0,
                kl_coef: float = 0.01, kl_estimator: str = "k3", kl_clamp: Optional[float] = 10.0,
                entropy_coef: float = 0.0, loss_agg: str = "token-mean", tis_cap: Optional[float] = None,
                global_num_tokens: Optional[Number] = None, global_num_seqs: Optional[Number] = None,
                max_response_len: Optional[int] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of a (micro-)batch and its metrics.

    Args (tensors [B, T] unless said; positions outside ``response_mask`` are ignored, even NaN):
        logprobs: log pi_theta(a_t) of the trainer, with gradient.
        old_logprobs: log-probs of the policy that sampled, recomputed by the trainer (no grad).
        advantages: [B] (one per sequence) or [B, T] (no grad).
        response_mask: bool or 0/1, True on response tokens.
        ref_logprobs: the reference policy's log-probs; required when kl_coef != 0.
        rollout_logprobs: the rollout engine's (vLLM's) log-probs; required when tis_cap is set.
        entropy: per-token entropy of pi_theta, with gradient; required when entropy_coef != 0.
        clip_low, clip_high, dual_clip, kl_coef, kl_estimator, kl_clamp, entropy_coef, loss_agg,
        tis_cap: as in ``GRPOConfig`` (pass ``**cfg.loss_kwargs()``).
        global_num_tokens, global_num_seqs, max_response_len: see ``aggregate_loss``.
    Per token, with r = exp(logprobs - old_logprobs) (log-ratio clamped to [-20, 20]) and A the
    advantage:
        pg = max(-A * r, -A * clip(r, 1 - clip_low, 1 + clip_high))
        pg = min(pg, -A * dual_clip)                  where A < 0   (if dual_clip is not None)
        pg = pg * min(exp(old_logprobs - rollout_logprobs), tis_cap)  (if tis_cap; weight detached)
    and the loss is
        agg(pg) + kl_coef * agg(kl_penalty(logprobs, ref_logprobs)) - entropy_coef * agg(entropy)
    with agg = ``aggregate_loss(., mode=loss_agg, global normalisers)``.
    Returns:
        (loss, metrics). Metrics are floats, each normalised by the global normalisers, so that
        summing one metric over the micro-batches of a batch gives its batch value:
        loss, pg_loss, kl_loss (unweighted; with ref_logprobs), clip_fraction (fraction of tokens
        where the ratio clip is active), dual_clip_fraction (tokens where the dual clip is
        active), approx_kl (token mean of (r - 1) - log r, the k3 estimate of KL(old || new)),
        ratio_mean, entropy (token mean; with entropy), token_mult_prob_error (with
        rollout_logprobs; NeMo-RL's definition: the token mean of
        exp(|old_logprobs - rollout_logprobs|), 1.0 when trainer and rollout engine agree),
        tis_weight_mean (with tis_cap), num_tokens (this call's count).
    """
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    for name, tensor in (("old_logprobs", old_logprobs), ("response_mask", response_mask),
                         ("ref_logprobs", ref_logprobs), ("rollout_logprobs", rollout_logprobs),
                         ("entropy", entropy)):
        if tensor is not None and tensor.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, logprobs {tuple(logprobs.shape)}: "
                             f"they must match")
    if advantages.shape not in (logprobs.shape, logprobs.shape[:1]):
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(logprobs.shape)}, got {tuple(advantages.shape)}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip} must be > 1, or None to disable it")
    if kl_coef != 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs; pass them or set kl_coef=0")
    if tis_cap is not None and rollout_logprobs is None:
        raise ValueError(f"tis_cap={tis_cap} needs rollout_logprobs from the rollout engine; "
                         f"pass them or set tis_cap=None")
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs the per-token entropy; pass it or set entropy_coef=0")

    valid = response_mask.bool()
    zeros = torch.zeros_like(logprobs)

    def on_tokens(x: torch.Tensor) -> torch.Tensor:
        # Padding may hold garbage (NaN, -inf); where() keeps it out of values and gradients.
        return torch.where(valid, x.to(logprobs.dtype), zeros)

    def agg(x: torch.Tensor) -> torch.Tensor:
        return aggregate_loss(x, valid, loss_agg, global_num_tokens, global_num_seqs, max_response_len)

    num_tokens = _denominator(global_num_tokens, valid.sum(), logprobs)

    def token_mean(x: torch.Tensor) -> torch.Tensor:
        return on_tokens(x.detach()).sum() / num_tokens

    logp = on_tokens(logprobs)
    old = on_tokens(old_logprobs.detach())
    adv = advantages.detach().to(logprobs.dtype)
    adv = on_tokens(adv[:, None].expand_as(logprobs) if adv.dim() == 1 else adv)

    log_ratio = (logp - old).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    # Metrics stay tensors until the end: one device sync per call, not one per metric.
    metrics: dict[str, torch.Tensor] = {"clip_fraction": token_mean((pg_clipped > pg_unclipped).to(logprobs.dtype))}
    if dual_clip is not None:
        pg_dual = -adv * dual_clip
        negative = adv < 0
        metrics["dual_clip_fraction"] = token_mean((negative & (pg > pg_dual)).to(logprobs.dtype))
        pg = torch.where(negative, torch.minimum(pg, pg_dual), pg)
    if rollout_logprobs is not None:
        rollout = on_tokens(rollout_logprobs.detach())
        metrics["token_mult_prob_error"] = token_mean(torch.exp((old - rollout).abs()))
        if tis_cap is not None:
            weight = torch.exp((old - rollout).clamp(-_LOG_RATIO_LIMIT, _LOG_RATIO_LIMIT)).clamp(max=tis_cap)
            metrics["tis_weight_mean"] = token_mean(weight)
            pg = pg * weight

    pg_loss = agg(pg)
    loss = pg_loss
    if ref_logprobs is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and kl_coef != 0):
            kl_loss = agg(kl_penalty(logp, on_tokens(ref_logprobs.detach()), kl_estimator, kl_clamp))
        if kl_coef != 0:
            loss = loss + kl_coef * kl_loss
        metrics["kl_loss"] = kl_loss.detach()
    if entropy is not None:
        entropy_tokens = on_tokens(entropy)
        if entropy_coef != 0:
            loss = loss - entropy_coef * agg(entropy_tokens)
        metrics["entropy"] = token_mean(entropy_tokens)
    metrics["approx_kl"] = token_mean(ratio - 1.0 - log_ratio)
    metrics["ratio_mean"] = token_mean(ratio)
    metrics["pg_loss"] = pg_loss.detach()
    metrics["loss"] = loss.detach()
    metrics["num_tokens"] = valid.sum().to(logprobs.dtype)
    values = torch.stack([value.to(torch.float64) for value in metrics.values()]).tolist()
    return loss, dict(zip(metrics, values))


def sft_loss(logprobs: torch.Tensor, loss_mask: torch.Tensor, num_tokens: Number,
             entropy: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy on the response tokens (the SFT baseline and warm start).

    ``num_tokens`` is the response-token count of the whole mini-batch (every micro-batch, every
    data-parallel rank), so that summing the micro-batches' losses gives the token mean of the
    mini-batch, as ``policy_loss``'s global normalisers do.
    """
    nll = -(logprobs * loss_mask).sum() / num_tokens
    metrics = {"loss": nll.item()}
    if entropy is not None:
        metrics["entropy"] = ((entropy.detach() * loss_mask).sum() / num_tokens).item()
    metrics["num_tokens"] = float(loss_mask.sum())
    return nll, metrics
