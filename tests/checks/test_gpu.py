"""The one-command GPU check (tools/gpu_check.sh, megavrl.checks.gpu): its dry run on the CPU runs
every function the GPU run uses (random HF model, weight mapping, bf16 parity against transformers,
packed Megatron train step, FLOPs and MFU arithmetic), and a perturbed weight fails the parity."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megavrl.checks.gpu import GPU_SHAPES, SEQUENCE_SHARES, packed_sequences, peak_tflops

REPO = Path(__file__).resolve().parents[2]


def _gpu_check(*args: str) -> tuple[int, dict[str, list[dict]], str]:
    """Run tools/gpu_check.sh with this interpreter; its JSON lines grouped by ``check``."""
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    lines: dict[str, list[dict]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            lines.setdefault(record["check"], []).append(record)
    return proc.returncode, lines, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_dry_run_passes_parity_and_trains_a_packed_step():
    code, lines, output = _gpu_check("--dry-run")
    assert code == 0, output
    (parity,) = lines["parity"]
    assert parity["passed"] and parity["dtype"] == "bfloat16" and parity["device"] == "cpu", parity
    assert parity["perturbed"] is None and parity["tokens"] > 64  # text and the image's 64 merged tokens
    assert 0 < parity["max_abs_logit_diff"] < 0.1 and parity["mean_abs_logit_diff"] > 0
    # bf16 rounds both implementations about equally far from the fp32 answer.
    assert parity["megatron_vs_fp32"]["mean_abs_logit_diff"] <= 3 * parity["transformers_vs_fp32"]["mean_abs_logit_diff"]
    (step,) = lines["train_step"]
    assert step["finished"] and step["packed"] and step["shape"] == "tiny" and step["layer_spec"] == "local"
    assert step["tokens"] == 256 and step["sequences"] == len(SEQUENCE_SHARES) and step["micro_batches"] == 1
    assert step["tokens_per_s"] > 0 and step["model_tflops_per_step"] > 0 and step["tflops"] > 0
    assert step["peak_tflops"] is None and step["mfu"] is None and step["peak_memory_gib"] is None  # CPU
    assert len(step["losses"]) == 3 and step["losses"][-1] < step["losses"][0]  # warm-up + 2 steps, learning
    (summary,) = lines["summary"]
    assert summary["ok"] and summary["dry_run"]


@pytest.mark.slow
def test_a_perturbed_weight_fails_parity_and_the_run():
    """The negative control: noise of the weight's own scale on one MLP projection is caught."""
    code, lines, output = _gpu_check("--dry-run", "--perturb", "--steps", "1")
    assert code == 1, output
    (parity,) = lines["parity"]
    assert not parity["passed"] and parity["perturbed"].endswith("layers.0.mlp.linear_fc2.weight")
    assert parity["megatron_vs_fp32"]["mean_abs_logit_diff"] > 3 * parity["transformers_vs_fp32"]["mean_abs_logit_diff"]
    assert lines["train_step"][0]["finished"]  # the step itself still runs
    assert not lines["summary"][0]["ok"]


def test_without_a_gpu_the_full_run_is_refused_with_the_way_out():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "megavrl.checks.gpu"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--dry-run" in proc.stderr


def test_wheels_folder_without_wheels_is_refused(tmp_path):
    code, lines, output = _gpu_check("--wheels", str(tmp_path), "--dry-run")
    assert code == 1 and not lines and "no wheels in" in output and "--download-wheels" in output


def test_peak_table_knows_hopper_and_nothing_else():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA GeForce RTX 4090") is None and peak_tflops("cpu") is None


def test_packed_sequences_fill_the_row_with_ordinary_tokens():
    cfg = GPU_SHAPES["Qwen2.5-VL-7B"]
    sequences = packed_sequences(cfg, 4096)
    assert [len(s) for s in sequences] == [1536, 1024, 1024, 512]
    assert all(int(s.input_ids.max()) < cfg["bos_token_id"] for s in sequences)
    assert sum(len(s) for s in packed_sequences(cfg, 1001)) == 1001
