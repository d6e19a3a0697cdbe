"""Evaluation: TVG mIoU and R@{0.3,0.5,0.7}, choice accuracy, grounded QA; reports.

``evaluate_predictions(records)`` scores prediction records (``megavrl.eval.predictions``) and
aggregates them per benchmark and overall (``megavrl.eval.metrics``); ``write_report`` writes
predictions.jsonl, metrics.json and metrics.md (``megavrl.eval.report``).
"""
from megavrl.eval.metrics import (PRIMARY_METRIC, TASK_METRICS, aggregate_metrics, best_overlap,
                                  choice_accuracy_metrics, flatten_metrics, grounded_qa_metrics,
                                  temporal_grounding_metrics, temporal_iop)
from megavrl.eval.predictions import evaluate_predictions, prediction_record, score_prediction, score_predictions
from megavrl.eval.report import (metrics_markdown, read_predictions_jsonl, write_metrics_json,
                                 write_metrics_markdown, write_predictions_jsonl, write_report)

__all__ = [
    "PRIMARY_METRIC", "TASK_METRICS", "aggregate_metrics", "best_overlap", "choice_accuracy_metrics",
    "evaluate_predictions", "flatten_metrics", "grounded_qa_metrics", "metrics_markdown", "prediction_record",
    "read_predictions_jsonl", "score_prediction", "score_predictions", "temporal_grounding_metrics",
    "temporal_iop", "write_metrics_json", "write_metrics_markdown", "write_predictions_jsonl", "write_report",
]
