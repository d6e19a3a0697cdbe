"""Rollout engines per data-parallel replica (rl/placement.py), end to end on CPU: world 2, TP=1.

One engine on rank 0 and one engine per replica (each on its own replica's rank, each reading its
own shard of the data) must sample the same responses for the same step: the sampling seed of a
prompt is derived from the step and the prompt's place in the step, not from which engine serves
it. The training step then sees the same sequences, split otherwise over the replicas: its loss
and reward metrics agree to fp32 rounding (summation order differs). A checkpoint written with two
engines resumes at DP=1 with one.
"""
import json
import math
from pathlib import Path

import pytest

from megavrl.rl.placement import interleave, resolve_engine_count
from tests.parallel.torchrun import run_torchrun

WORKER = Path(__file__).with_name("placement_worker.py")


def test_engine_count():
    assert resolve_engine_count("auto", 4) == 4
    assert resolve_engine_count("2", 4) == 2 and resolve_engine_count(1, 4) == 1
    from megavrl.config_base import ConfigError

    with pytest.raises(ConfigError, match=r"rollout.engines=3 must divide the data-parallel size 4.*\[1, 2, 4\]"):
        resolve_engine_count("3", 4)


def test_engine_devices_narrow_the_visible_gpus(monkeypatch):
    import os

    from megavrl.rl.placement import engine_devices

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with engine_devices([2, 3]):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # a mask already set: local 2, 3 are GPUs 6, 7
    with engine_devices([2, 3]):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6,7"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


def test_interleave_restores_the_step_order():
    # prompts 0..6 dealt round-robin over 3 engines, then put back
    per_engine = [[0, 3, 6], [1, 4], [2, 5]]
    assert interleave(per_engine) == list(range(7))
    assert interleave([[0, 1, 2]]) == [0, 1, 2] and interleave([]) == []


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_hf_dir):
    from megavrl.data.synth import SynthSettings, write_synthetic_dataset

    data = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(str(data), SynthSettings(n=8, seed=0, seconds=6.0), workers=1)
    workdir = tmp_path_factory.mktemp("placement")
    for scenario, nproc in (("one", 2), ("two", 2), ("resume1", 1)):
        run_torchrun([str(WORKER), scenario, str(workdir), str(tiny_hf_dir), str(data)], nproc=nproc, timeout=1200)

    def report(scenario, rank):
        return json.loads((workdir / f"report_{scenario}_rank{rank}.json").read_text())
    return report


def _samples(report, scenario, ranks):
    merged = {}
    for r in ranks:
        merged.update(report(scenario, r)["samples"])
    return merged


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.vllm
def test_one_engine_and_one_per_replica_sample_and_train_alike(runs):
    one, two = runs("one", 0), runs("two", 0)
    assert one["engines"] == 1 and two["engines"] == 2
    assert [runs("two", r)["hosts_engine"] for r in (0, 1)] == [True, True]
    assert not runs("one", 1)["hosts_engine"] and runs("one", 1)["samples"] == {}
    a, b = _samples(runs, "one", (0, 1)), _samples(runs, "two", (0, 1))
    assert len(a) == 4 and set(a) == set(b)  # the same four prompts in step 1 ...
    # ... split over the two engines, two each, each read from its own data shard
    assert len(runs("two", 0)["samples"]) == 2 and len(runs("two", 1)["samples"]) == 2
    for pid in a:  # the same responses, token for token
        assert a[pid]["tokens"] == b[pid]["tokens"], pid
        assert a[pid]["texts"] == b[pid]["texts"], pid
    (m1,), (m2,) = one["metrics"], two["metrics"]
    # Rewards and counts are reduced over the engines: equal to the single engine's figures.
    for key in ("reward/total", "reward/std", "reward/count", "response_len/mean", "advantage/abs_mean",
                "data/prompt_token_mismatch"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-6, abs=1e-9), key
    # The update: same sequences, other DP split; fp32 sums in another order agree to ~1e-6.
    for key in ("loss", "grad_norm", "entropy", "token_mult_prob_error"):
        assert math.isfinite(m1[key]) and m1[key] == pytest.approx(m2[key], rel=1e-4, abs=1e-6), key
    assert m1["token_mult_prob_error"] < 1.0 + 1e-3  # trainer and vLLM agree on the sampled tokens


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.vllm
def test_a_two_engine_checkpoint_resumes_at_dp1(runs):
    resumed = runs("resume1", 0)
    assert resumed["engines"] == 1 and resumed["step"] == 2
    steps = [m["step"] for m in resumed["metrics"]]
    assert steps == [1, 2]  # step 1 from the two-engine run, step 2 trained at DP=1
    first = set(_samples(runs, "two", (0, 1)))
    second = set(resumed["samples"])
    assert len(second) == 4 and not (first & second)  # the stream went on after step 1's prompts
