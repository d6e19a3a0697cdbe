"""What every benchmark writes: figures next to the baseline measured in the same run.

``write_result("rollout", [Figure("tokens/s", 1234.0, 411.0, "tokens/s", higher_is_better=True)])``
writes bench/results/rollout.json with the machine and the date, and prints one line a figure.
The ratio is always "how many times better than the baseline" (>1 is a win), whichever way the
unit points.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Figure:
    name: str
    value: float
    baseline: float
    unit: str
    higher_is_better: bool = True
    baseline_name: str = "baseline"
    notes: dict = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if self.higher_is_better:
            return self.value / self.baseline if self.baseline else float("inf")
        return self.baseline / self.value if self.value else float("inf")


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
        else:
            info["device"] = "cpu"
    except ImportError:
        pass
    return info


def write_result(name: str, figures: list[Figure], config: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "config": config or {},
        "figures": [{**asdict(f), "ratio": f.ratio} for f in figures],
    }
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)
    for f in figures:
        print(f"[{name}] {f.name}: {f.value:.4g} {f.unit} vs {f.baseline_name} {f.baseline:.4g} "
              f"-> {f.ratio:.2f}x {'better' if f.ratio >= 1 else 'worse'}")
    return path
