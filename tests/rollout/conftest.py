"""One vLLM engine for the whole rollout test package: starting one costs 30-60 s on the CPU machines."""
from __future__ import annotations

import pytest

from tests.rollout.helpers import decode_video, write_test_video

ENGINE_SETTINGS = dict(dtype="float32", max_model_len=2048, cpu_kv_cache_mb=128, n=4, max_new_tokens=16, seed=0)


@pytest.fixture(scope="package")
def test_video(tmp_path_factory):
    """8 frames of a 16-frame 8 fps mp4 written with PyAV and decoded with decord (112x168 px)."""
    path = write_test_video(tmp_path_factory.mktemp("video") / "moving_square.mp4")
    return decode_video(path, num_frames=8)


@pytest.fixture(scope="package")
def rollout_engine(tiny_hf_dir):
    """A RolloutEngine on the ``tiny`` preset. Tests that change its weights put the originals back."""
    import vllm  # noqa: F401  (a broken install fails here, never skips)
    from megavrl.rollout import RolloutConfig, RolloutEngine

    engine = RolloutEngine(tiny_hf_dir, RolloutConfig(**ENGINE_SETTINGS))
    yield engine
    engine.shutdown()
