"""``megavrl train`` refuses what cannot train, in one line and before any process or engine starts."""
import json
import subprocess
import sys
import time

import pytest


@pytest.fixture
def broken_videos(tmp_path):
    """A training file whose rows are fine but whose every video is garbage."""
    from megavrl.data.synth import SynthSettings, write_synthetic_dataset

    write_synthetic_dataset(str(tmp_path), SynthSettings(n=3, seed=0, seconds=4.0), workers=1)
    for video in (tmp_path / "videos").iterdir():
        video.write_bytes(b"not a video" * 100)
    return tmp_path


@pytest.mark.parametrize("what", ["every video is bad", "every row is bad"])
def test_unusable_training_data_is_refused_at_start(tmp_path, tiny_hf_dir, broken_videos, what):
    train = broken_videos / "train.jsonl"
    if what == "every row is bad":
        train = tmp_path / "rows.jsonl"
        train.write_text('{"video": "missing.mp4"}\n{not json\n')
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "megavrl.cli", "train", f"model.hf_dir={tiny_hf_dir}",
                          "parallel.tp=2", "data.val=[]", f"trainer.output_dir={tmp_path / 'run'}",
                          f"data.train=[{{json_path: {train}, data_folder: {broken_videos}}}]"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "launching" not in out.stderr  # one line, no torchrun
    error = [line for line in out.stderr.splitlines() if line.startswith("megavrl train: ")]
    assert len(error) == 1 and ("no usable row" in error[0] or "no usable rows" in error[0]), out.stderr[-2000:]
    assert time.time() - t0 < 120
    assert not (tmp_path / "run" / "run_status.json").exists()
