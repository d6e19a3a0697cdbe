"""Hugging Face Qwen2.5-VL <-> megavrl Megatron checkpoints, at any TP/PP, in bounded memory.

    convert_hf_to_megatron("Qwen2.5-VL-7B-Instruct", "ckpt/qwen7b-tp2", tp=2, pp=1)   # every rank
    convert_megatron_to_hf("ckpt/qwen7b-tp2", "out/qwen7b-hf", dtype="bf16")          # one process

A megavrl Megatron checkpoint is a directory (the trainer's ``step_*`` directories have the same
layout, see :mod:`megavrl.checkpoint.manager`)::

    dist/                    Megatron-Core distributed checkpoint (torch_dist), keys of the model's
                             own sharded_state_dict(): loads at any TP/PP the sizes allow
    hf/                      the HF directory's non-weight files: config.json, generation config,
                             tokenizer, chat template, processor configs
    megavrl_checkpoint.json  {"step", "world_size", "tp", "pp", "dtype", "source", ...}, written last

Memory. Neither direction builds the model's weights. HF -> Megatron builds this rank's model
stage on the ``meta`` device (no storage) only to ask it for its ``sharded_state_dict()`` (the
exact keys, stacked-layer offsets and factories Megatron loads), then writes it through
:class:`megavrl.checkpoint.dist_io.StreamingSaveStrategy`: each shard is read from the
safetensors (only the slice this TP rank needs), cut by the mapping table and written before the
next one is read. Megatron -> HF reads one parameter (one layer of a stacked tensor) at a time
from the dist checkpoint, merges it into HF tensors with the mapping table and streams them into
safetensors shards whose headers were written first. Peak memory is a few times the largest
tensor, whatever the model's size (bench/bench_convert.py measures it).

Speed, Megatron -> HF. The checkpoint is memory-mapped, not read; a tensor that HF stores as the
checkpoint does (same dtype, same layout: all but the attention's QKV at TP=1, and the halves of
the SwiGLU fc1 as gate_proj and up_proj) goes from file to file in the kernel
(``os.copy_file_range``); the next tensors are prepared in a thread meanwhile; the output is
flushed to disk in the background while it is written. On a 1.7 GB model this runs at about the
speed of transformers' ``from_pretrained`` + ``save_pretrained``, which neither bounds memory nor
syncs the files to disk.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from megavrl.checkpoint.manager import MARKER, CheckpointManager, copy_hf_side_files
from megavrl.checkpoint.mapping import HF_FINAL_NORM, HF_OUTPUT, LANGUAGE_PREFIX, VISION_PREFIX, mapping_context
from megavrl.dtypes import dtype_name, torch_dtype
from megavrl.log import get_logger
from megavrl.parallel.collectives import all_gather_object, barrier, broadcast_object, global_rank, world_size

log = get_logger(__name__)


# Megatron parameter names of the model start with these; other keys of a training checkpoint
# (optimizer states, ...) are not model tensors.
_MODEL_KEY_PREFIXES = (LANGUAGE_PREFIX, VISION_PREFIX)
_LIST_LIMIT = 25


class CheckpointMismatchError(ValueError):
    """Tensors or configs of two checkpoints that do not fit; the message lists every problem."""


def _names(items: list, limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _problems_message(title: str, missing: list[str], unexpected: list[str], mismatched: list[str], hint: str) -> str:
    lines = [title]
    if missing:
        lines.append(f"  missing tensors ({len(missing)}): {_names(missing)}")
    if unexpected:
        lines.append(f"  unexpected tensors ({len(unexpected)}): {_names(unexpected)}")
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}):")
        lines += [f"    {m}" for m in mismatched[:_LIST_LIMIT]]
        if len(mismatched) > _LIST_LIMIT:
            lines.append(f"    ... and {len(mismatched) - _LIST_LIMIT} more")
    lines.append(hint)
    return "\n".join(lines)


def _sizes_summary(configs) -> str:
    t, v = configs.text, configs.vision_sizes
    return (f"text: {t.num_layers} layers, hidden {t.hidden_size}, {t.num_attention_heads} heads / "
            f"{t.num_query_groups} KV groups, ffn {t.ffn_hidden_size}, vocab {t.vocab_size}, tied embeddings "
            f"{t.tie_word_embeddings}; vision: depth {v.depth}, hidden {v.hidden_size}, {v.num_heads} heads, "
            f"ffn {v.intermediate_size}")


# ------------------------------------------------------------------------------ atomic output


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty; pass --force to replace it")


def _new_tmp_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{int(time.time() * 1000)}"


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` (allowed by --force) goes only once the new
    directory is complete."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{int(time.time() * 1000)}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ distributed bits


def _agree_on_error(error: BaseException | None) -> None:
    """Raise on every rank if any rank failed, with the first failure's message: a lone rank
    raising would leave the others waiting in a collective."""
    errors = [e for e in all_gather_object(None if error is None else (type(error).__name__, str(error))) if e]
    if error is not None:
        raise error
    if errors:
        kind, msg = errors[0]
        exc = {"CheckpointMismatchError": CheckpointMismatchError, "FileExistsError": FileExistsError,
               "FileNotFoundError": FileNotFoundError}.get(kind, ValueError)
        raise exc(msg)


def _meta_model(configs):
    """This rank's Qwen2_5_VLModel stage with meta tensors: names, shapes and the sharded state
    dict of the real model, no memory."""
    from megavrl.models.qwen2_5_vl.model import Qwen2_5_VLModel

    # Initialising meta weights computes nothing but still walks every init function (5 % of an export).
    quiet = {}
    for name in ("language", "vision"):
        config = quiet[name] = copy.copy(getattr(configs, name))
        config.perform_initialization = False
    with torch.device("meta"):
        return Qwen2_5_VLModel(replace(configs, **quiet))


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed blocks below its mmap threshold,
    up to 32 MB, in the heap, where they count in the resident set): without it the peak RSS
    drifts above the few tensors actually alive."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):  # not glibc
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True, mininterval=0.5)


# =============================================================================== HF -> Megatron


def _hf_dtype(reader) -> torch.dtype:
    """The dtype the HF checkpoint stores its weights in (read from one small tensor)."""
    return reader.read(HF_FINAL_NORM, 0, 0, 1).dtype


def _read_param_shard(reader, binding, shape, tp_rank: int, ctx, dtype: torch.dtype) -> torch.Tensor:
    """This TP rank's shard of one Megatron parameter, read slice by slice from the safetensors."""
    from megavrl.checkpoint.mapping import assemble_shard, shard_pieces

    row = binding.row
    hf_shapes = [reader.shape(n) for n in binding.hf_names]
    pieces = shard_pieces(row.split, hf_shapes, tp_rank, ctx, row.component)
    if not pieces:  # a vocab shard made only of padding rows
        return torch.zeros(shape, dtype=dtype)
    parts = [reader.read(binding.hf_names[p[0]], p[1], p[2], p[3]) for p in pieces]
    shard = assemble_shard(row.split, parts, ctx, row.component)
    del parts
    return shard.to(dtype)


def _check_hf_tensors(reader, bindings: dict, params: dict, ctx, configs, hf_dir: Path) -> None:
    """Every rank: its stage's HF tensors must exist with the shapes config.json implies; the
    HF directory must hold nothing else. Raises the same CheckpointMismatchError on every rank."""
    from megavrl.checkpoint.mapping import hf_shapes_from_shard, to_published

    expected: dict[str, tuple] = {}
    for name, binding in bindings.items():
        row = binding.row
        for hf_name, shape in zip(binding.hf_names,
                                  hf_shapes_from_shard(row.split, params[name].shape, ctx, row.component)):
            expected[hf_name] = tuple(shape)
    missing, mismatched = [], []
    for hf_name, shape in expected.items():
        if not reader.has(hf_name):
            missing.append(hf_name)
        elif reader.shape(hf_name) != shape:
            mismatched.append(f"{hf_name}: safetensors hold {reader.shape(hf_name)}, config.json implies {shape}")
    gathered = all_gather_object((sorted(expected), missing, mismatched))
    all_expected = set().union(*(set(g[0]) for g in gathered))
    missing = sorted(set().union(*(g[1] for g in gathered)))
    mismatched = sorted(set().union(*(g[2] for g in gathered)))
    unexpected = []
    for name in reader.names():
        published = to_published(name)
        if published in all_expected:
            continue
        if published == HF_OUTPUT and ctx.tie_word_embeddings:
            log.info("%s holds %s but config.json ties the embeddings: ignored", hf_dir, HF_OUTPUT)
            continue
        unexpected.append(name)
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(_problems_message(
            f"the safetensors of {hf_dir} do not match its config.json ({_sizes_summary(configs)}):",
            missing, sorted(unexpected), mismatched,
            "Check that config.json belongs to these weights (a Qwen2.5-VL checkpoint, unmodified)."))


def _megatron_source(binding_of: dict, params: dict, factories: dict, hf_dir: Path, tp_rank: int, ctx):
    """The ``materialise(path, sharded_tensor)`` of StreamingSaveStrategy for a model stage. Each
    tensor is stored in its parameter's dtype (params_dtype, but e.g. torch norms stay fp32).

    The safetensors are opened afresh for every parameter: they are memory-mapped, and the mapped
    pages a read touched count in the process's resident memory until the map is closed; kept
    open, they would add up to the whole checkpoint."""
    from megavrl.checkpoint.hf_io import HFCheckpointReader

    def materialise(path: tuple, sh_ten) -> torch.Tensor:
        name = path[0]
        if name not in binding_of:
            raise KeyError(f"sharded state dict entry {name!r} ({sh_ten.key}) is not a mapped parameter")
        param = params[name]
        with HFCheckpointReader(hf_dir) as reader:
            shard = _read_param_shard(reader, binding_of[name], tuple(param.shape), tp_rank, ctx, param.dtype)
        if name in factories:  # e.g. gated fc1: Megatron stores its two halves as two shards
            factory = factories[name]
            built = factory.build_fn(factory.key, shard, factory.replica_id, factory.flattened_range)
            for p in path[1:]:
                built = built[p]
            shard = built.data
        _release_freed_memory()  # the previous shard, written by now
        return shard

    return materialise


def convert_hf_to_megatron(hf_dir: str | os.PathLike, out: str | os.PathLike, tp: int = 1, pp: int = 1,
                           dtype: str | torch.dtype = "auto", force: bool = False, progress: bool = True) -> Path:
    """Write the HF Qwen2.5-VL directory ``hf_dir`` as a megavrl Megatron checkpoint ``out``,
    sharded for (tp, pp).

    Collective: run it on every rank of a job of tp * pp (* dp) processes (torchrun), or in one
    process for tp = pp = 1. Initialises torch.distributed / Megatron's groups when needed.
    dtype: "auto" (the dtype of the safetensors), "bf16", "fp16" or "fp32".
    Raises FileExistsError for a non-empty ``out`` without ``force``, ValueError for another
    model type or a TP/PP the sizes do not allow, CheckpointMismatchError for tensors that do
    not match config.json. Returns the checkpoint path.
    """
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from megavrl.checkpoint.dist_io import StreamingSaveStrategy
    from megavrl.checkpoint.hf_io import HFCheckpointReader
    from megavrl.checkpoint.mapping import bind
    from megavrl.models.qwen2_5_vl.config import build_configs
    from megavrl.parallel import init_distributed

    hf_dir, out = Path(hf_dir), Path(out)
    t0 = time.perf_counter()
    layout = init_distributed(tp, pp)
    error = None
    try:
        _check_out(out, force)
        if not (hf_dir / "config.json").is_file():
            raise FileNotFoundError(f"{hf_dir} has no config.json: give a Hugging Face Qwen2.5-VL directory")
        configs = build_configs(hf_dir, tp=tp, pp=pp)  # refuses other model types and TP/PP misfits first
        with HFCheckpointReader(hf_dir) as reader:
            target = _hf_dtype(reader) if dtype == "auto" else torch_dtype(dtype)
        configs = build_configs(hf_dir, tp=tp, pp=pp, params_dtype=target)
        ctx = mapping_context(configs)
        model = _meta_model(configs)
        params = dict(model.named_parameters())
        binding_of = {name: bind(name, model.layer_offset, ctx.tie_word_embeddings) for name in params}
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        error = e
    _agree_on_error(error)
    with HFCheckpointReader(hf_dir) as reader:  # headers only: names and shapes
        _agree_on_error(_capture(lambda: _check_hf_tensors(reader, binding_of, params, ctx, configs, hf_dir)))

    tmp = Path(broadcast_object(str(_new_tmp_dir(out)) if global_rank() == 0 else None))
    if global_rank() == 0:
        (tmp / "dist").mkdir(parents=True)
    barrier()
    try:
        sharded = model.sharded_state_dict()
        factories = {k: v for k, v in sharded.items() if isinstance(v, ShardedTensorFactory)}
        materialise = _megatron_source(binding_of, params, factories, hf_dir, layout.tp_rank, ctx)
        bar = _progress(0, f"hf->megatron tp={tp} pp={pp} (rank 0's shards)", progress and global_rank() == 0)
        strategy = StreamingSaveStrategy(materialise, progress=bar)
        dist_checkpointing.save(sharded, str(tmp / "dist"), sharded_strategy=strategy)
        bar.close()
        written = sum(all_gather_object(strategy.bytes_written))
        barrier()
        if global_rank() == 0:
            kept = copy_hf_side_files(hf_dir, tmp / "hf")
            meta = {"step": 0, "world_size": layout.world_size, "tp": tp, "pp": pp, "dtype": dtype_name(target),
                    "source": str(hf_dir.resolve()), "kind": "converted", "model_type": "qwen2_5_vl",
                    "bytes": written, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
            _move_into_place(tmp, out)
            secs = time.perf_counter() - t0
            log.info("converted %s -> %s (TP %d, PP %d, %s): %.1f MB in %.1f s (%.1f MB/s); kept %s",
                     hf_dir, out, tp, pp, dtype_name(target), written / 1e6, secs, written / 1e6 / secs,
                     ", ".join(kept))
        barrier()
    except BaseException:
        if global_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _capture(fn) -> BaseException | None:
    try:
        fn()
    except (ValueError, KeyError) as e:
        return e
    return None


# =============================================================================== Megatron -> HF


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A complete megavrl checkpoint directory from: a converter output or a trainer step_*
    directory (holding megavrl_checkpoint.json), or a checkpoint root (its newest complete
    step_*)."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    latest = CheckpointManager(path).latest()
    if latest is None:
        raise FileNotFoundError(f"{path} is not a megavrl checkpoint: it has no {MARKER} and no complete step_* "
                                "directory (an incomplete save has no marker file)")
    log.info("%s is a checkpoint root: using its newest complete checkpoint %s", path, latest.name)
    return latest


@dataclass(frozen=True)
class _Box:
    """One stored piece of a parameter: a box of the checkpoint tensor ``key``."""

    key: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]  # with a leading 1 per stacked-layer axis
    local_shape: tuple[int, ...]  # the piece without the stacked axes
    global_shape: tuple[int, ...]  # the whole checkpoint tensor, as the model expects it
    flexible: bool  # allow_shape_mismatch (the vocabulary, padded differently at each TP)


@dataclass(frozen=True)
class _ParamSource:
    """Where one Megatron parameter (at TP=1) lives in the dist checkpoint."""

    name: str
    binding: Any
    shape: tuple[int, ...]  # the parameter at TP=1
    boxes: tuple[_Box, ...]  # one per stored piece
    merge: Any  # None, or the factory's merge_fn joining the pieces


def _param_sources(configs) -> list[_ParamSource]:
    """For every parameter of the model at TP=1, PP=1: its mapping binding and the checkpoint boxes
    that hold it, from the model's own sharded_state_dict (a meta model: no memory)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megavrl.checkpoint.dist_io import walk
    from megavrl.checkpoint.mapping import bind

    model = _meta_model(configs)
    ctx = mapping_context(configs)
    sharded = model.sharded_state_dict()
    out = []
    for name, param in model.named_parameters():
        entry = sharded[name]
        merge = None
        if isinstance(entry, ShardedTensorFactory):
            merge = entry.merge_fn
            entry = entry.build()
        boxes = []
        for _, sh in walk(entry):
            if not isinstance(sh, ShardedTensor):
                raise TypeError(f"{name}: unexpected {type(sh).__name__} in the model's sharded state dict")
            boxes.append(_Box(sh.key, tuple(sh.global_offset), (1,) * sh.prepend_axis_num + tuple(sh.local_shape),
                              tuple(sh.local_shape), tuple(sh.global_shape), sh.allow_shape_mismatch))
        out.append(_ParamSource(name, bind(name, 0, ctx.tie_word_embeddings), tuple(param.shape), tuple(boxes), merge))
    return out


def _check_megatron_tensors(reader, sources: list[_ParamSource], configs, ckpt: Path, config_from: Path) -> None:
    expected = {}
    for src in sources:
        for box in src.boxes:
            expected[box.key] = (box.global_shape, box.flexible)
    missing, mismatched = [], []
    vocab = configs.text.vocab_size
    for key, (shape, flexible) in expected.items():
        info = reader.tensors.get(key)
        if info is None:
            missing.append(key)
            continue
        ok = (info.shape == shape if not flexible else
              info.shape[1:] == shape[1:] and info.shape[0] >= vocab)  # vocab padding depends on the saved TP
        if not ok:
            want = shape if not flexible else f"(>= {vocab},) + {shape[1:]}"
            mismatched.append(f"{key}: checkpoint holds {info.shape}, the config implies {want}")
    unexpected = sorted(k for k in reader.tensors if k.startswith(_MODEL_KEY_PREFIXES) and k not in expected)
    ignored = [k for k in reader.tensors if not k.startswith(_MODEL_KEY_PREFIXES)]
    if ignored:
        log.info("%s: %d non-model tensors (optimizer states, ...) are not exported", ckpt, len(ignored))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(_problems_message(
            f"the Megatron checkpoint {ckpt} does not match the HF config {config_from / 'config.json'} "
            f"({_sizes_summary(configs)}):", missing, unexpected, mismatched,
            "The config does not describe this checkpoint: pass --hf-config with the HF directory the "
            "checkpoint was made from."))


def _read_pieces(reader, src: _ParamSource) -> list[torch.Tensor]:
    """The stored pieces of one parameter at TP=1 (views of the mapped checkpoint, no copy)."""
    pieces = []
    for box in src.boxes:
        if box.flexible:  # the saved vocab padding may differ from TP=1's: read all saved rows
            pieces.append(reader.read(box.key))
        else:
            pieces.append(reader.read(box.key, box.offsets, box.sizes).reshape(box.local_shape))
    return pieces


def _read_hf_tensors(reader, src: _ParamSource, ctx) -> list[torch.Tensor]:
    """The HF tensors of one parameter, in its row's HF order.

    Megatron's SwiGLU factory stores fc1 as its two halves (``_w`` = gate, ``_v`` = up) and joins
    them on load; the HF checkpoint wants them apart again. At TP=1 the stored halves *are*
    gate_proj and up_proj, so they are passed on as they are instead of joined and split (a copy
    of every MLP's largest weight)."""
    from megavrl.checkpoint.mapping import Split, merge_shards

    row = src.binding.row
    pieces = _read_pieces(reader, src)
    if (src.merge is not None and row.split is Split.GATE_UP and len(pieces) == 2
            and pieces[0].shape == pieces[1].shape and 2 * pieces[0].shape[0] == src.shape[0]):
        return pieces
    param = src.merge(pieces) if src.merge is not None else pieces[0]
    return merge_shards(row.split, [param], ctx, row.component)


def _update_config_dtype(config_path: Path, dtype: torch.dtype) -> None:
    config = json.loads(config_path.read_text())
    name = dtype_name(dtype)
    config["dtype"] = name
    if "torch_dtype" in config:
        config["torch_dtype"] = name
    for sub in ("text_config", "vision_config"):
        for field in ("dtype", "torch_dtype"):
            if isinstance(config.get(sub), dict) and field in config[sub]:
                config[sub][field] = name
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_plan(sources: list[_ParamSource], ctx):
    """(param source, [(HF name, HF shape)]) in export order; tied output weights are skipped."""
    from megavrl.checkpoint.mapping import TIED_OUTPUT_MEGATRON, hf_shapes_from_shard

    plan = []
    for src in sources:
        if ctx.tie_word_embeddings and src.name == TIED_OUTPUT_MEGATRON:
            continue
        row = src.binding.row
        shapes = hf_shapes_from_shard(row.split, src.shape, ctx, row.component)
        plan.append((src, list(zip(src.binding.hf_names, (tuple(s) for s in shapes)))))
    return plan


def _read_ahead(items, depth: int = 2):
    """Iterate ``items`` (a generator) in a background thread, at most ``depth`` items ahead of the
    caller, so that producing the next item (reading, unpickling, re-laying out) overlaps with the
    caller's work on this one (the kernel copying it to disk). Exceptions reach the caller; the
    thread stops when the caller stops iterating."""
    import queue
    import threading

    done = object()
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        ready.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            ready.put((done, None))
        except BaseException as e:  # noqa: BLE001 -- handed to the caller
            ready.put((done, e))

    thread = threading.Thread(target=produce, name="megatron-to-hf-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = ready.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def convert_megatron_to_hf(ckpt: str | os.PathLike, out: str | os.PathLike, dtype: str | torch.dtype = "bf16",
                           max_shard_size: str | int = "5GB", force: bool = False,
                           hf_config: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Write the megavrl Megatron checkpoint ``ckpt`` (a converter output, a trainer step
    directory, or a checkpoint root: its newest complete step) as a HF Qwen2.5-VL directory.

    One process does it (no model-parallel group needed): the checkpoint is read at TP=1
    whatever TP/PP saved it.
    dtype: bf16 (default), fp16 or fp32 for the safetensors and config.json.
    max_shard_size: cap of one safetensors file ("5GB", "500MB", bytes).
    hf_config: a HF directory whose config/tokenizer/processor files to use when the checkpoint
        has no ``hf/`` (a trainer checkpoint) or to override it; checked against the tensors.
    """
    from megavrl.checkpoint.dist_io import DistCheckpointReader
    from megavrl.checkpoint.safetensors_writer import ShardedSafetensorsWriter, parse_size
    from megavrl.checkpoint.tensor_spec import TensorSpec
    from megavrl.models.qwen2_5_vl.config import build_configs, require_hf_dir
    from megavrl.parallel import init_distributed

    out = Path(out)
    target = torch_dtype(dtype)
    cap = parse_size(max_shard_size)
    ckpt_dir = resolve_checkpoint(ckpt)
    reader = DistCheckpointReader(ckpt_dir / "dist")  # a damaged checkpoint fails here, before any model is built
    config_from = Path(hf_config) if hf_config is not None else ckpt_dir / "hf"
    if hf_config is not None:
        require_hf_dir(hf_config, "--hf-config")
    if not (config_from / "config.json").is_file():
        raise FileNotFoundError(
            f"{config_from} has no config.json: the checkpoint {ckpt_dir} keeps no HF files (a training checkpoint "
            "saved without them?); pass --hf-config with the HF directory it was trained from")
    _check_out(out, force)
    if world_size() > 1:
        raise RuntimeError("convert_megatron_to_hf runs in one process (it reads any TP/PP layout itself); "
                           "do not start it under torchrun with several processes")
    if not torch.distributed.is_initialized():
        init_distributed(1, 1)  # the meta model asks Megatron's parallel state for its layout
    t0 = time.perf_counter()
    configs = build_configs(config_from, tp=1, pp=1)
    ctx = mapping_context(configs)
    sources = _param_sources(configs)
    tmp = _new_tmp_dir(out)
    try:
        with reader:
            _check_megatron_tensors(reader, sources, configs, ckpt_dir, config_from)
            plan = export_plan(sources, ctx)
            planned = [TensorSpec(n, s, target) for _, named in plan for n, s in named]
            tmp.mkdir(parents=True)
            writer = ShardedSafetensorsWriter(tmp, planned, cap)
            bar = _progress(writer.total_bytes, f"megatron->hf {dtype_name(target)}", progress)
            hf_tensors = ((name, tensor.to(target)) for src, named in plan
                          for (name, _), tensor in zip(named, _read_hf_tensors(reader, src, ctx)))
            with writer:
                for hf_name, tensor in _read_ahead(hf_tensors):
                    writer.write(hf_name, tensor, source=reader.file_span(tensor))
                    bar.update(tensor.nbytes)
                    del tensor
                    _release_freed_memory()
            bar.close()
        kept = copy_hf_side_files(config_from, tmp)
        _update_config_dtype(tmp / "config.json", target)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    secs = time.perf_counter() - t0
    log.info("exported %s -> %s (%s, %d safetensors files): %.1f MB in %.1f s (%.1f MB/s); kept %s", ckpt_dir, out,
             dtype_name(target), len(writer.files), writer.total_bytes / 1e6, secs,
             writer.total_bytes / 1e6 / secs, ", ".join(kept))
    return out


def load_megatron_weights(model, ckpt: str | os.PathLike) -> Path:
    """Load a megavrl Megatron checkpoint (converter output, step directory or root) into this
    rank's model stage, at the model's own TP/PP, as the trainer does
    (``dist_checkpointing.load(model.sharded_state_dict())``). Collective. Returns the path used."""
    from megatron.core import dist_checkpointing

    from megavrl.checkpoint.dist_io import check_safe_to_load

    path = resolve_checkpoint(ckpt)
    check_safe_to_load(path / "dist")  # Megatron's loader would unpickle without restriction
    state = dist_checkpointing.load(model.sharded_state_dict(), str(path / "dist"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointMismatchError(f"loading {path} left parameters unset: missing {missing}, "
                                      f"unexpected {unexpected}")
    log.info("loaded model weights from Megatron checkpoint %s", path)
    return path
