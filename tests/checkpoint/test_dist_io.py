"""DistCheckpointReader's mapped reads: the same tensors as torch.load, no copy, and file spans
that point at exactly a tensor's bytes (what the exporter copies file to file)."""
import os

import pytest
import torch

from megavrl.checkpoint.dist_io import DistCheckpointReader

TENSORS = {
    "f32": torch.randn(64, 33),
    "bf16": torch.randn(128, 16).to(torch.bfloat16),
    "i64": torch.arange(1000, dtype=torch.int64),
    "scalar": torch.tensor(3.5),
    "empty": torch.empty(0, 4),
}


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory):
    import torch.distributed.checkpoint as dcp

    path = tmp_path_factory.mktemp("dcp") / "dist"
    dcp.save(dict(TENSORS), checkpoint_id=str(path), no_dist=True)  # torch's own writer
    return path


def test_mapped_reads_equal_torch_load(dist_dir):
    with DistCheckpointReader(dist_dir) as reader:
        for key, expected in TENSORS.items():
            got = reader.read(key)
            assert got.dtype == expected.dtype and got.shape == expected.shape, key
            assert torch.equal(got, expected), key
        box = reader.read("f32", (10, 3), (5, 30))  # a box inside one chunk: assembled, a copy
        assert torch.equal(box, TENSORS["f32"][10:15, 3:33])


def test_changing_a_read_tensor_leaves_the_checkpoint_alone(dist_dir):
    """The mapping is private (copy-on-write): a caller writing into a tensor cannot damage the file."""
    shard = next(dist_dir.glob("*.distcp"))
    before = shard.read_bytes()
    with DistCheckpointReader(dist_dir) as reader:
        t = reader.read("f32")
        t.add_(1.0)
    assert shard.read_bytes() == before
    with DistCheckpointReader(dist_dir) as reader:
        assert torch.equal(reader.read("f32"), TENSORS["f32"])


def test_file_span_points_at_exactly_the_tensors_bytes(dist_dir):
    with DistCheckpointReader(dist_dir) as reader:
        whole = reader.read("bf16")
        rows = whole[7:90]  # a contiguous view: its span starts 7 rows in
        for t in (whole, rows):
            fd, offset = reader.file_span(t)
            assert os.pread(fd, t.nbytes, offset) == t.contiguous().view(torch.uint8).numpy().tobytes()
        assert reader.file_span(whole.t()) is None  # not contiguous
        assert reader.file_span(whole.clone()) is None  # not in the checkpoint
        assert reader.file_span(whole.float()) is None  # converted: new memory
        assert reader.file_span(torch.randn(3)) is None
        assert reader.file_span(reader.read("empty")) is None
