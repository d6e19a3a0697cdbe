"""megavrl.parallel.collectives: the same answers with and without a process group."""
import torch

from megavrl.parallel import collectives as c


def _check_single_process():
    assert c.global_rank() == 0
    assert c.world_size() == 1
    c.barrier()
    assert c.broadcast_object({"a": [1, 2]}) == {"a": [1, 2]}
    assert c.all_gather_object(("x", 3)) == [("x", 3)]


def test_without_a_process_group():
    assert not torch.distributed.is_initialized()
    _check_single_process()


def test_with_a_one_process_gloo_group(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        _check_single_process()
    finally:
        torch.distributed.destroy_process_group()
