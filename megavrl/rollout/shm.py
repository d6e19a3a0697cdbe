"""Shared-memory debris of killed runs: removed when the next run starts.

A run killed with -9 cannot clean up after itself. Two kinds of entries stay in ``/dev/shm``:
- megavrl's weight-sync bucket directories, ``megavrl-wsync-<pid>-*``: stale when that pid is gone;
- the segments of vLLM's message queues (Python ``SharedMemory``, ``psm_*``) whose resource tracker
  died with the job: stale when no live process maps them and they are older than ``min_age_s``
  (a segment that another job is just creating is young, and one that a job uses is mapped).
Only entries owned by this user are considered.
"""
from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from megavrl.log import get_logger
from megavrl.rollout.weight_sync import SYNC_DIR_PREFIX

log = get_logger(__name__)

_SYNC_DIR = re.compile(rf"^{re.escape(SYNC_DIR_PREFIX)}(\d+)-")
_PY_SEGMENT = re.compile(r"^psm_[0-9a-f]+$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def mapped_shm_files() -> set[str]:
    """Names of /dev/shm files that some live process has mapped (from /proc/*/maps)."""
    names: set[str] = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        for line in text.splitlines():
            at = line.find("/dev/shm/")
            if at >= 0:
                names.add(line[at + len("/dev/shm/"):].split(" ")[0])
    return names


def remove_stale_shm(shm_dir: str | os.PathLike = "/dev/shm", min_age_s: float = 60.0) -> list[str]:
    """Remove the stale entries described above; returns their names."""
    root = Path(shm_dir)
    if not root.is_dir():
        return []
    uid, now = os.getuid(), time.time()
    removed, mapped = [], None
    for entry in root.iterdir():
        try:
            st = entry.lstat()
        except OSError:
            continue
        if st.st_uid != uid:
            continue
        m = _SYNC_DIR.match(entry.name)
        if m and entry.is_dir() and not _alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
        elif _PY_SEGMENT.match(entry.name) and now - st.st_mtime > min_age_s:
            mapped = mapped_shm_files() if mapped is None else mapped
            if entry.name not in mapped:
                try:
                    entry.unlink()
                    removed.append(entry.name)
                except OSError:
                    pass
    if removed:
        log.info("removed %d shared-memory entries left in %s by killed runs", len(removed), root)
    return removed
