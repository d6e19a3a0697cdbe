"""Token log-probs and entropy from vocab-parallel logits equal log_softmax of the gathered logits."""
from __future__ import annotations

import pytest
import torch

from megavrl.rl.logprobs import next_token_logprobs, token_logprobs
from tests.parallel.torchrun import run_torchrun


def test_single_rank_equals_log_softmax_over_real_vocab():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 40) * 4
    logits[..., 37:] = 5.0  # padding rows with large logits must not take probability mass
    target = torch.randint(0, 37, (2, 5))
    logp, ent = token_logprobs(logits, target, vocab_size=37, with_entropy=True, vocab_parallel=False)
    ref = torch.log_softmax(logits[..., :37].double(), -1)
    assert torch.allclose(logp.double(), ref.gather(-1, target.unsqueeze(-1)).squeeze(-1), atol=1e-5)
    assert torch.allclose(ent.double(), -(ref.exp() * ref).sum(-1), atol=1e-5)
    nxt, none = next_token_logprobs(logits, target, vocab_size=37, vocab_parallel=False)
    assert none is None and nxt.shape == (2, 4)
    assert torch.equal(nxt, token_logprobs(logits[:, :-1], target[:, 1:], 37, vocab_parallel=False)[0])


@pytest.mark.distributed
def test_vocab_parallel_at_tp2_equals_gathered_log_softmax():
    """TP=2, padded vocabulary (300 real of 384), temperatures 1 and 0.7: log-probs, entropy and
    the gradients w.r.t. each rank's logit slice all within 1e-5 of a float64 log_softmax."""
    proc = run_torchrun(["-m", "tests.rl.logprobs_worker"], nproc=2, timeout=180)
    assert proc.stdout.count("OK logprobs tp=2") == 2, proc.stdout
