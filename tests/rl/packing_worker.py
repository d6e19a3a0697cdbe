"""torchrun worker (2 processes, gloo) for tests/rl/test_packing.py: packed == padded through the actor.

usage: packing_worker.py HF_DIR

1. Token budget at DP=2 (TP=1): each rank cuts its share of an uneven length mix by
   rank_micro_batches; the ranks' counts are gathered and must be equal, and the union of the
   ranks' sequences must be the mini-batch, each once -- prints ``BUDGET rank=<r> counts=<c>``.
2. At (TP, PP) = (1, 1) [DP 2], (2, 1) and (1, 2): the same GRPO mini-batch (video prompts of three
   sizes, a text-only prompt, responses of 1 to 40 tokens) through MegatronActor padded (by count)
   and packed (by count, and by a token budget): log-probs per response token (old-log-prob
   pass), then one train_step's loss, KL and grad norm (lr = 0: the weights stay, so each variant
   sees the same model). Prints ``PARITY tp=<t> pp=<p> rank=<r> <json of the worst differences>``.
   At TP=1 it also checks that the comparison can fail: 1-D positions in the packed row, or one
   segment over all sequences, move the log-probs far beyond the tolerance.

Tolerance (fp32, everything in float32): the packed and padded forwards run the same operations
on the same values; rows of different matmul shapes may sum in another order (cuBLAS/oneDNN
blocking), a few float32 ulps per op over 4 layers: log-probs within 1e-5 absolute (their
magnitude is ~10), loss and grad norm within 1e-5 relative. A wrong position or segment moves
log-probs by >= 1e-2.
"""
from __future__ import annotations

import json
import os
import sys

import torch

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
LOGPROB_ATOL = 1e-5
RELATIVE_TOL = 1e-5
PAD = 0


def emit(line: str) -> None:
    """One report line in one write(2): both ranks share stdout, and print() writes the text and the
    newline separately, so two ranks' lines could run into each other."""
    os.write(1, (line + "\n").encode())


def make_sequences(configs, seed: int = 0) -> list:
    """Video prompts of three sizes (and one text-only prompt) with responses of 1..40 tokens,
    M-RoPE ids from get_rope_index ("qwen" convention, as the rollout engine's)."""
    from megavrl.models.qwen2_5_vl.rope_index import get_rope_index
    from megavrl.rl.batch import TrainSequence

    vision = configs.hf_config.vision_config
    row = 3 * vision.temporal_patch_size * vision.patch_size ** 2
    gen = torch.Generator().manual_seed(seed)
    sizes = [(2, 4, 4), (4, 4, 8), (2, 8, 4), None]
    responses = [1, 7, 40, 3, 12, 25, 2, 33, 9, 18, 5]
    seqs = []
    for i, response in enumerate(responses):
        grid = sizes[i % len(sizes)]
        text = torch.randint(1, 100, (3 + i % 3,), generator=gen)
        vision_inputs, position_ids, delta = {}, None, 0
        if grid is not None:
            t, h, w = grid
            prompt = torch.cat([text, torch.full((t * h * w // 4,), configs.video_token_id), text[:2]])
            grid_thw, seconds = torch.tensor([grid]), torch.tensor([0.5 + 0.5 * (i % 2)])
            pos, deltas = get_rope_index(prompt[None], None, grid_thw, seconds, convention="qwen",
                                         **configs.rope_index_kwargs())
            position_ids, delta = pos[:, 0], int(deltas[0])
            vision_inputs = {"pixel_values_videos": torch.randn(t * h * w, row, generator=gen),
                             "video_grid_thw": grid_thw, "second_per_grid_ts": seconds}
        else:
            prompt = torch.cat([text, text])
        ids = torch.cat([prompt, torch.randint(1, 100, (response,), generator=gen)])
        seqs.append(TrainSequence(input_ids=ids, prompt_len=len(prompt), vision=vision_inputs,
                                  advantage=float(torch.randn(1, generator=gen)), prompt_position_ids=position_ids,
                                  rope_delta=delta, rollout_logprobs=-torch.rand(response, generator=gen),
                                  info={"index": i}))
    return seqs


def check_budget(rank: int, world: int) -> None:
    from megavrl.rl.batch import TrainSequence, padded_length
    from megavrl.rl.micro_batches import MicroBatching, rank_micro_batches

    lengths = [300, 20, 20, 20, 20, 20, 20, 20, 5, 90, 90, 7, 60, 3]  # rank 0 gets 300: more bins there
    mini = [TrainSequence(input_ids=torch.arange(n) % 50 + 1, prompt_len=1, info={"index": i})
            for i, n in enumerate(lengths)]
    for budget in (100, 64, 1000):
        cut = rank_micro_batches(mini, rank, world, MicroBatching(max_tokens_per_micro_batch=budget, packing=True),
                                 PAD, padded_length(mini))
        mine = [s.info["index"] for g in cut.groups for s in g if not s.info.get("padding")]
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, (len(cut.batches), mine))
        counts = [c for c, _ in gathered]
        assert len(set(counts)) == 1, f"budget {budget}: micro-batch counts differ between ranks: {counts}"
        everything = sorted(i for _, ids in gathered for i in ids)
        assert everything == list(range(len(mini))), f"budget {budget}: sequences dropped or repeated: {everything}"
        for group, batch in zip(cut.groups, cut.batches):
            real = [s for s in group if not s.info.get("padding")]
            assert len(group) == 1 or sum(len(s) for s in group) <= budget, (budget, [len(s) for s in group])
            assert [s.info["index"] for s in real] == sorted(s.info["index"] for s in real)  # order kept
            assert batch["loss_mask"].sum() == sum(s.response_len for s in real)
        assert cut.oversize_sequences == sum(n > budget for n in lengths)
    emit(f"BUDGET rank={rank} counts={counts}")


def grpo_loss(mini):
    from megavrl.rl.policy_loss import policy_loss

    num_tokens, num_seqs = sum(s.response_len for s in mini), len(mini)

    def loss_fn(batch, logprobs, entropy):
        return policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], batch["loss_mask"],
                           ref_logprobs=batch["ref_logprobs"], rollout_logprobs=batch["rollout_logprobs"],
                           entropy=entropy, kl_coef=0.1, entropy_coef=0.01, loss_agg="seq-mean-token-mean",
                           global_num_tokens=num_tokens, global_num_seqs=num_seqs, max_response_len=64)
    return loss_fn


def response_logprobs(values: list, cut) -> dict[int, torch.Tensor]:
    """Per sequence index: its response tokens' log-probs (label positions P-1 .. L-2)."""
    out = {}
    for v, group in zip(values, cut.groups):
        for row, s in enumerate(group):
            if not s.info.get("padding"):
                out[s.info["index"]] = v[row, s.prompt_len - 1:len(s) - 1]
    return out


def run_variant(actor, mini, how, dp_rank, dp, seq_len, reference=None) -> dict:
    from megavrl.rl.micro_batches import rank_micro_batches

    cut = rank_micro_batches(mini, dp_rank, dp, how, PAD, seq_len)
    values = actor.logprobs(cut.batches, seq_len)
    result = {"count": len(cut.batches), "cut": cut}
    if values is not None:  # last stage: the old and reference log-probs of the loss
        result["logprobs"] = response_logprobs(values, cut)
        for batch, v in zip(cut.batches, values):
            batch["old_logprobs"] = v.detach()
            batch["ref_logprobs"] = (1.05 * v).detach()  # a function of the value only: same in every layout
    else:  # other stages never call the loss
        for batch in cut.batches:
            batch["old_logprobs"] = batch["ref_logprobs"] = torch.zeros_like(batch["loss_mask"])
    step = actor.train_step(cut.batches, seq_len, grpo_loss(mini))
    assert step.applied, "the update was skipped"
    result.update(loss=step.metrics["loss"], kl=step.metrics["kl_loss"], entropy=step.metrics["entropy"],
                  grad_norm=step.grad_norm)
    return result


def check_parity(hf_dir: str, tp: int, pp: int) -> None:
    from megatron.core import parallel_state as ps

    from megavrl.config import OptimizerConfig
    from megavrl.parallel import init_distributed
    from megavrl.rl.actor import MegatronActor
    from megavrl.rl.batch import padded_length
    from megavrl.rl.micro_batches import MicroBatching

    layout = init_distributed(tp=tp, pp=pp)
    torch.manual_seed(0)
    actor = MegatronActor(hf_dir, tp, pp, dtype="float32", optimizer_config=OptimizerConfig(lr=0.0, min_lr=0.0),
                          rope_convention="qwen")
    mini = make_sequences(actor.configs)
    seq_len = padded_length(mini)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    variants = {
        "padded": MicroBatching(micro_batch_size=2, packing=False),
        "packed": MicroBatching(micro_batch_size=2, packing=True, same_shape=pp > 1),
        "packed_budget": MicroBatching(max_tokens_per_micro_batch=160, packing=True, same_shape=pp > 1),
        "padded_budget": MicroBatching(max_tokens_per_micro_batch=3 * seq_len, packing=False),
    }
    results = {name: run_variant(actor, mini, how, dp_rank, dp, seq_len) for name, how in variants.items()}
    ref = results["padded"]
    worst = {}
    for name, got in results.items():
        if name == "padded":
            continue
        if "logprobs" in ref:
            assert got["logprobs"].keys() == ref["logprobs"].keys()
            diff = max((got["logprobs"][i] - ref["logprobs"][i]).abs().max().item() for i in ref["logprobs"])
            assert diff <= LOGPROB_ATOL, (name, "logprobs", diff)
            worst[f"{name}/logprobs"] = diff
        for key in ("loss", "kl", "entropy", "grad_norm"):
            rel = abs(got[key] - ref[key]) / max(abs(ref[key]), 1e-12)
            assert rel <= RELATIVE_TOL, (name, key, got[key], ref[key], rel)
            worst[f"{name}/{key}"] = rel
    padded_tokens = ref["cut"].computed_tokens
    packed_tokens = results["packed_budget"]["cut"].computed_tokens
    assert packed_tokens < padded_tokens, (packed_tokens, padded_tokens)
    if tp == 1 and pp == 1:
        check_sensitivity(actor, results["packed"]["cut"], ref)
    worst["computed_tokens"] = {"padded": padded_tokens, "packed_budget": packed_tokens}
    worst["grad_norm"] = ref["grad_norm"]
    emit(f"PARITY tp={tp} pp={pp} rank={layout.rank} {json.dumps(worst)}")
    del actor


def check_sensitivity(actor, cut, padded) -> None:
    """Positions numbered along the whole row, or one segment for all sequences, must show."""
    from megatron.core.packed_seq_params import PackedSeqParams

    for what in ("1-D positions", "one segment"):
        batches = []
        for batch in cut.batches:
            batch = dict(batch)
            width = batch["input_ids"].shape[1]
            if what == "1-D positions":
                batch["position_ids"] = torch.arange(width).expand(3, 1, width).clone()
            else:
                cu = torch.tensor([0, width], dtype=torch.int32)
                batch["packed_seq_params"] = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                                             max_seqlen_q=width, max_seqlen_kv=width)
            batches.append(batch)
        wrong = response_logprobs(actor.logprobs(batches), cut)
        diff = max((wrong[i] - padded["logprobs"][i]).abs().max().item() for i in wrong)
        assert diff > 1000 * LOGPROB_ATOL, (what, diff)


def main() -> None:
    from megavrl.parallel import destroy_distributed, init_distributed

    hf_dir = sys.argv[1]
    layout = init_distributed(tp=1, pp=1)
    check_budget(layout.rank, layout.world_size)
    for tp, pp in LAYOUTS:
        check_parity(hf_dir, tp, pp)
    destroy_distributed()


if __name__ == "__main__":
    main()
