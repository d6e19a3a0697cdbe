"""metrics.md says what was scored: the model, the checkpoint step and the rows (issue 21)."""
from megavrl.eval.report import headline_keys, metrics_markdown


def test_markdown_names_model_step_and_rows():
    metrics = {"benchmarks": {}, "overall": {"mean_primary": None, "n_benchmarks": 0},
               "run": {"model": "runs/demo/sft/hf + 8 steps in runs/demo/grpo", "checkpoint_step": 8,
                       "rows_scored": 16, "val_rows": 48, "max_samples": 16}}
    text = metrics_markdown(metrics)
    assert "Model: `runs/demo/sft/hf + 8 steps in runs/demo/grpo`, checkpoint step 8; 16 of 48 val rows scored " \
           "(eval.max_samples=16)." in text
    metrics["run"].update(checkpoint_step=None, rows_scored=48, max_samples=None)
    assert "checkpoint step" not in metrics_markdown(metrics) and "48 of 48 val rows scored." in metrics_markdown(metrics)


def test_headline_keys_are_the_primary_metrics_and_parse_failures():
    flat = {"overall/mean_primary": 1.0, "rows": 4, "seconds": 0.6, "v/tvg/mIoU": 1.0, "v/tvg/R@0.3": 0.0,
            "v/tvg/n_parse_failures": 2.0, "v/mcq/accuracy": 0.0, "v/mcq/accuracy_lenient": 0.0,
            "v/gqa/Acc@GQA": 0.0, "v/gqa/Acc@QA": 0.0}
    assert headline_keys(flat) == ["overall/mean_primary", "rows", "v/tvg/mIoU", "v/tvg/n_parse_failures",
                                   "v/mcq/accuracy", "v/gqa/Acc@GQA"]
