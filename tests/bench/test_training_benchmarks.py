"""bench/cli_runs.py, bench_reward_curve and bench_data_efficiency: the training benchmarks run on
the demo's tasks and report the blind baseline (what the best constant answer scores)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np

from bench.bench_data_efficiency import blind_of
from bench.bench_reward_curve import blind_reward
from bench.cli_runs import WarmStart
from megavrl.config import load_config
from megavrl.rewards import score

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "configs" / "tiny_cpu_tvg.yaml"


def _demo_command(marker: str) -> list[str]:
    """The words of examples/demo.sh's command that starts with ``"$megavrl" <marker>`` (continued lines joined)."""
    text = (ROOT / "examples" / "demo.sh").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.strip().startswith(f'"$megavrl" {marker}'))
    return shlex.split(line.split("#")[0])


def _options(words: list[str]) -> dict[str, str]:
    return {w: words[i + 1] for i, w in enumerate(words) if w.startswith("--")}


def test_warm_start_builds_the_demos_data_and_sft():
    synth = _options(_demo_command("data synth"))
    ours = _options(WarmStart().synth_args())
    for flag in ("--tasks", "--size", "--shape-size", "--distractors"):
        assert ours[flag] == synth[flag] or float(ours[flag]) == float(synth[flag]), flag

    def train_rows(options):  # megavrl.data.synth's split: the first n - round(n * val_fraction) videos
        n = int(options["--n"])
        return n - round(n * float(options["--val-fraction"]))

    # the same training videos (each depends on the seed and its index only); the benchmarks hold
    # out fewer (72), evaluated at every eval step
    assert train_rows(ours) == train_rows(synth) == 504
    demo_sft = {w.split("=", 1)[0]: w.split("=", 1)[1] for w in _demo_command("train --config \"$config\" \"${common[@]}\" algorithm.name=sft")
                if "=" in w and not w.startswith("trainer.output_dir")}
    ours_sft = dict(w.split("=", 1) for w in WarmStart().sft_overrides())
    for key in ("algorithm.name", "trainer.total_steps", "trainer.prompts_per_step", "trainer.micro_batch_size",
                "optimizer.lr", "optimizer.lr_decay_style", "optimizer.lr_warmup_steps"):
        assert ours_sft[key] == demo_sft[key] or float(ours_sft[key]) == float(demo_sft[key]), key


def _rows(seed: int, n: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        start = float(rng.integers(0, 15)) / 2
        rows.append({"id": f"v{i}", "task": "tvg", "question": "q", "duration": 8.0,
                     "timestamps": [start, min(8.0, start + float(rng.choice([0.5, 1.0, 2.0])))]})
    return rows


def test_blind_reward_is_the_best_constant_answers_training_reward(tmp_path):
    rows = _rows(0, 12)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    blind = blind_reward(tmp_path)
    reward = load_config(CONFIG).reward
    grid = np.arange(0.0, 8.01, 0.5)

    def mean_reward(a: float, b: float) -> float:
        text = f"<think>constant</think><answer>{a:g} to {b:g}</answer>"
        return float(np.mean([score("tvg", text, row, reward).total for row in rows]))

    best = max(mean_reward(a, b) for a in grid for b in grid if b > a)
    # the boundaries of these rows lie on the 0.5 s grid, so the search over them is the grid's best
    assert abs(blind["reward"] - best) < 1e-9, (blind, best)
    a, b = (float(x) for x in re.findall(r"[\d.]+", blind["answer"])[:2])
    assert abs(mean_reward(a, b) - best) < 1e-9


def test_data_efficiency_reads_the_blind_baseline_from_the_evaluations():
    runs = {("full", 1): {"eval": [{"step": 0, "miou": 40.0, "blind_miou": 15.0},
                                   {"step": 5, "miou": 42.0, "blind_miou": 15.0}]}}
    blind = blind_of(runs)
    reward = load_config(CONFIG).reward
    assert blind == {"miou": 15.0, "reward": reward.format_weight + reward.iou_weight * 0.15}
    assert blind_of({("full", 1): {"eval": [{"step": 0, "miou": 40.0}]}}) is None
