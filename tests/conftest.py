"""Fixtures shared by the whole suite: tiny Qwen2.5-VL directories built once per session."""
from __future__ import annotations

import pytest


def _tiny(tmp_path_factory, preset: str, layout: str):
    from megavrl.checkpoint.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp(f"{preset}-{layout}") / "hf", preset=preset, seed=0,
                           layout=layout)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """Preset ``tiny`` (untied embeddings), tensors named as Qwen's published checkpoints."""
    return _tiny(tmp_path_factory, "tiny", "published")


@pytest.fixture(scope="session")
def tiny_tied_hf_dir(tmp_path_factory):
    """Preset ``tiny-tied`` (tied embeddings), tensors named as transformers 5 saves them."""
    return _tiny(tmp_path_factory, "tiny-tied", "transformers")
