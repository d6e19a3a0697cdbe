"""Errors that are the user's to fix, and how the ``megavrl`` command reports them.

Library code raises :class:`UserError` for bad input it can name: a file that cannot be read, a
truncated checkpoint shard, a directory that is not a model. The ``megavrl`` command prints such an
error as one line, ``megavrl <command>: error: <message>``, and exits with status 2; the full
traceback is printed too with ``megavrl --debug <command>`` or ``MEGAVRL_DEBUG=1``. Anything else
(a bug) keeps its traceback.
"""
from __future__ import annotations

import errno
import os

DEBUG_ENV = "MEGAVRL_DEBUG"

# OSErrors that mean "the path the user gave is wrong" rather than "the machine is in trouble".
_BAD_PATH_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EEXIST, errno.EISDIR, errno.ENOTDIR,
                    errno.ENOTEMPTY, errno.ENAMETOOLONG}


class UserError(ValueError):
    """Bad user input. The message names the input (file, directory, option) and what to do."""


def debug_enabled() -> bool:
    """True when ``MEGAVRL_DEBUG`` is set to anything but "", "0", "false" or "no"."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def is_file_error(exc: BaseException) -> bool:
    """An OSError about a path (it names a file, or is a missing/forbidden/misplaced path); not, for
    instance, a refused network connection, which is left to its traceback."""
    return isinstance(exc, OSError) and (exc.filename is not None or exc.errno in _BAD_PATH_ERRNOS
                                         or isinstance(exc, (FileNotFoundError, PermissionError, FileExistsError,
                                                             IsADirectoryError, NotADirectoryError)))


def describe(exc: BaseException) -> str:
    """``exc`` as one line. An OSError reads "<reason>: '<file>'" (its file named, as the CLI
    promises); other errors give their message, lines joined."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror}: {str(exc.filename)!r}"
        if exc.filename2 is not None:
            text += f" -> {str(exc.filename2)!r}"
        return text
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)  # str(KeyError) adds quotes
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(exc).__name__


def unreadable(path: str | os.PathLike, exc: OSError, what: str = "file") -> UserError:
    """"<what> '<path>' cannot be read: <reason>" for an OSError met while reading ``path``."""
    return UserError(f"{what} {str(path)!r} cannot be read: {exc.strerror or describe(exc)}")
