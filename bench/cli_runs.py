"""Benchmarks that train: drive the ``megavrl`` CLI as subprocesses, as examples/demo.sh does.

``megavrl(args, log)`` runs one command with its output in ``log``; ``train(...)`` runs
``megavrl train`` on examples/configs/tiny_cpu_tvg.yaml (TP and data overridden) and returns its
metrics.jsonl; ``warm_start(...)`` builds, or reuses, the tiny random model, the synthetic
grounding data and an SFT warm start exported to HF format. The warm start is cached under
runs/bench_cache/ by its settings and a digest of the megavrl sources, so the benchmarks of one
``make bench`` share it and a code change rebuilds it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "configs" / "tiny_cpu_tvg.yaml"
CACHE = ROOT / "runs" / "bench_cache"
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


def demo_config():
    """examples/configs/tiny_cpu_tvg.yaml, loaded: the demo's GRPO settings, the training
    benchmarks' defaults."""
    from megavrl.config import load_config

    return load_config(CONFIG)


def constant_answer_reward(iou: float) -> float:
    """The training reward of a well-formed answer (format reward 1) whose span scores ``iou``,
    with the demo config's reward weights: what the blind baseline's constant answer earns."""
    reward = demo_config().reward
    return reward.format_weight + reward.iou_weight * iou


def mode_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--quick`` (the default) and ``--full`` (``args.mode``)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="the default")
    mode.add_argument("--full", dest="mode", action="store_const", const="full")
    ap.set_defaults(mode="quick")
    return ap


def apply_mode(args: argparse.Namespace, modes: dict[str, dict]) -> None:
    """Fill the options left unset (None) from the chosen mode's defaults."""
    for key, value in modes[args.mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def megavrl(args: list[str], log: Path) -> None:
    """Run one ``megavrl`` command, its output to ``log``; raise with the log's tail on failure."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_VARS and not k.startswith(("TORCHELASTIC_", "TORCH_ELASTIC_"))}
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "megavrl.cli", *args], stdout=f, stderr=subprocess.STDOUT,
                             env=env, cwd=ROOT)
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"megavrl {args[0]} exited {rc} (log {log}):\n{tail}")
    print(f"  {args[0]} -> {log} ({time.time() - t0:.0f} s)", flush=True)


def dataset_override(key: str, jsonl: Path, data_folder: Path, name: str) -> str:
    """A ``data.train=[...]`` style override naming one megavrl-format dataset."""
    return f"{key}=[{{json_path: {jsonl}, data_folder: {data_folder}, format: megavrl, name: {name}}}]"


def train(work: Path, name: str, hf_dir: Path, data: Path, overrides: list[str],
          train_jsonl: Path | None = None, val: bool = False) -> Path:
    """``megavrl train`` into work/name on data/train.jsonl (or ``train_jsonl``, whose video paths
    are relative to ``data``); ``val``: evaluate on data/val.jsonl. Returns its metrics.jsonl."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)  # a run directory holds one run's curve, never two
    megavrl(["train", "--config", str(CONFIG), f"model.hf_dir={hf_dir}",
             dataset_override("data.train", train_jsonl or data / "train.jsonl", data, name),
             dataset_override("data.val", data / "val.jsonl", data, "synth_val") if val else "data.val=[]",
             "checkpoint.resume=none", "checkpoint.save_every=0", f"trainer.output_dir={out}", *overrides],
            work / f"{name}.log")
    return out / "tensorboard" / "metrics.jsonl"


def read_metrics(metrics: Path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


@dataclass(frozen=True)
class WarmStart:
    """Settings of a warm start: model preset and seed, synthetic data, SFT steps and learning rate.

    The defaults are examples/demo.sh's: its 504 training videos of one frame-filling event on a
    brightening background (72 held out here, where the demo holds out 216: the benchmarks
    evaluate at every eval step; the best constant span scores mIoU 12-18 on them), and 600 SFT
    steps of 16 prompts at lr 5e-4 with cosine decay, after which the model grounds the event in
    the video (held-out mIoU about 90; see the README's demo section)."""

    videos: int = 576
    val_fraction: float = 0.125
    tasks: str = "tvg"
    size: str = "56x56"
    shape_size: float = 1.0
    distractors: int = 0
    data_seed: int = 0
    preset: str = "tiny"
    model_seed: int = 0
    sft_steps: int = 600
    sft_prompts_per_step: int = 16
    sft_lr: float = 5e-4
    sft_lr_decay: str = "cosine"
    sft_warmup_steps: int = 20
    sft_seed: int = 1234
    tp: int = 1

    def synth_args(self) -> list[str]:
        """``megavrl data synth`` options for this data (``--out`` not included)."""
        return ["--tasks", self.tasks, "--n", str(self.videos), "--val-fraction", str(self.val_fraction),
                "--seed", str(self.data_seed), "--size", self.size, "--shape-size", str(self.shape_size),
                "--distractors", str(self.distractors)]

    def sft_overrides(self) -> list[str]:
        """``megavrl train`` overrides of the SFT warm start."""
        return [f"parallel.tp={self.tp}", "algorithm.name=sft", f"trainer.total_steps={self.sft_steps}",
                f"trainer.prompts_per_step={self.sft_prompts_per_step}",
                f"trainer.micro_batch_size={self.sft_prompts_per_step}", f"optimizer.lr={self.sft_lr}",
                f"optimizer.lr_decay_style={self.sft_lr_decay}", f"optimizer.lr_warmup_steps={self.sft_warmup_steps}",
                f"trainer.seed={self.sft_seed}", "checkpoint.export_hf_at_end=true"]


@dataclass(frozen=True)
class WarmPaths:
    root: Path
    tiny_hf: Path
    data: Path
    sft_hf: Path


def _sources_digest() -> str:
    h = hashlib.sha256()
    for path in sorted((ROOT / "megavrl").rglob("*.py")) + [CONFIG]:
        h.update(str(path.relative_to(ROOT)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def warm_start(settings: WarmStart = WarmStart(), cache: Path = CACHE) -> WarmPaths:
    """The tiny model, synthetic data and SFT model of ``settings``: from the cache when a complete
    one exists (built in a temporary directory, renamed into place when done), else built now."""
    key = hashlib.sha256(json.dumps({**asdict(settings), "sources": _sources_digest()},
                                    sort_keys=True).encode()).hexdigest()[:12]
    root = cache / f"warm-{key}"
    paths = WarmPaths(root, root / "tiny-hf", root / "data", root / "sft" / "hf")
    if (root / "DONE").exists():
        print(f"  warm start: reusing {root}", flush=True)
        return paths
    tmp = cache / f".warm-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    s = settings
    megavrl(["make-tiny-model", "--out", str(tmp / "tiny-hf"), "--preset", s.preset, "--seed", str(s.model_seed),
             "--force"], tmp / "make-tiny-model.log")
    megavrl(["data", "synth", "--out", str(tmp / "data"), *s.synth_args()], tmp / "synth.log")
    if s.sft_steps > 0:
        train(tmp, "sft", tmp / "tiny-hf", tmp / "data", s.sft_overrides())
    else:
        shutil.copytree(tmp / "tiny-hf", tmp / "sft" / "hf")
    # The runs wrote absolute paths under tmp; only the HF directories and the data are reused,
    # and those hold no paths, so the directory can move.
    (tmp / "settings.json").write_text(json.dumps(asdict(s), indent=2) + "\n")
    (tmp / "DONE").write_text("")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return paths
