"""Worker for tests/parallel/test_distributed.py, run under torchrun (or alone for "single").

Each case prints one ``OK <case> ...`` line that the test checks; any failure raises.
"""
from __future__ import annotations

import sys


def case_tp2() -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megavrl.parallel import init_distributed, is_cpu_mode

    layout = init_distributed(tp=2, pp=1)
    assert (layout.tp, layout.pp, layout.dp) == (2, 1, 1), layout
    assert is_cpu_mode() == (not torch.cuda.is_available())
    x = torch.tensor([float(layout.tp_rank + 1)], device=layout.device)
    dist.all_reduce(x, group=ps.get_tensor_model_parallel_group())
    assert x.item() == 3.0, x  # 1 + 2
    # Megatron's own TP collective and the model-parallel RNG tracker work in this mode.
    from megatron.core.tensor_parallel import get_cuda_rng_tracker
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    y = reduce_from_tensor_model_parallel_region(torch.full((2,), 10.0 * (layout.tp_rank + 1)))
    assert y.tolist() == [30.0, 30.0], y
    with get_cuda_rng_tracker().fork():
        r = torch.rand(4)
    mine = r.clone()
    dist.all_reduce(r, group=ps.get_tensor_model_parallel_group())
    assert not torch.allclose(r, 2 * mine), "TP ranks drew the same model-parallel random stream"
    again = init_distributed(tp=2, pp=1)  # idempotent
    assert again == layout
    print(f"OK tp2 rank={layout.rank} sum={x.item()}", flush=True)


def case_pp2() -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megavrl.parallel import init_distributed

    layout = init_distributed(tp=1, pp=2)
    assert (layout.tp, layout.pp, layout.dp) == (1, 2, 1), layout
    assert layout.is_first_stage == (layout.pp_rank == 0) and layout.is_last_stage == (layout.pp_rank == 1)
    if ps.is_pipeline_first_stage():
        dist.send(torch.arange(5, dtype=torch.float32) * 7, dst=ps.get_pipeline_model_parallel_next_rank())
        got = torch.empty(2)
        dist.recv(got, src=ps.get_pipeline_model_parallel_next_rank())
        assert got.tolist() == [-1.0, -2.0], got
    else:
        got = torch.empty(5)
        dist.recv(got, src=ps.get_pipeline_model_parallel_prev_rank())
        assert got.tolist() == [0.0, 7.0, 14.0, 21.0, 28.0], got
        dist.send(torch.tensor([-1.0, -2.0]), dst=ps.get_pipeline_model_parallel_prev_rank())
    # Megatron's p2p helpers (what the pipeline schedule uses) work on this backend too.
    from megatron.core import ModelParallelConfig
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    cfg = ModelParallelConfig(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    comm = p2p.P2PCommunicator(ps.get_pipeline_model_parallel_group(), cfg)
    if ps.is_pipeline_first_stage():
        comm.send_forward(torch.full((3, 1, 4), 5.0), is_last_stage=False)
    else:
        t = comm.recv_forward((3, 1, 4), is_first_stage=False)
        assert torch.equal(t, torch.full((3, 1, 4), 5.0)), t
    print(f"OK pp2 rank={layout.rank} stage={layout.pp_rank}", flush=True)


def case_single() -> None:
    import torch

    from megavrl.parallel import destroy_distributed, enable_cpu_mode, init_distributed

    layout = init_distributed()
    assert (layout.world_size, layout.tp, layout.pp, layout.dp) == (1, 1, 1, 1), layout
    enable_cpu_mode()  # idempotent
    # CPU mode: "cuda" factories land on the CPU, and meta-device construction (transformers'
    # from_pretrained relies on it) still works through the wrapped factories.
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.arange(3, device=torch.device("cuda", 0)).device.type == "cpu"
    with torch.device("meta"):
        assert torch.zeros(2).is_meta and torch.arange(4).is_meta and torch.empty(1).is_meta
    assert torch.cuda.current_device() == torch.device("cpu")
    destroy_distributed()
    destroy_distributed()  # safe twice
    print("OK single", flush=True)


if __name__ == "__main__":
    # Cases share one process group (init_distributed re-lays Megatron's groups out between
    # them); it is destroyed once at the end.
    for name in sys.argv[1:]:
        globals()[f"case_{name}"]()
    from megavrl.parallel import destroy_distributed

    destroy_distributed()
