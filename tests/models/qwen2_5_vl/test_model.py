"""The Megatron Qwen2.5-VL against transformers at (TP, PP) = (1, 1), (2, 1), (1, 2), both tiny presets.

One torchrun launch (2 processes) runs every check (tests/models/qwen2_5_vl/model_worker.py);
the tests below read its output. Thresholds: fp32, max |logit diff| <= 1e-4 and 100% argmax
agreement on the real tokens of text-only, image, video and mixed image+video batches of 2 with
left padding; export bit-exact; gradients within 1e-6 + 1e-4 * max|grad|, every tensor (embedding
and output layer included: at PP=2 with tied embeddings the two stages' gradients are summed by
the trainer's grad finalisation, which the worker runs).
"""
from __future__ import annotations

import json
import re

import pytest

from tests.parallel.torchrun import run_torchrun

LAYOUTS = [(1, 1), (2, 1), (1, 2)]
PRESETS = ["tiny", "tiny-tied"]
MAX_LOGIT_DIFF = 1e-4

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def worker_output(tiny_hf_dir, tiny_tied_hf_dir):
    proc = run_torchrun(["-m", "tests.models.qwen2_5_vl.model_worker", str(tiny_hf_dir), str(tiny_tied_hf_dir)],
                        nproc=2, timeout=600)
    # Two ranks print to one pipe: a record can land right after another rank's record without a
    # newline in between, so split on the record tags as well as on newlines.
    return re.sub(r"(?<!^)(?<!\n)(PARITY|EXPORT|GRADS|FREEZE) ", r"\n\1 ", proc.stdout).splitlines()


def _lines(output, tag, preset, tp, pp):
    return [line for line in output if line.startswith(f"{tag} {preset} {tp} {pp} ")]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_logit_parity_with_transformers(worker_output, preset, tp, pp):
    (line,) = _lines(worker_output, "PARITY", preset, tp, pp)
    report = json.loads(line.split(" ", 4)[4])
    assert set(report["per_kind"]) == {"text", "image", "video", "mixed"}
    for kind, r in report["per_kind"].items():
        assert r["max_abs_logit_diff"] <= MAX_LOGIT_DIFF, (kind, r)
        assert r["argmax_agreement"] == 1.0, (kind, r)
    assert report["vision_max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_export_reproduces_every_hf_tensor_bit_exactly(worker_output, preset, tp, pp):
    lines = _lines(worker_output, "EXPORT", preset, tp, pp)
    assert len(lines) == 2, worker_output  # both ranks got every tensor
    assert len({line.split("tensors=")[1] for line in lines}) == 1


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_gradients_through_the_pipeline_schedule_match_transformers(worker_output, preset, tp, pp):
    assert len(_lines(worker_output, "GRADS", preset, tp, pp)) == 2


def test_freeze_options(worker_output):
    assert "FREEZE ok" in worker_output
