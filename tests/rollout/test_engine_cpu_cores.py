"""Where a rollout engine's threads run on a CPU node shared by several ranks (no engine started)."""
from megavrl.rollout.engine import cpu_core_share


def test_each_local_rank_gets_its_own_cpu_cores():
    assert cpu_core_share(0, 1, [0, 1]) is None  # alone on the node: vLLM decides
    assert [cpu_core_share(r, 2, [0, 1]) for r in (0, 1)] == ["0", "1"]
    assert [cpu_core_share(r, 2, [4, 5, 6, 7]) for r in (0, 1)] == ["4,5", "6,7"]
    assert [cpu_core_share(r, 4, [0, 1]) for r in range(4)] == ["0", "1", "0", "1"]  # more ranks than cores
