"""Sending side of the weight sync: a stream of full HF-named tensors -> buckets -> vLLM workers.

The trainer yields ``(hf_name, tensor)`` pairs (Qwen's published names ``visual.*``, ``model.*``,
``lm_head.*``, or transformers-5 names ``model.visual.*``, ``model.language_model.*``; vLLM's
Qwen2.5-VL ``hf_to_vllm_mapper`` accepts both). They are cast to the engine's dtype, packed into
buckets of about ``bucket_bytes`` and moved one bucket at a time, so peak extra memory is one
bucket whatever the model size:
- ``shm`` (CPU, and the tested fallback on GPU): the bucket is written as a safetensors file on
  /dev/shm (a RAM file system) and the workers read it; ``collective_rpc`` itself cannot carry
  tensors (its serializer turns them into memoryviews that fail to pickle), only the path.
- ``cuda_ipc`` (GPU, colocated): the bucket is packed into one CUDA buffer whose IPC handle goes to
  the workers, which load straight from it. Not testable on the project's CPU machines.
The worker side is ``megavrl.rollout.worker_extension``.
"""
from __future__ import annotations

import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import ContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megavrl.checkpoint.mapping import HF_OUTPUT, HF_PREFIXES
from megavrl.log import get_logger

log = get_logger(__name__)


@dataclass
class SyncStats:
    """What one weight update moved and how long it took (wall seconds, driver side)."""

    num_tensors: int = 0
    num_buckets: int = 0
    bytes_moved: int = 0
    seconds: float = 0.0
    transport: str = ""
    skipped: list[str] = field(default_factory=list)  # names dropped on purpose (a tied lm_head)
    params_not_updated: list[str] = field(default_factory=list)  # vLLM parameters no tensor reached

    @property
    def mb_per_s(self) -> float:
        return self.bytes_moved / 1e6 / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict:
        return {**asdict(self), "mb_per_s": self.mb_per_s}


SYNC_DIR_PREFIX = "megavrl-wsync-"
"""Bucket directories are named ``megavrl-wsync-<pid>-<random>``: the pid tells a later run
whether the writer is gone (:func:`megavrl.rollout.shm.remove_stale_shm`)."""


def check_hf_name(name: str) -> None:
    """Raise if ``name`` is not in a Qwen2.5-VL HF checkpoint layout."""
    if not name.startswith(HF_PREFIXES):
        raise ValueError(f"weight {name!r} is not a Qwen2.5-VL HF name: expected a name starting with one of "
                         f"{', '.join(HF_PREFIXES)} (published layout visual.*/model.*/lm_head.* or "
                         "transformers-5 layout model.visual.*/model.language_model.*/lm_head.*)")


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of tensors into consecutive buckets of at most ``bucket_bytes``.

    Order is kept. A tensor larger than ``bucket_bytes`` travels alone in its own bucket.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be positive, got {bucket_bytes} bytes")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def prepare_stream(named_tensors: Iterable[tuple[str, torch.Tensor]], *, dtype: torch.dtype,
                   tied_embeddings: bool, skipped: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Check names, cast to the engine's dtype, and drop ``lm_head.weight`` of a tied model.

    With tied embeddings vLLM's lm_head *is* the embedding matrix; its loader skips lm_head.weight
    and raises if the embedding is not in the same load call, which buckets cannot promise.
    """
    for name, tensor in named_tensors:
        check_hf_name(name)
        if tied_embeddings and name == HF_OUTPUT:
            skipped.append(name)
            continue
        yield name, tensor.detach().to(dtype=dtype).contiguous()


def _send_shm(llm, bucket: list[tuple[str, torch.Tensor]], directory: Path, index: int) -> int:
    from safetensors.torch import save_file

    path = directory / f"bucket-{index:05d}.safetensors"
    tensors = {name: t if t.device.type == "cpu" else t.cpu() for name, t in bucket}
    save_file(tensors, str(path))
    try:
        llm.collective_rpc("megavrl_load_bucket", args=(str(path), [name for name, _ in bucket]))
    finally:
        path.unlink(missing_ok=True)
    return sum(t.numel() * t.element_size() for t in tensors.values())


TensorSpec = tuple  # (name, dtype name, shape, byte offset, byte count)


def pack_bucket(bucket: list[tuple[str, torch.Tensor]], device: torch.device | str,
                ) -> tuple[torch.Tensor, list[TensorSpec]]:
    """Copy a bucket into one uint8 buffer on ``device``; every tensor starts 256-byte aligned."""
    specs, offset = [], 0
    for name, t in bucket:
        nbytes = t.numel() * t.element_size()
        specs.append((name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, nbytes))
        offset += (nbytes + 255) // 256 * 256
    buffer = torch.empty(offset, dtype=torch.uint8, device=device)
    for (_, t), (_, _, _, start, nbytes) in zip(bucket, specs):
        buffer[start:start + nbytes].copy_(t.to(device).contiguous().reshape(-1).view(torch.uint8))
    return buffer, specs


def unpack_bucket(buffer: torch.Tensor, specs: list[TensorSpec]) -> list[tuple[str, torch.Tensor]]:
    """Views into ``buffer`` of the tensors ``pack_bucket`` wrote (no copy)."""
    return [(name, buffer[offset:offset + nbytes].view(getattr(torch, dtype)).view(shape))
            for name, dtype, shape, offset, nbytes in specs]


def _send_cuda_ipc(llm, bucket: list[tuple[str, torch.Tensor]]) -> int:
    # UNTESTED on the project's machines (the CPU ones have no GPU, the GPU one has no vLLM); the
    # packing is tested on CPU and the session protocol is the tested shm one. One CUDA buffer per
    # bucket, shared by IPC with the colocated workers, released when the (synchronous) call returns.
    from torch.multiprocessing.reductions import reduce_tensor

    device = next(t.device for _, t in bucket if t.is_cuda)
    buffer, specs = pack_bucket(bucket, device)
    torch.cuda.synchronize(device)
    uuid = str(torch.cuda.get_device_properties(device).uuid)
    _, args = reduce_tensor(buffer)
    llm.collective_rpc("megavrl_load_ipc_bucket", args=(pickle.dumps({uuid: args}), specs))
    del buffer
    return sum(s[4] for s in specs)


def push_weights(llm, named_tensors: Iterable[tuple[str, torch.Tensor]], *, bucket_bytes: int,
                 dtype: torch.dtype, tied_embeddings: bool, transport: str = "auto",
                 shm_dir: str = "/dev/shm", rpc_guard: Callable[[], ContextManager] | None = None) -> SyncStats:
    """Stream ``named_tensors`` into the workers of ``llm`` in buckets; returns ``SyncStats``.

    transport: "shm", "cuda_ipc", or "auto" (cuda_ipc when the first tensor is on a GPU).
    rpc_guard: a context manager factory entered around each call into the engine, and only
        there (never while ``named_tensors`` is advanced, which may run collectives): the trainer's
        stop-signal section, which ends an engine call that a killed engine would never answer.
        When it raises a BaseException that is not an Exception, the session is not closed (the
        process is stopping; the engine may be gone).
    Does not reset vLLM's caches: the engine does that after a successful update.
    """
    guard = rpc_guard or nullcontext
    stats = SyncStats()
    start = time.perf_counter()
    stream = prepare_stream(named_tensors, dtype=dtype, tied_embeddings=tied_embeddings, skipped=stats.skipped)
    directory: Path | None = None
    with guard():
        llm.collective_rpc("megavrl_begin_weight_update")
    stopping = False
    try:
        for index, bucket in enumerate(iter_buckets(stream, bucket_bytes)):
            if not stats.transport:
                on_gpu = bucket[0][1].is_cuda
                stats.transport = ("cuda_ipc" if on_gpu else "shm") if transport == "auto" else transport
                if stats.transport not in ("shm", "cuda_ipc"):
                    raise ValueError(f"unknown weight sync transport {transport!r}; use auto, shm or cuda_ipc")
                if stats.transport == "shm":
                    directory = Path(tempfile.mkdtemp(prefix=f"{SYNC_DIR_PREFIX}{os.getpid()}-", dir=shm_dir))
            with guard():
                if stats.transport == "shm":
                    stats.bytes_moved += _send_shm(llm, bucket, directory, index)
                else:
                    stats.bytes_moved += _send_cuda_ipc(llm, bucket)
            stats.num_buckets += 1
            stats.num_tensors += len(bucket)
    except BaseException as e:
        stopping = not isinstance(e, Exception)
        log.log(logging.INFO if stopping else logging.ERROR, "weight update %s after %d buckets; vLLM now holds a "
                "mix of old and new weights: retry the update before sampling",
                "interrupted" if stopping else "failed", stats.num_buckets)
        raise
    finally:
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        # Close the session (it puts back the tensors of layers that got nothing), unless stopping.
        if not stopping:
            with guard():
                not_updated = llm.collective_rpc("megavrl_finish_weight_update")[0]
    stats.params_not_updated = list(not_updated)
    stats.seconds = time.perf_counter() - start
    return stats
