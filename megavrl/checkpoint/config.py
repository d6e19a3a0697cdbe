"""The ``checkpoint`` section of the config: where, how often, how many, and what to resume."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    """Default: <trainer.output_dir>/checkpoints."""
    save_every: int = 0
    """Steps between checkpoints (0: only at the end and on SIGTERM)."""
    keep_last: int = 3
    resume: str = "auto"
    """auto (newest complete checkpoint in dir, if any) | none | a checkpoint path."""
    export_hf_at_end: bool = True
