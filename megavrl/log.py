"""One logger for the package: rank-aware, one line per record, quiet on non-zero ranks by default."""
import logging
import os
import sys

_CONFIGURED = False


def get_logger(name: str = "megavrl") -> logging.Logger:
    """Return a child of the ``megavrl`` logger, configuring the root handler once.

    Records carry the global rank when running under torchrun (``RANK`` set), so interleaved
    lines from several processes stay readable. Non-zero ranks log warnings and above only,
    unless ``MEGAVRL_LOG_ALL_RANKS=1``.
    """
    global _CONFIGURED
    if not _CONFIGURED:
        rank = os.environ.get("RANK")
        prefix = f"[rank{rank}] " if rank is not None else ""
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        from megavrl.console import NoteBeforeFirstRecord

        handler.addFilter(NoteBeforeFirstRecord())
        root = logging.getLogger("megavrl")
        root.addHandler(handler)
        quiet = rank not in (None, "0") and os.environ.get("MEGAVRL_LOG_ALL_RANKS") != "1"
        root.setLevel(logging.WARNING if quiet else logging.INFO)
        root.propagate = False
        _CONFIGURED = True
    return logging.getLogger(name if name.startswith("megavrl") else f"megavrl.{name}")
