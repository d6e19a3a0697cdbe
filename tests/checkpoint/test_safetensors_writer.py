"""ShardedSafetensorsWriter's fast paths give the same files as plain writes: bytes copied file to
file in the kernel (with and without the system's support), and data flushed in the background."""
import errno
import os
import threading

import pytest
import torch

from megavrl.checkpoint import safetensors_writer
from megavrl.checkpoint.safetensors_writer import ShardedSafetensorsWriter
from megavrl.checkpoint.tensor_spec import TensorSpec

TENSORS = {"a": torch.randn(300, 40), "b": torch.arange(5000, dtype=torch.int64),
           "c": torch.randn(100, 64).to(torch.bfloat16), "d": torch.randn(7)}


def write(out, tensors, sources=None, max_shard_bytes=60_000):
    out.mkdir()
    plan = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    with ShardedSafetensorsWriter(out, plan, max_shard_bytes=max_shard_bytes) as w:
        for k, v in tensors.items():
            w.write(k, v, source=(sources or {}).get(k))
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def blob(tmp_path):
    """Every tensor's bytes in one file, after some junk; the (fd, offset) of each."""
    path = tmp_path / "blob.bin"
    spans, data = {}, bytearray(b"junk" * 100)
    for k, v in TENSORS.items():
        spans[k] = len(data)
        data += v.contiguous().view(torch.uint8).numpy().tobytes()
    path.write_bytes(bytes(data))
    fd = os.open(path, os.O_RDONLY)
    yield {k: (fd, off) for k, off in spans.items()}
    os.close(fd)


def test_copied_from_a_file_equals_written_from_memory(tmp_path, blob):
    plain = write(tmp_path / "plain", TENSORS)
    assert len([n for n in plain if n.endswith(".safetensors")]) == 2  # several files
    assert write(tmp_path / "copied", TENSORS, blob) == plain


def test_without_copy_file_range_the_bytes_are_written(tmp_path, blob, monkeypatch):
    plain = write(tmp_path / "plain", TENSORS)
    monkeypatch.setattr(safetensors_writer, "_COPY_FILE_RANGE", [False])
    assert write(tmp_path / "unsupported", TENSORS, blob) == plain


def test_a_copy_the_kernel_refuses_half_way_is_completed_from_memory(tmp_path, blob, monkeypatch):
    plain = write(tmp_path / "plain", TENSORS)
    real = os.copy_file_range
    calls = []

    def refuses_after_a_bit(src, dst, count, offset_src=None, *args):
        calls.append(count)
        if len(calls) % 2 == 0:
            raise OSError(errno.EXDEV, "cross-device copy")
        return real(src, dst, min(count, 1000), offset_src)

    monkeypatch.setattr(safetensors_writer, "_COPY_FILE_RANGE", [True])
    monkeypatch.setattr(os, "copy_file_range", refuses_after_a_bit)
    assert write(tmp_path / "partial", TENSORS, blob) == plain
    assert calls  # the copy was tried


def test_background_flushes_and_their_errors(tmp_path, monkeypatch):
    plain = write(tmp_path / "plain", TENSORS)
    monkeypatch.setattr(safetensors_writer, "FLUSH_EVERY_BYTES", 10_000)
    real_fsync, threads = os.fsync, []

    def fsync(fd):
        threads.append(threading.current_thread().name)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert write(tmp_path / "flushed", TENSORS) == plain
    assert any(n.startswith("safetensors-flush") for n in threads)  # flushed while writing
    assert "MainThread" in threads  # and each file once more when it closes

    def failing(fd):
        if threading.current_thread().name.startswith("safetensors-flush"):
            raise OSError(errno.EIO, "disk gone")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="disk gone"):
        write(tmp_path / "failed", TENSORS)
