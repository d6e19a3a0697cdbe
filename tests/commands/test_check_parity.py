"""``megavrl check-parity`` end to end: standalone launch of 2 processes, a decoded mp4, one JSON line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.checkpoint.test_tiny import write_mp4
from tests.parallel.torchrun import REPO_ROOT


@pytest.mark.slow
@pytest.mark.distributed
def test_check_parity_cli_launches_itself_and_prints_one_json_line(tiny_tied_hf_dir, tmp_path):
    video = write_mp4(tmp_path / "clip.mp4", frames=8)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "megavrl.cli", "check-parity", "--hf-dir", str(tiny_tied_hf_dir),
                           "--tp", "1", "--pp", "2", "--video", str(video), "--kinds", "text,video",
                           "--tolerance", "1e-4"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    report = json.loads(lines[0])
    for key in ("max_abs_logit_diff", "mean_abs_logit_diff", "argmax_agreement", "vision_max_abs_diff"):
        assert key in report
    assert report["max_abs_logit_diff"] <= 1e-4 and report["argmax_agreement"] == 1.0
    assert (report["tp"], report["pp"]) == (1, 2) and set(report["per_kind"]) == {"text", "video"}
