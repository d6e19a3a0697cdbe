"""The ``eval`` section of the config: greedy evaluation on ``data.val``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class EvalConfig:
    """Evaluation on ``data.val`` (``megavrl eval`` and periodic evaluation during training)."""

    temperature: float = 0.0
    """0: greedy decoding."""
    max_new_tokens: Optional[int] = None
    """Default: rollout.max_new_tokens."""
    max_samples: Optional[int] = None
    """Evaluate only the first N validation rows (None: all)."""
    output_dir: Optional[str] = None
    """Where predictions.jsonl, metrics.json and metrics.md go (default: <trainer.output_dir>/eval)."""
