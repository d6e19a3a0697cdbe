"""Shared-memory debris of killed runs is removed at the next start; nothing alive is touched."""
import mmap
import os
import subprocess
import sys
import time

from megavrl.rollout.shm import mapped_shm_files, remove_stale_shm


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_sync_dirs_and_orphaned_segments_are_removed(tmp_path):
    dead, alive = _dead_pid(), os.getpid()
    (tmp_path / f"megavrl-wsync-{dead}-abc").mkdir()
    (tmp_path / f"megavrl-wsync-{dead}-abc" / "bucket-00000.safetensors").write_bytes(b"x" * 10)
    (tmp_path / f"megavrl-wsync-{alive}-def").mkdir()  # a live run's bucket directory
    old = time.time() - 3600
    for name in ("psm_0a1b", "psm_0c0d", "other_file"):
        (tmp_path / name).write_bytes(b"\0" * 4096)
    os.utime(tmp_path / "psm_0a1b", (old, old))
    os.utime(tmp_path / "other_file", (old, old))
    removed = remove_stale_shm(tmp_path, min_age_s=60)
    assert sorted(removed) == sorted([f"megavrl-wsync-{dead}-abc", "psm_0a1b"])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([f"megavrl-wsync-{alive}-def", "other_file", "psm_0c0d"])  # psm_0c0d: too young


def test_a_mapped_segment_is_kept():
    path = f"/dev/shm/psm_{os.getpid():x}beef"
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    try:
        old = time.time() - 3600
        os.utime(path, (old, old))
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 4096):
            assert os.path.basename(path) in mapped_shm_files()
            assert os.path.basename(path) not in remove_stale_shm("/dev/shm", min_age_s=60)
            assert os.path.exists(path)
    finally:
        if os.path.exists(path):
            os.unlink(path)
