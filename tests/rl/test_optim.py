"""Megatron DDP + optimizer + LR schedule built from megavrl's config, single process on CPU."""
import pytest
import torch

from megavrl.config import OptimizerConfig


def tiny_gpt():
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2, ffn_hidden_size=64,
                            bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
                            gradient_accumulation_fusion=False, persist_layer_norm=False, apply_rope_fusion=False,
                            hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=64,
                     max_sequence_length=16)
    return model, cfg


@pytest.fixture(scope="module")
def dist1():
    from megavrl.parallel.distributed import destroy_distributed, init_distributed

    init_distributed(tp=1, pp=1, seed=0)
    yield
    destroy_distributed()


def test_warmup_then_linear_decay_and_weights_move(dist1):
    from megavrl.rl.optim import build_actor_optimizer

    torch.manual_seed(0)
    model, cfg = tiny_gpt()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    actor = build_actor_optimizer([model], cfg, OptimizerConfig(lr=1.0, min_lr=0.0, lr_warmup_steps=2,
                                                                lr_decay_style="linear", clip_grad=1.0), total_steps=6)
    lrs = []
    tokens = torch.randint(0, 64, (2, 8))
    mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
    for _ in range(5):
        lrs.append(actor.lr)
        actor.zero_grad()
        out = actor.model[0](tokens, torch.arange(8).expand(2, 8), mask, labels=tokens)
        out.float().mean().backward()
        actor.model[0].finish_grad_sync()
        applied, grad_norm = actor.step()
        assert applied and grad_norm is not None and grad_norm > 0
    # Megatron's schedule: warmup lr = max_lr * step / warmup; then linear decay from max to min over
    # (decay_steps - warmup) = 4 steps: step 3 -> 0.75, step 4 -> 0.5.
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.75, 0.5])
    moved = [n for n, p in actor.model[0].module.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) == len(before)
