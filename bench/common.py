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


RESPONSE_DISTRIBUTIONS = ("uniform", "loguniform")


def response_lengths(count: int, low: int, high: int, dist: str = "uniform", seed: int = 0) -> list[int]:
    """``count`` GRPO response lengths in [low, high] tokens, drawn reproducibly.

    uniform: every length equally likely (mean (low + high) / 2). loguniform: long-tailed, many short
    responses and a few long ones, as GRPO on reasoning tasks produces (16-512: median 91, mean 143).
    """
    import math

    import torch

    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(count, generator=gen, dtype=torch.float64)
    if dist == "uniform":
        values = low + u * (high + 1 - low)
    elif dist == "loguniform":
        values = torch.exp(math.log(low) + u * (math.log(high + 1) - math.log(low)))
    else:
        raise ValueError(f"response length distribution {dist!r}: choose one of {RESPONSE_DISTRIBUTIONS}")
    return [min(high, int(v)) for v in values]


def keep_freed_memory() -> None:
    """Stop glibc from handing freed blocks back to the kernel, here and in processes started later.

    By default glibc ``mmap``s blocks over 128 KB-32 MB and unmaps them on free, so a loop that
    allocates the same large temporaries every step (logits, a growing KV cache) page-faults them in
    again each time. On the 2-core VM that tripled transformers' ``generate`` time on a GRPO rollout
    (60 % of it system time, 81M page faults). Benchmarks call this first so that neither side pays
    for it: in this process through ``mallopt``, in spawned ones (vLLM's engine) through glibc's
    environment tunables. It only changes where freed memory goes, not what is computed.
    """
    import ctypes

    # glibc's mallopt parameter numbers (malloc.h) and the environment tunables that set them at start-up
    settings = {-4: ("MALLOC_MMAP_MAX_", 0),              # M_MMAP_MAX: no mmap'd blocks (the threshold caps at 32 MB)
                -1: ("MALLOC_TRIM_THRESHOLD_", 2**30),    # M_TRIM_THRESHOLD: keep up to 1 GB free at the heap's top
                -2: ("MALLOC_TOP_PAD_", 64 * 2**20)}      # M_TOP_PAD: grow the heap 64 MB at a time
    for name, value in settings.values():
        os.environ.setdefault(name, str(value))
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    for param, (_, value) in settings.items():
        libc.mallopt(param, value)
