import math

from megavrl.run_metrics import MetricsWriter, read_metrics_jsonl


def test_writes_tensorboard_and_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import torch

    with MetricsWriter(tmp_path, enabled=True) as w:
        w.write(1, {"reward/mean": 0.5, "loss": torch.tensor(2.0), "skip": "not a number"})
        w.write(2, {"reward/mean": 0.75, "loss": float("nan")}, prefix="")
    rows = read_metrics_jsonl(tmp_path / "metrics.jsonl")
    assert rows[0]["step"] == 1 and rows[0]["reward/mean"] == 0.5 and rows[0]["loss"] == 2.0
    assert "skip" not in rows[0] and rows[1]["loss"] == "nan"
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    events = acc.Scalars("reward/mean")
    assert [(e.step, e.value) for e in events] == [(1, 0.5), (2, 0.75)]
    assert math.isnan(acc.Scalars("loss")[1].value)


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path / "x", enabled=False)
    w.write(1, {"a": 1.0})
    w.close()
    assert not (tmp_path / "x").exists()


def test_a_new_run_starts_metrics_fresh_and_a_resumed_one_continues_from_its_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path, enabled=True) as w:
        for step in (1, 2, 3):
            w.write(step, {"a": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "a": 4')  # torn by a kill -9 mid-write
    with MetricsWriter(tmp_path, enabled=True, resume_step=2) as w:  # resumed from the step-2 checkpoint
        w.write(3, {"a": 30.0})
        w.write(4, {"a": 40.0})
    assert [(r["step"], r["a"]) for r in read_metrics_jsonl(tmp_path / "metrics.jsonl")] == \
        [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("a")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    with MetricsWriter(tmp_path, enabled=True) as w:  # a new run in the same directory
        w.write(1, {"a": 3.0})
    assert [r["a"] for r in read_metrics_jsonl(tmp_path / "metrics.jsonl")] == [3.0]
