"""Size-capped safetensors shards and their ``model.safetensors.index.json``, tensor by tensor.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once (up to the shard
size, 5 GB by default). A safetensors file is an 8-byte header length, a JSON header giving each
tensor's dtype, shape and byte range, then the raw bytes; knowing every name, shape and dtype in
advance (the converter does, from the checkpoint's metadata) the header can be written first and
each tensor's bytes streamed after it, so memory holds one tensor.

    plan = [TensorSpec("model.norm.weight", (4096,), torch.bfloat16), ...]
    with ShardedSafetensorsWriter(out_dir, plan, max_shard_bytes=parse_size("5GB")) as w:
        for name, tensor in produce():        # in the order of ``plan``
            w.write(name, tensor)
    # out_dir/model-00001-of-0000N.safetensors ..., out_dir/model.safetensors.index.json

Files are named as transformers names them; a tensor larger than the cap gets a file of its own.
Each file is on disk (fsync) when it is closed, so that a directory renamed into place afterwards is
complete after a crash. The data are flushed to disk in the background as they are written (every
``FLUSH_EVERY_BYTES``), so closing a file waits for its last stretch only, not for all of it.
"""
from __future__ import annotations

import errno
import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from megavrl.checkpoint.tensor_spec import TensorSpec

INDEX_FILE = "model.safetensors.index.json"
FLUSH_EVERY_BYTES = 256 * 2**20
_COPY_FILE_RANGE = [hasattr(os, "copy_file_range")]  # cleared when the kernel refuses it

_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """"5GB" -> 5_000_000_000 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary, as transformers reads them)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}: write e.g. 5GB, 500MB or 2GiB")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def plan_shards(tensors: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in order: start a new file when the next tensor would overflow the cap."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def _header(shard: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict = {"__metadata__": metadata}
    offset = 0
    for t in shard:
        if t.dtype not in _DTYPE_CODES:
            raise ValueError(f"{t.name}: dtype {t.dtype} cannot be stored in safetensors")
        header[t.name] = {"dtype": _DTYPE_CODES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


class ShardedSafetensorsWriter:
    """Write ``plan`` (names, shapes, dtypes, in order) into size-capped safetensors files.

    ``write`` must be called once per planned tensor, in plan order; ``close`` (or leaving the
    ``with`` block without an exception) checks that every tensor came and writes the index.
    """

    def __init__(self, out_dir: str | os.PathLike, plan: Sequence[TensorSpec], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None):
        names = [t.name for t in plan]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the safetensors plan")
        self.out_dir = Path(out_dir)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = plan_shards(plan, max_shard_bytes)
        n = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._file_index = -1
        self._stream = None
        self.total_bytes = sum(t.nbytes for t in plan)
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-flush")
        self._flush: Future | None = None  # the background fsync in flight, if any
        self._unflushed = 0

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
            return
        if self._flush is not None:
            self._flush.exception()  # wait; the error being raised matters more
        if self._stream is not None:
            self._stream.close()
        self._flusher.shutdown()

    def write(self, name: str, tensor: torch.Tensor, source: tuple[int, int] | None = None) -> None:
        """Append ``tensor`` (the next planned one). ``source``: (file descriptor, byte offset) of a
        file that holds exactly the tensor's bytes there (e.g. the checkpoint the tensor was mapped
        from): they are then copied file to file in the kernel (``os.copy_file_range``), without
        passing through this process, which is several times faster than writing them out of memory."""
        if self._next >= len(self._order):
            raise ValueError(f"{name}: every planned tensor was already written")
        index, planned = self._order[self._next]
        if name != planned.name:
            raise ValueError(f"tensors must come in plan order: got {name!r}, expected {planned.name!r}")
        if tuple(tensor.shape) != planned.shape or tensor.dtype != planned.dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, "
                             f"planned {planned.shape} {planned.dtype}")
        if index != self._file_index:
            self._open(index)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        copied = self._copy_from(*source, data.numel()) if source is not None else 0
        if copied < data.numel():
            self._stream.write(memoryview(data.numpy())[copied:])
        self._next += 1
        self._unflushed += data.numel()
        if self._unflushed >= FLUSH_EVERY_BYTES and (self._flush is None or self._flush.done()):
            self._wait_flush()
            self._stream.flush()
            self._flush = self._flusher.submit(os.fsync, self._stream.fileno())
            self._unflushed = 0

    def _copy_from(self, fd: int, offset: int, nbytes: int) -> int:
        """Copy ``nbytes`` at ``offset`` of file ``fd`` to the end of the open file in the kernel;
        returns how many were copied (fewer where the system or filesystem cannot: the caller writes
        the rest)."""
        if not _COPY_FILE_RANGE[0]:
            return 0
        self._stream.flush()
        out, done = self._stream.fileno(), 0
        while done < nbytes:
            try:
                n = os.copy_file_range(fd, out, nbytes - done, offset + done)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                    raise
                _COPY_FILE_RANGE[0] = done > 0  # not supported here: stop trying (in this process)
                break
            if n == 0:  # the source ends early: let the caller write the rest from memory
                break
            done += n
        self._stream.seek(0, os.SEEK_END)  # the buffered stream learns where the kernel left the file
        return done

    def _wait_flush(self) -> None:
        if self._flush is not None:
            flush, self._flush = self._flush, None
            flush.result()  # an I/O error of the background flush surfaces here

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._wait_flush()
            self._stream.flush()
            os.fsync(self._stream.fileno())  # on disk before the directory is renamed into place
            self._stream.close()
            self._stream = None
            self._unflushed = 0

    def _open(self, index: int) -> None:
        self._close_stream()
        self._file_index = index
        self._stream = open(self.out_dir / self.files[index], "wb")
        self._stream.write(_header(self.shards[index], self.metadata))

    def close(self) -> None:
        if self._next != len(self._order):
            missing = [t.name for _, t in self._order[self._next:]]
            raise ValueError(f"{len(missing)} planned tensors were never written: {missing[:5]}")
        self._close_stream()
        self._flusher.shutdown()
        weight_map = {t.name: self.files[i] for i, t in self._order}
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
