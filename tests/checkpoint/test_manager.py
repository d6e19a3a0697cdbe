"""CheckpointManager: atomic saves, keep-last-K, resume discovery, exact RNG restore."""
import json
import random

import numpy as np
import pytest
import torch

from megavrl.checkpoint.manager import MARKER, CheckpointManager, capture_rng_state, restore_rng_state


@pytest.fixture
def single_process_group(tmp_path):
    import torch.distributed as dist

    if not torch.cuda.is_available():
        from megavrl.parallel.cpu_mode import enable_cpu_mode

        enable_cpu_mode()
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sharded(w: torch.Tensor, b: torch.Tensor) -> dict:
    from megatron.core.dist_checkpointing import ShardedTensor

    return {"w": ShardedTensor.from_rank_offsets("layer.w", w), "b": ShardedTensor.from_rank_offsets("layer.b", b),
            "step_info": {"note": "common"}}


def test_save_load_prune_and_resume_discovery(tmp_path, single_process_group):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert mgr.latest() is None and mgr.resolve("auto") is None and mgr.resolve("none") is None
    saved = {}
    for step in (1, 2, 3):
        w, b = torch.randn(4, 3), torch.randn(4)
        saved[step] = (w.clone(), b.clone())
        mgr.save(step, sharded(w, b), rank_state={"data": {"index": step * 10}}, metadata={"config": {"x": step}})
    assert [s for s, _ in mgr.complete()] == [2, 3]  # step 1 pruned
    latest = mgr.resolve("auto")
    assert latest.name == "step_00000003"
    assert json.loads((latest / MARKER).read_text())["config"] == {"x": 3}

    loaded = mgr.load(latest, sharded(torch.zeros(4, 3), torch.zeros(4)))
    assert loaded.step == 3 and loaded.rank_state == {"data": {"index": 30}}
    torch.testing.assert_close(loaded.sharded["w"], saved[3][0], rtol=0, atol=0)
    torch.testing.assert_close(loaded.sharded["b"], saved[3][1], rtol=0, atol=0)
    assert mgr.resolve(str(mgr.complete()[0][1])).name == "step_00000002"


def test_incomplete_checkpoint_is_ignored(tmp_path, single_process_group):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(5, sharded(torch.ones(2, 2), torch.ones(2)))
    # A run killed mid-save leaves a directory without the marker, or a hidden temp dir.
    (tmp_path / "step_00000009" / "dist").mkdir(parents=True)
    (tmp_path / ".tmp-step_00000010-1").mkdir()
    assert mgr.latest().name == "step_00000005"
    with pytest.raises(FileNotFoundError, match="not a complete megavrl checkpoint"):
        mgr.resolve(str(tmp_path / "step_00000009"))
    mgr.save(6, sharded(torch.ones(2, 2), torch.ones(2)))
    assert not (tmp_path / ".tmp-step_00000010-1").exists()  # cleaned on the next save


def test_rng_round_trip_is_exact(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="keep_last=0"):
        CheckpointManager(tmp_path, keep_last=0)


def test_stale_temp_dirs_are_removed_at_start(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    (tmp_path / ".tmp-step_00000004-17").mkdir()
    (tmp_path / ".tmp-step_00000004-17" / "partial").write_text("x")
    (tmp_path / "step_00000003").mkdir()  # not a temp dir: left for latest() to ignore
    assert [p.name for p in mgr.remove_stale()] == [".tmp-step_00000004-17"]
    assert not (tmp_path / ".tmp-step_00000004-17").exists() and (tmp_path / "step_00000003").exists()
    assert mgr.remove_stale() == []
    assert CheckpointManager(tmp_path / "missing").remove_stale() == []


def test_per_rank_state_needs_the_same_layout(tmp_path, single_process_group):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    path = mgr.save(1, sharded(torch.ones(2, 2), torch.ones(2)),
                    rank_state={"rng": {"x": torch.tensor([1])}, "data": {"index": 7}})
    meta = json.loads((path / MARKER).read_text())
    assert meta["layout"] == {"world_size": 1, "tp": 1, "pp": 1, "dp": 1}
    assert mgr.load(path, sharded(torch.zeros(2, 2), torch.zeros(2))).rank_state["data"] == {"index": 7}
    # Saved at TP=2 with the same world size: the RNG streams belong to other grid positions.
    meta["layout"] = {"world_size": 1, "tp": 2, "pp": 1, "dp": 1}
    (path / MARKER).write_text(json.dumps(meta))
    other = mgr.load(path, sharded(torch.zeros(2, 2), torch.zeros(2)), shared_keys=("data",))
    assert other.rank_state == {"data": {"index": 7}} and not other.same_layout
    assert mgr.load(path, sharded(torch.zeros(2, 2), torch.zeros(2))).rank_state is None
