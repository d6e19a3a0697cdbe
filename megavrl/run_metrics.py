"""Where a run's numbers go: TensorBoard scalars, a JSONL file and a console line per step.

Only global rank 0 writes; other ranks get a writer whose methods do nothing, so callers never
branch on the rank. The JSONL file (``metrics.jsonl`` beside the TensorBoard events) holds the same
scalars for scripts and benchmarks that plot curves without TensorBoard.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Mapping

from megavrl.log import get_logger

log = get_logger(__name__)


def _is_rank0() -> bool:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def _scalar(value) -> float | None:
    try:
        value = float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return None
    return value


class MetricsWriter:
    """``write(step, {"reward/mean": 0.4, ...})`` to TensorBoard, JSONL and (every N steps) the console.

    console_keys: the keys shown on the console line, in order (all keys when None).
    """

    def __init__(self, log_dir: str | os.PathLike, console_every: int = 1,
                 console_keys: list[str] | None = None, enabled: bool | None = None,
                 resume_step: int | None = None):
        """resume_step: the step a resumed run continues from. metrics.jsonl keeps the records up to
        that step and TensorBoard purges the later ones (``purge_step``), so the steps that an
        interrupted run logged after its checkpoint are not shown twice. None (a new run): both
        start empty, so a new run in the same directory does not mix its steps with an earlier
        run's."""
        self.enabled = _is_rank0() if enabled is None else enabled
        self.log_dir = Path(log_dir)
        self.console_every = max(1, console_every)
        self.console_keys = console_keys
        self._tb = None
        self._jsonl = None
        self._t0 = time.time()
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            jsonl = self.log_dir / "metrics.jsonl"
            if resume_step is not None:
                _truncate_jsonl(jsonl, resume_step)
            self._tb = SummaryWriter(str(self.log_dir), purge_step=(resume_step or 0) + (resume_step is not None))
            self._jsonl = open(jsonl, "a" if resume_step is not None else "w", buffering=1)

    def write(self, step: int, metrics: Mapping[str, object], prefix: str = "") -> None:
        if not self.enabled:
            return
        clean = {}
        for key, value in metrics.items():
            v = _scalar(value)
            if v is not None:
                clean[f"{prefix}{key}"] = v
        for key, v in clean.items():
            self._tb.add_scalar(key, v, step)
        self._tb.flush()
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time() - self._t0, 3), **{
            k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}) + "\n")
        if step % self.console_every == 0:
            keys = self.console_keys or sorted(clean)
            shown = " ".join(f"{k}={clean[k]:.4g}" for k in keys if k in clean)
            if shown:  # evaluation scalars have their own report
                log.info("step %d | %s", step, shown)

    def text(self, tag: str, text: str, step: int) -> None:
        """A text sample (e.g. one rollout per step) under TensorBoard's Text tab."""
        if self.enabled:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
            self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the records of steps <= last_step (atomically); a torn last line (a process killed
    mid-write) is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records a MetricsWriter wrote, in order (for plots, benchmarks and tests)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
