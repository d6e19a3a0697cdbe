"""torchrun worker for tests/rl/test_logprobs.py: vocab-parallel log-probs at TP = world size.

Every rank builds the same full logits (padded vocabulary), keeps its TP slice, and compares
log-probs, entropy and their gradients with a single-rank log_softmax over the real vocabulary.
Prints ``OK logprobs tp=<n> rank=<r> max_diff=<d>``.
"""
from __future__ import annotations

import os

import torch

VOCAB, PADDED, B, S = 300, 384, 3, 7  # 84 padding rows: rank 1 of 2 holds padding at its end


def reference(full: torch.Tensor, target: torch.Tensor, temperature: float):
    logp = torch.log_softmax(full[..., :VOCAB].double() / temperature, dim=-1)
    token = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return token, entropy


def main() -> None:
    from megavrl.parallel import destroy_distributed, init_distributed
    from megavrl.rl.logprobs import next_token_logprobs, token_logprobs

    tp = int(os.environ["WORLD_SIZE"])
    layout = init_distributed(tp=tp)
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(B, S, PADDED, generator=gen) * 3
    full[..., VOCAB:] = 0.0  # what zero-initialised padding rows of the output layer give
    target = torch.randint(0, VOCAB, (B, S), generator=gen)
    target[0, :3] = torch.tensor([0, VOCAB - 1, PADDED // tp - 1])  # edges of the slices
    weights = torch.randn(B, S, generator=gen)
    width = PADDED // tp
    worst = 0.0
    for temperature in (1.0, 0.7):
        local = full[..., layout.tp_rank * width:(layout.tp_rank + 1) * width].clone().requires_grad_(True)
        logp, ent = token_logprobs(local, target, vocab_size=VOCAB, temperature=temperature, with_entropy=True)
        (logp * weights + 0.1 * ent).sum().backward()
        ref_full = full.clone().double().requires_grad_(True)
        ref_logp, ref_ent = reference(ref_full, target, temperature)
        (ref_logp * weights + 0.1 * ref_ent).sum().backward()
        ref_grad = ref_full.grad[..., layout.tp_rank * width:(layout.tp_rank + 1) * width]
        diffs = [(logp - ref_logp).abs().max().item(), (ent - ref_ent).abs().max().item(),
                 (local.grad - ref_grad).abs().max().item()]
        assert max(diffs) < 1e-5, (temperature, diffs)
        assert not local.grad[..., max(0, VOCAB - layout.tp_rank * width):].any()  # padding gets no gradient
        worst = max(worst, *diffs)
    # next-token helper = token_logprobs on shifted inputs
    local = full[..., layout.tp_rank * width:(layout.tp_rank + 1) * width]
    nxt, _ = next_token_logprobs(local, target, vocab_size=VOCAB)
    ref_nxt, _ = reference(full[:, :-1], target[:, 1:], 1.0)
    assert nxt.shape == (B, S - 1) and (nxt - ref_nxt).abs().max().item() < 1e-5
    print(f"OK logprobs tp={tp} rank={layout.rank} max_diff={worst:.2e}", flush=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
