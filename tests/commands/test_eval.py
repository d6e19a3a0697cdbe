"""`megavrl eval` and `megavrl select` end to end on a tiny model with vLLM on CPU."""
import json

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, tiny_hf_dir):
    from megavrl.data.synth import SynthSettings, write_synthetic_dataset

    root = tmp_path_factory.mktemp("evalcmd")
    data = root / "data"
    write_synthetic_dataset(str(data), SynthSettings(n=8, seed=1, seconds=6.0, val_fraction=0.25), workers=1)
    cfg = {
        "model": {"hf_dir": str(tiny_hf_dir)},
        "data": {"train": [{"json_path": str(data / "train.jsonl"), "data_folder": str(data)}],
                 "val": [{"json_path": str(data / "val.jsonl"), "data_folder": str(data)}],
                 "video": {"fps": 1.0, "min_pixels": 3136, "max_pixels": 25088}, "num_workers": 1},
        "rollout": {"max_new_tokens": 8, "dtype": "float32", "cpu_kv_cache_mb": 128, "max_model_len": 1024},
        "trainer": {"output_dir": str(root / "run")},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, root


def test_eval_writes_predictions_metrics_and_report(run_config, capsys):
    from megavrl.cli import main

    path, root = run_config
    assert main(["eval", "--config", str(path), "--out", str(root / "eval")]) == 0
    metrics = json.loads((root / "eval" / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (root / "eval" / "predictions.jsonl").read_text().splitlines()]
    val_rows = (root / "data" / "val.jsonl").read_text().splitlines()
    assert len(predictions) == len(val_rows)
    assert {p["task"] for p in predictions} <= {"tvg", "mcq", "gqa"}
    assert set(metrics["benchmarks"]) == {f"{p['benchmark']}" for p in predictions}
    assert "| " in (root / "eval" / "metrics.md").read_text()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows"] == len(val_rows)
    # metrics.json follows from predictions.jsonl: each raw response re-scored against its row and
    # aggregated with the project's metric functions gives every number of metrics.json.
    from megavrl.eval.predictions import evaluate_predictions
    from megavrl.rewards import RewardConfig

    rows = {r["id"]: r for r in map(json.loads, val_rows)}
    assert all(p["ground_truth"]["question"] == rows[p["id"]]["question"] for p in predictions)
    raw = [{k: p[k] for k in ("id", "task", "benchmark", "response", "ground_truth")} for p in predictions]
    rescored, recomputed = evaluate_predictions(raw, RewardConfig())
    run = metrics.pop("run")  # the report's header: what was served, not a figure of the predictions
    assert recomputed == metrics
    assert run["rows_scored"] == run["val_rows"] == len(val_rows)
    assert run["model"] == yaml.safe_load(path.read_text())["model"]["hf_dir"] and run["checkpoint_step"] is None
    assert [(r["iou"], r["correct"], r["parse_ok"]) for r in rescored] == \
        [(p["iou"], p["correct"], p["parse_ok"]) for p in predictions]
    assert metrics["overall"]["n_parse_failures"] == sum(not p["parse_ok"] for p in predictions)


def test_select_drops_rows_whose_rewards_are_all_the_same(run_config):
    from megavrl.cli import main
    from megavrl.config import load_config
    from megavrl.rewards import REWARDS, RewardResult, register_reward

    path, root = run_config
    saved = dict(REWARDS)

    def lowercase_start(response, sample, config):  # a reward a random model gets sometimes
        ok = bool(response) and response[0].isascii() and response[0].islower()
        return RewardResult(total=float(ok), components={"lowercase": float(ok)}, parsed={})

    try:
        for task in ("tvg", "mcq", "gqa"):
            register_reward(task, replace=True)(lowercase_start)
        assert main(["select", "--config", str(path), "--out", str(root / "sel"), "selection.k=4",
                     "rollout.max_new_tokens=2"]) == 0
    finally:
        REWARDS.clear()
        REWARDS.update(saved)
    out = root / "sel"
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert all(s["n"] == 4 for s in stats)
    same = {s["id"] for s in stats if s["all_same"]}
    varied = {s["id"] for s in stats if not s["all_same"]}
    assert same and varied  # the test is only meaningful with both kinds
    assert {r["id"] for r in selected} == varied
    assert summary["n_all_same_dropped"] == len(same)
    assert (out / "variance_hist.png").stat().st_size > 1000
    layered = load_config([path, out / "data.yaml"])  # the selection is a config layer
    assert layered.data.train[0].json_path == str((out / "selected.jsonl").resolve())
    assert selected[0]["video"].startswith("/")


def test_eval_with_two_engines_writes_what_one_engine_writes(run_config):
    """rollout.engines=2: two processes (one engine each, torchrun started by the command) decode
    half of the rows each; the merged predictions are the one-engine run's, in the same order."""
    import subprocess
    import sys

    path, root = run_config
    out = root / "eval2"
    proc = subprocess.run([sys.executable, "-m", "megavrl.cli", "eval", "--config", str(path), "--out", str(out),
                           "rollout.engines=2"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    if not (root / "eval" / "predictions.jsonl").is_file():  # run alone: make the one-engine reference
        from megavrl.cli import main

        assert main(["eval", "--config", str(path), "--out", str(root / "eval")]) == 0
    one = (root / "eval" / "predictions.jsonl").read_text().splitlines()
    two = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in two] == [json.loads(x)["id"] for x in one]
    assert two == one
    assert json.loads((out / "metrics.json").read_text())["benchmarks"] == \
        json.loads((root / "eval" / "metrics.json").read_text())["benchmarks"]
