"""Megatron-Core distributed checkpoints (``torch_dist`` format), one tensor in memory at a time.

Megatron's own writer (``dist_checkpointing.save`` with its default strategy) first copies every
tensor of the rank into a buffer, then writes; its reader materialises whole sharded state dicts.
For conversion, whose point is to move more weights than fit in memory, this module does both
directions tensor by tensor while reading and writing exactly Megatron's format:

Writing (:class:`StreamingSaveStrategy`): a ``SaveShardedStrategy`` handed to Megatron's own
``dist_checkpointing.save(sharded_state_dict, dir, sharded_strategy=...)``. Megatron applies the
sharded-tensor factories, validates that the shards of all ranks tile every tensor, and writes
``common.pt`` and ``metadata.json``; the strategy writes the tensor files. The sharded state
dict may hold *meta* tensors (a model built under ``torch.device("meta")`` costs no memory):
each shard's data is asked of ``materialise(path, sharded_tensor)`` just before it is written,
written with ``torch.save`` at the file offset recorded in the ``.metadata`` (as
``torch.distributed.checkpoint``'s ``FileSystemWriter`` does), and dropped.

Reading (:class:`DistCheckpointReader`): any box of any tensor, e.g. one layer of a stacked
``decoder.layers.*`` tensor, assembled from the chunks that overlap it, whatever TP/PP wrote
them. The ``.metadata`` file is a pickle: it is read with an unpickler that admits only the
checkpoint metadata classes, and tensor chunks as ``torch.load(weights_only=True)`` reads them
(torch's zip reader and weights-only unpickler), so a checkpoint cannot run code. A chunk's data are
not copied: its tensor views a private memory map of the file, and :meth:`DistCheckpointReader.file_span`
says where a tensor's bytes lie, for a writer to copy them file to file.

On-disk layout of a ``dist/`` directory (Megatron's torch_dist, version 1)::

    metadata.json        {"sharded_backend": "torch_dist", "sharded_backend_version": 1, ...}
    common.pt            non-sharded state (empty for a model), torch.save
    .metadata            torch.distributed.checkpoint Metadata: global shape, dtype and chunks of
                         every key, and the (file, offset, length) of every chunk
    __<rank>_0.distcp    the rank's chunks, each a torch.save'd tensor at its offset
"""
from __future__ import annotations

import contextlib
import io
import json
import mmap
import os
import pickle
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy

from megavrl.checkpoint.tensor_spec import TensorSpec
from megavrl.log import get_logger

log = get_logger(__name__)

SHARDED_BACKEND = ("torch_dist", 1)

# materialise(path, sharded_tensor) -> the shard's data (local_shape, the checkpoint dtype).
# path: the keys leading to the sharded tensor in the (factory-applied) sharded state dict.
Materialise = Callable[[tuple, Any], torch.Tensor]


def walk(tree, path: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """(path, leaf) of a nested dict/list, in order."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from walk(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from walk(v, path + (i,))
    else:
        yield path, tree


def _chunk_sizes(sh_ten) -> torch.Size:
    """A Megatron ShardedTensor's chunk in the checkpoint: its local shape behind one axis of
    size 1 per prepended axis (stacked layers), as Megatron's torch_dist strategy stores it."""
    return torch.Size((1,) * sh_ten.prepend_axis_num + tuple(sh_ten.local_shape))


# --------------------------------------------------------------------------------------- writing


class StreamingSaveStrategy(SaveShardedStrategy):
    """A Megatron ``SaveShardedStrategy`` (torch_dist, version 1) that materialises each shard on
    demand and keeps none. Pass it to ``dist_checkpointing.save(..., sharded_strategy=...)``.

    materialise: see :data:`Materialise`. progress: a tqdm-like bar; its ``total`` is set to
    this rank's bytes and ``update(n)`` called per written shard.
    Flattened (distributed-optimizer) shards are not supported: this is for model weights.
    """

    def __init__(self, materialise: Materialise, progress=None):
        super().__init__(*SHARDED_BACKEND)
        self.materialise = materialise
        self.progress = progress
        self.bytes_written = 0
        self.bytes_planned = 0

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        import torch.distributed.checkpoint as dcp
        from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, is_main_replica
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        items: list = []
        tensors: dict = {}  # MetadataIndex -> (path, sharded tensor)
        objects: dict[str, list] = {}  # unique key -> data of the rank's ShardedObjects of that key
        for path, leaf in walk(sharded_state_dict):
            if not is_main_replica(leaf.replica_id):
                continue  # another rank (TP/DP replica, tied copy) writes it
            if isinstance(leaf, ShardedTensor):
                if leaf.flattened_range is not None:
                    raise NotImplementedError(f"{leaf.key}: flattened shards are not supported by the streaming writer")
                index = MetadataIndex(leaf.key, torch.Size(leaf.global_offset))
                items.append(WriteItem(
                    index=index, type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(leaf.global_offset), sizes=_chunk_sizes(leaf)),
                        properties=TensorProperties(dtype=leaf.dtype), size=torch.Size(leaf.global_shape))))
                tensors[index] = (path, leaf)
            elif isinstance(leaf, ShardedObject):
                objects.setdefault(leaf.unique_key, []).append(leaf.data)
            else:
                raise TypeError(f"unexpected {type(leaf).__name__} at {path} in a sharded state dict")
        for key, data in objects.items():  # Megatron stores a rank's objects of one key as a list
            items.append(WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO))
        self.bytes_planned = sum(leaf.data.element_size() * leaf.data.numel() for _, leaf in tensors.values())
        if self.progress is not None:
            self.progress.total = self.bytes_planned
            self.progress.refresh()

        def resolve(item):
            if item.type == WriteItemType.BYTE_IO:
                buf = io.BytesIO()
                torch.save(objects[item.index.fqn], buf)
                buf.seek(0)
                return buf
            path, sh_ten = tensors[item.index]
            data = self.materialise(path, sh_ten)
            if tuple(data.shape) != tuple(sh_ten.local_shape) or data.dtype != sh_ten.dtype:
                raise ValueError(f"{sh_ten.key} at offset {tuple(sh_ten.global_offset)}: materialised "
                                 f"{tuple(data.shape)} {data.dtype}, expected {tuple(sh_ten.local_shape)} "
                                 f"{sh_ten.dtype}")
            return data.reshape(_chunk_sizes(sh_ten))

        dcp.save({}, storage_writer=_streaming_writer(checkpoint_dir, self._count),
                 planner=_streaming_planner(items, resolve))

    def _count(self, nbytes: int) -> None:
        self.bytes_written += nbytes
        if self.progress is not None:
            self.progress.update(nbytes)


def _streaming_planner(items: list, resolve: Callable):
    """A DCP SavePlanner whose local plan is ``items`` and whose data comes from ``resolve``.
    The global plan and the ``.metadata`` come from torch's default planner (with its checks
    that the chunks of every tensor tile it)."""
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import SavePlan

    class Planner(DefaultSavePlanner):
        def __init__(self):
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def create_local_plan(self) -> SavePlan:
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, write_item):
            return resolve(write_item)

    return Planner()


@contextlib.contextmanager
def _no_crc32():
    """torch.save without the zip CRC-32 of every record: computing it runs at ~300 MB/s, ~15x
    slower than the write itself; torch.load does not need it (safetensors has none either)."""
    from torch.utils.serialization import config

    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


def _streaming_writer(path, on_write: Callable[[int], None]):
    """torch's FileSystemWriter, but writing item after item and holding none: its own
    ``write_data`` keeps the last tensor written under every key until the file is closed (for
    its safetensors mode), i.e. a whole layer and the embeddings at once."""
    from torch.distributed.checkpoint.filesystem import FileSystemWriter, _StorageInfo
    from torch.distributed.checkpoint.planner import WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult

    class Writer(FileSystemWriter):
        def write_data(self, plan, planner):
            file_name = f"{plan.storage_data.prefix}0.distcp"
            results = []
            with _no_crc32(), open(os.path.join(self.path, file_name), "wb") as stream:
                for item in plan.items:
                    data = planner.resolve_data(item)
                    offset = stream.tell()
                    if item.type == WriteItemType.BYTE_IO:
                        stream.write(data.getbuffer())
                    else:
                        data = data.detach().cpu()
                        if data.untyped_storage().nbytes() != data.nbytes or not data.is_contiguous():
                            data = data.clone(memory_format=torch.contiguous_format)  # torch.save writes whole storages
                        torch.save(data, stream)
                        on_write(data.nbytes)
                    del data
                    length = stream.tell() - offset
                    results.append(WriteResult(index=item.index, size_in_bytes=length,
                                               storage_data=_StorageInfo(file_name, offset, length)))
                stream.flush()
                if self.sync_files:
                    os.fsync(stream.fileno())
            fut: torch.futures.Future = torch.futures.Future()
            fut.set_result(results)
            return fut

    return Writer(str(path), single_file_per_rank=True, sync_files=True, thread_count=1, per_thread_copy_ahead=0,
                  overwrite=True)


# --------------------------------------------------------------------------------------- reading


class _FileWindow(io.RawIOBase):
    """Bytes [offset, offset + length) of an open binary file, as a seekable read-only file."""

    def __init__(self, f, offset: int, length: int):
        super().__init__()
        self._f, self._start, self._length, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(buffer).cast("B")[:n])
        self._pos += got
        return got

class _MappedRecord:
    """A ``torch.save`` record of a checkpoint file, memory-mapped (private, copy-on-write)."""

    def __init__(self, f, offset: int, length: int):
        self.fd = f.fileno()
        self.reader = torch._C.PyTorchFileReader(_FileWindow(f, offset, length))
        self.start = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap offsets are page-aligned
        self.offset = offset
        self.map = mmap.mmap(self.fd, offset + length - self.start, access=mmap.ACCESS_COPY, offset=self.start)
        self.base = 0  # the mapping's address, known once a storage views it

    def load(self) -> torch.Tensor:
        """The record's tensor, its storage a view of the mapping: no copy, no heap memory.

        ``torch.load`` reads the record's bytes into a fresh buffer (a copy, and the caller usually
        copies again); here the zip directory and the pickle are parsed as ``torch.load(weights_only=
        True)`` parses them (torch's own zip reader and weights-only unpickler) and each storage
        views the mapped bytes. The mapping lives as long as the tensor or a view of it does."""
        from torch import _weights_only_unpickler

        storages = {}

        def persistent_load(saved_id):
            kind, storage_type, key, _location, numel = saved_id
            if kind != "storage":
                raise pickle.UnpicklingError(f"unexpected persistent id {kind!r} in a tensor record")
            if key not in storages:
                dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
                nbytes = numel * torch._utils._element_size(dtype)
                at = self.offset - self.start + self.reader.get_record_offset(f"data/{key}")
                if at + nbytes > len(self.map):
                    raise EOFError(f"storage {key} ends past the record ({at + nbytes} > {len(self.map)} bytes)")
                data = torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=at) if nbytes else \
                    torch.empty(0, dtype=torch.uint8)
                if nbytes:
                    self.base = data.data_ptr() - at
                storages[key] = torch.storage.TypedStorage(wrap_storage=data.untyped_storage(), dtype=dtype,
                                                           _internal=True)
            return storages[key]

        unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(self.reader.get_record("data.pkl")),
                                                      encoding="utf-8")
        unpickler.persistent_load = persistent_load
        tensor = unpickler.load()
        if not isinstance(tensor, torch.Tensor):
            raise pickle.UnpicklingError(f"a tensor record holds a {type(tensor).__name__}, not a tensor")
        return tensor


# The classes a DCP ``.metadata`` pickle may name; anything else is refused.
_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
    # Megatron's writer also keeps every rank's save plan in the metadata (to reuse it next save)
    ("torch.distributed.checkpoint.planner", "SavePlan"),
    ("torch.distributed.checkpoint.planner", "WriteItem"),
    ("torch.distributed.checkpoint.planner", "WriteItemType"),
    ("torch.distributed.checkpoint.planner", "TensorWriteData"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("builtins", "slice"), ("builtins", "set"), ("builtins", "frozenset"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
}
_TORCH_ENUM_TYPES = ("dtype", "layout", "memory_format")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch":  # torch.float32, torch.strided, torch.contiguous_format ...
            value = getattr(torch, name, None)
            if type(value).__name__ in _TORCH_ENUM_TYPES:
                return value
        raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}, which is not a checkpoint "
                                     "metadata class: refusing to load it (it could run arbitrary code)")


def load_dcp_metadata(dist_dir: str | os.PathLike):
    """The ``torch.distributed.checkpoint`` Metadata of a checkpoint directory, unpickled with an
    allow-list of metadata classes."""
    from megavrl.errors import UserError, unreadable

    path = Path(dist_dir) / ".metadata"
    if not path.is_file():
        raise FileNotFoundError(f"{dist_dir} is not a distributed checkpoint: it has no .metadata file")
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except OSError as e:
        raise unreadable(path, e, "checkpoint metadata") from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError) as e:
        # A truncated pickle ends in EOFError or "pickle data was truncated", a corrupt one in any of
        # these; the unpickler's own refusal of a class (an unsafe file) stays an UnpicklingError.
        if isinstance(e, pickle.UnpicklingError) and not _is_corrupt_record(e):
            raise
        raise UserError(f"checkpoint metadata {str(path)!r} is truncated or corrupt ({type(e).__name__}: {e}): "
                        f"the checkpoint {str(Path(dist_dir).parent)!r} is damaged; use another one") from None


def _is_corrupt_record(exc: BaseException) -> bool:
    """torch.load's failures on damaged bytes (not, e.g., running out of memory)."""
    if isinstance(exc, EOFError):
        return True
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        return "truncated" in text or "invalid load key" in text or "could not find MARK" in text
    return isinstance(exc, RuntimeError) and ("PytorchStreamReader" in text or "zip archive" in text)


def check_chunk_files(dist_dir: str | os.PathLike, metadata) -> None:
    """Raise a :class:`megavrl.errors.UserError` naming the shard file when a ``.distcp`` file the
    metadata points into is missing or shorter than the bytes recorded for it (a copy or a save
    cut short). Reading such a shard would fail later with a bare EOFError and no path."""
    from megavrl.errors import UserError

    dist_dir = Path(dist_dir)
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        path = dist_dir / name
        if not path.is_file():
            raise UserError(f"checkpoint {str(dist_dir.parent)!r}: shard file {name!r} is missing from "
                            f"{str(dist_dir)!r}: the checkpoint is incomplete; use another one")
        size = path.stat().st_size
        if size < end:
            raise UserError(f"checkpoint {str(dist_dir.parent)!r}: shard file {str(path)!r} is truncated "
                            f"({size} bytes, the metadata records data up to byte {end}): the checkpoint is "
                            f"damaged; use another one")


class DistCheckpointReader:
    """Random access to the tensors of a Megatron torch_dist checkpoint directory (its ``dist/``).

        reader = DistCheckpointReader(ckpt / "dist")
        reader.tensors["language_model.decoder.layers.mlp.linear_fc2.weight"].shape   # (layers, H, F)
        layer3 = reader.read("language_model.decoder.layers.mlp.linear_fc2.weight", (3, 0, 0), (1, H, F))

    Chunks are mapped from disk as needed (a box of a stacked layer tensor maps that layer's
    chunks only), parsed as ``torch.load(weights_only=True)`` parses them.
    """

    def __init__(self, dist_dir: str | os.PathLike):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = Path(dist_dir)
        config = self.dir / "metadata.json"
        if config.is_file():
            backend = json.loads(config.read_text()).get("sharded_backend")
            if backend != SHARDED_BACKEND[0]:
                raise ValueError(f"{self.dir} is a {backend!r} checkpoint; only Megatron's "
                                 f"{SHARDED_BACKEND[0]!r} format is supported")
        self.metadata = load_dcp_metadata(self.dir)
        check_chunk_files(self.dir, self.metadata)
        self._chunks = {}
        self.tensors: dict[str, TensorSpec] = {}
        for key, md in self.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                self.tensors[key] = TensorSpec(key, tuple(md.size), md.properties.dtype)
                self._chunks[key] = md.chunks
        self.objects = [k for k in self.metadata.state_dict_metadata if k not in self.tensors]
        self._files: dict[str, Any] = {}
        # (weak reference to the mapping, its address, its length, file descriptor, file offset of
        # its first byte) of every record mapped by read(): see file_span()
        self._mappings: list[tuple[weakref.ref, int, int, int, int]] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def load_objects(self) -> dict[str, Any]:
        """Every non-tensor entry (Megatron's ShardedObjects, e.g. layers' ``_extra_state``) loaded
        with ``torch.load(weights_only=True)``: raises if one needs arbitrary unpickling. Megatron's
        own loader unpickles them without that restriction, so :func:`check_safe_to_load` runs this
        first."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        out = {}
        for key in self.objects:
            info = self.metadata.storage_data[MetadataIndex(key)]
            with open(self.dir / info.relative_path, "rb") as f:
                f.seek(info.offset)
                blob = io.BytesIO(f.read(info.length))
            try:
                out[key] = torch.load(blob, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                if _is_corrupt_record(e):
                    raise self._corrupt(info.relative_path, key, e) from e
                raise pickle.UnpicklingError(f"{self.dir}: object {key!r} needs arbitrary unpickling, refused: {e}")
            except (EOFError, RuntimeError) as e:
                if not _is_corrupt_record(e):
                    raise
                raise self._corrupt(info.relative_path, key, e) from e
        return out

    def _corrupt(self, file_name: str, key: str, exc: BaseException):
        from megavrl.errors import UserError

        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = f"{type(exc).__name__}: {lines[-1]}" if lines else type(exc).__name__  # torch's last line is the cause
        return UserError(f"checkpoint {str(self.dir.parent)!r}: shard file {str(self.dir / file_name)!r} holds a "
                         f"corrupt record for {key!r} ({reason}): the checkpoint is damaged; use another one")

    def _load_chunk(self, key: str, offsets: Sequence[int]) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex

        info = self.metadata.storage_data[MetadataIndex(key, torch.Size(offsets))]
        if getattr(info, "transform_descriptors", None):
            raise ValueError(f"{key}: chunk stored with transforms {info.transform_descriptors}, not supported")
        f = self._files.get(info.relative_path)
        if f is None:
            f = self._files[info.relative_path] = open(self.dir / info.relative_path, "rb", buffering=0)
        try:
            record = _MappedRecord(f, info.offset, info.length)
            tensor = record.load()
            self._mappings = [m for m in self._mappings if m[0]() is not None]
            if record.base:
                self._mappings.append((weakref.ref(record.map), record.base, len(record.map), record.fd, record.start))
            return tensor
        except (EOFError, RuntimeError, pickle.UnpicklingError) as e:
            # A tensor record is plain torch.save output: failing to load it means damaged bytes.
            if isinstance(e, RuntimeError) and not _is_corrupt_record(e):
                raise
            raise self._corrupt(info.relative_path, key, e) from e

    def file_span(self, tensor: torch.Tensor) -> tuple[int, int] | None:
        """(file descriptor, byte offset) where the bytes of ``tensor`` lie in the checkpoint, if it
        is a contiguous view of a chunk returned by :meth:`read` (e.g. to copy them file to file,
        ``os.copy_file_range``); None otherwise. Valid while this reader is open."""
        if not tensor.is_contiguous() or tensor.device.type != "cpu" or tensor.numel() == 0:
            return None
        ptr = tensor.data_ptr()
        for ref, base, length, fd, file_offset in self._mappings:
            if base <= ptr and ptr + tensor.nbytes <= base + length and ref() is not None:
                return fd, file_offset + ptr - base
        return None

    def read(self, key: str, offsets: Sequence[int] | None = None, sizes: Sequence[int] | None = None,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """The box [offsets, offsets + sizes) of tensor ``key`` (default: all of it)."""
        if key not in self.tensors:
            raise KeyError(f"tensor {key!r} is not in the checkpoint {self.dir}")
        info = self.tensors[key]
        offsets = tuple(offsets) if offsets is not None else (0,) * len(info.shape)
        sizes = tuple(sizes) if sizes is not None else info.shape
        if any(o < 0 or o + s > g for o, s, g in zip(offsets, sizes, info.shape)) or len(sizes) != len(info.shape):
            raise ValueError(f"{key}: box {offsets}+{sizes} is outside its shape {info.shape}")
        chunks = [c for c in self._chunks[key]
                  if all(max(o, co) < min(o + n, co + cn) for o, n, co, cn in zip(offsets, sizes, c.offsets, c.sizes))]
        if len(chunks) == 1 and tuple(chunks[0].offsets) == offsets and tuple(chunks[0].sizes) == sizes:
            data = self._load_chunk(key, offsets)  # the box is one stored chunk: no copy
            return data if dtype is None else data.to(dtype)
        out = torch.empty(sizes, dtype=dtype or info.dtype)
        covered = 0
        for chunk in chunks:
            data = self._load_chunk(key, chunk.offsets)
            src, dst = data, out
            for dim in range(len(sizes)):
                lo = max(offsets[dim], chunk.offsets[dim])
                hi = min(offsets[dim] + sizes[dim], chunk.offsets[dim] + chunk.sizes[dim])
                src = src.narrow(dim, lo - chunk.offsets[dim], hi - lo)
                dst = dst.narrow(dim, lo - offsets[dim], hi - lo)
            dst.copy_(src)
            covered += src.numel()
            del data, src
        if covered != out.numel():
            raise ValueError(f"{key}: the checkpoint's chunks cover {covered} of the {out.numel()} elements of "
                             f"box {offsets}+{sizes}: the checkpoint is incomplete")
        return out


def check_safe_to_load(dist_dir: str | os.PathLike) -> None:
    """Raise unless ``dist_checkpointing.load`` of this directory unpickles only checkpoint
    metadata classes and weights-only objects (it unpickles ``.metadata`` and ShardedObjects
    without restriction itself)."""
    with DistCheckpointReader(dist_dir) as reader:
        reader.load_objects()
