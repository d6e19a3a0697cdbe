"""Training checkpoints: atomic, resumable, pruned to the last K.

Layout under the checkpoint root::

    root/
      step_00000010/
        dist/                Megatron-Core distributed checkpoint (model, optimizer), torch_dist
        rank_state/rank00000.pt   per-rank state: RNG streams, data position
        megavrl_checkpoint.json   step, world layout, user metadata; written LAST
      step_00000020/ ...

A checkpoint is written into a hidden sibling (``.tmp-step_...``) by all ranks, then rank 0
writes ``megavrl_checkpoint.json`` and renames the directory into place. A directory without that
file is never picked by :meth:`CheckpointManager.latest`, so a run killed mid-save resumes from the
previous complete checkpoint. Sharded model/optimizer tensors go through Megatron-Core's
``dist_checkpointing``, which reshards on load (a checkpoint saved at one TP/PP loads at another).
Per-rank state is read back with ``torch.load(weights_only=True)``: no arbitrary pickle.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megavrl.log import get_logger
from megavrl.parallel.collectives import barrier, broadcast_object, global_rank, world_size

log = get_logger(__name__)

MARKER = "megavrl_checkpoint.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class LoadedCheckpoint:
    path: Path
    step: int
    sharded: dict
    """The state dict returned by dist_checkpointing.load (tensors filled in)."""
    rank_state: dict | None
    """This rank's own state; None when the checkpoint was saved with another parallel layout
    (then only ``shared_keys`` of rank 0's state, on rank 0)."""
    metadata: dict

    @property
    def same_layout(self) -> bool:
        return self.metadata.get("layout") == parallel_layout()


class CheckpointManager:
    """Save and find checkpoints under ``root``; keeps the newest ``keep_last``."""

    def __init__(self, root: str | os.PathLike, keep_last: int = 3):
        if keep_last < 1:
            raise ValueError(f"keep_last={keep_last} must be >= 1")
        self.root = Path(root)
        self.keep_last = keep_last

    # ------------------------------------------------------------------ discovery
    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and (child / MARKER).is_file():
                found.append((int(m.group(1)), child))
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1][1] if done else None

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint to resume from for ``checkpoint.resume`` = auto | none | a path."""
        if resume == "none":
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise FileNotFoundError(f"checkpoint.resume={resume!r} is not a complete megavrl checkpoint "
                                    f"(no {MARKER}); give a step_* directory or 'auto'")
        return path

    # ------------------------------------------------------------------ save / load
    def save(self, step: int, sharded_state_dict: dict, rank_state: dict | None = None,
             metadata: dict | None = None, hf_files_from: str | os.PathLike | None = None) -> Path:
        """Collectively write checkpoint ``step``; every rank must call it. Returns its path.

        hf_files_from: an HF directory whose non-weight files (config, tokenizer, processor, chat
        template) are copied into ``hf/``, so the checkpoint converts to HF on its own.
        """
        from megatron.core import dist_checkpointing

        final = self.root / f"step_{step:08d}"
        tmp_name = broadcast_object(f".tmp-step_{step:08d}-{int(time.time() * 1000)}" if global_rank() == 0 else None)
        tmp = self.root / tmp_name
        t0 = time.perf_counter()
        if global_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            (tmp / "dist").mkdir(parents=True)
            (tmp / "rank_state").mkdir()
            if hf_files_from is not None:
                copy_hf_side_files(hf_files_from, tmp / "hf")
        barrier()
        dist_checkpointing.save(sharded_state_dict, str(tmp / "dist"))
        if rank_state is not None:
            torch.save(rank_state, tmp / "rank_state" / f"rank{global_rank():05d}.pt")
        barrier()
        if global_rank() == 0:
            meta = {"step": step, "world_size": world_size(), "layout": parallel_layout(),
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(metadata or {})}
            (tmp / MARKER).write_text(json.dumps(meta, indent=2, default=str) + "\n")
            old = None
            if final.exists():  # a re-save of the same step: set the old one aside until the new one is in place
                old = self.root / f".tmp-replaced-{final.name}-{int(time.time() * 1000)}"
                os.replace(final, old)
            os.replace(tmp, final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._prune()
            log.info("saved checkpoint %s in %.1f s", final, time.perf_counter() - t0)
        barrier()
        return final

    def load(self, path: str | os.PathLike, sharded_state_dict: dict,
             shared_keys: tuple[str, ...] = ()) -> LoadedCheckpoint:
        """Collectively load ``path`` into the shapes/shardings described by ``sharded_state_dict``.

        Sharded tensors (model, optimizer) are resharded to this run's layout by Megatron. Per-rank
        state (RNG streams) belongs to a position in the (TP, PP, DP) grid: it is restored only when
        the layout is the one the checkpoint was saved with. ``shared_keys`` name entries of rank
        0's state that do not depend on the layout (the data stream's position, which rank 0
        holds); rank 0 gets those back whatever the layout.
        """
        from megatron.core import dist_checkpointing

        from megavrl.checkpoint.dist_io import check_safe_to_load

        path = Path(path)
        metadata = json.loads((path / MARKER).read_text())
        check_safe_to_load(path / "dist")  # Megatron's loader itself would unpickle without restriction
        state = dist_checkpointing.load(sharded_state_dict, str(path / "dist"))
        saved_layout = metadata.get("layout") or {"world_size": metadata.get("world_size")}
        rank_state = None
        if saved_layout == parallel_layout():
            rank_file = path / "rank_state" / f"rank{global_rank():05d}.pt"
            if rank_file.is_file():
                rank_state = torch.load(rank_file, map_location="cpu", weights_only=True)
        else:
            rank0_file = path / "rank_state" / f"rank{0:05d}.pt"
            if global_rank() == 0 and shared_keys and rank0_file.is_file():
                rank0 = torch.load(rank0_file, map_location="cpu", weights_only=True)
                rank_state = {k: rank0[k] for k in shared_keys if k in rank0}
            if global_rank() == 0:
                log.warning("checkpoint %s was saved with layout %s, this run has %s: weights and optimizer "
                            "state are resharded; the per-rank RNG streams restart from the seed%s", path,
                            _layout_text(saved_layout), _layout_text(parallel_layout()),
                            f"; kept: {', '.join(shared_keys)}" if shared_keys else "")
        return LoadedCheckpoint(path=path, step=int(metadata["step"]), sharded=state,
                                rank_state=rank_state, metadata=metadata)

    def remove_stale(self) -> list[Path]:
        """Remove the ``.tmp-*`` directories that writers killed mid-save left behind. Call it
        at the start of a run (rank 0), before this run saves anything."""
        removed = []
        for stale in self.root.glob(".tmp-*") if self.root.is_dir() else []:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
        if removed:
            log.info("removed %d incomplete checkpoint(s) left by an interrupted save: %s", len(removed),
                     ", ".join(p.name for p in removed))
        return removed

    def _prune(self) -> None:
        done = self.complete()
        for _, old in done[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            log.debug("removed old checkpoint %s (keep_last=%d)", old, self.keep_last)
        for stale in self.root.glob(".tmp-*"):  # left by a run killed while saving
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


def parallel_layout() -> dict:
    """{"world_size", "tp", "pp", "dp"} of this process group (tp = pp = 1 without Megatron groups)."""
    layout = {"world_size": world_size(), "tp": 1, "pp": 1, "dp": world_size()}
    try:
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            layout.update(tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
                          dp=ps.get_data_parallel_world_size())
    except ImportError:
        pass
    return layout


def _layout_text(layout: dict) -> str:
    if "tp" not in layout:
        return f"world size {layout.get('world_size')}"
    return f"TP={layout['tp']} PP={layout['pp']} DP={layout['dp']}"


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def copy_hf_side_files(hf_dir: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy everything of an HF directory but the weights (config, tokenizer, processor files)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for f in sorted(Path(hf_dir).iterdir()):
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, dest / f.name)
            copied.append(f.name)
    return copied


# --------------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Every random stream a training step touches, as plain tensors/ints (weights_only-safe)."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["megatron_tracker"] = get_cuda_rng_tracker().get_states()
    except Exception:  # no model-parallel RNG initialised (single-process tools)
        pass
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "megatron_tracker" in state:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["megatron_tracker"])
