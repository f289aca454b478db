"""Atomic file writes: every report, recipe, cache entry and checkpoint goes through here; and
reading a user's text file (a recipe, a search space) within a size bound, as UTF-8.

A reader (another worker, ``recommend show``, a user's script) sees either the old file or the new
one, never half of one, and a crash or Ctrl-C mid-write leaves the old file in place: the data is
written to a temporary file in the same folder (same file system), flushed to disk, and moved over
the target with :func:`os.replace` (atomic on POSIX and on Windows). A write that fails because
the file system is full is a one-line :class:`~recommender.errors.DiskFullError` naming the folder;
what was written before stays.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Union

__all__ = ["atomic_write", "remove_file", "read_text"]

#: Free bytes below which a failed write is taken for a full file system (torch.save reports
#: ENOSPC as a RuntimeError without the errno).
FULL_BELOW = 1024**2

Writer = Callable[[IO[Any]], Any]


def atomic_write(path: str | os.PathLike[str], data: Union[str, bytes, Writer], *, binary: bool | None = None,
                 fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically and return the path.

    Args:
        path: the target file; missing parent folders are created.
        data: text (written as UTF-8), bytes, or a callback ``write(fileobj)`` that writes the
            content itself (e.g. ``lambda f: torch.save(obj, f)``).
        binary: for a callback, open the temporary file in binary mode (default True) or text
            mode (False, UTF-8); ignored for text and bytes.
        fsync: flush the file to disk before the rename (durability after a power loss).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        is_binary = False
    elif isinstance(data, (bytes, bytearray, memoryview)):
        is_binary = True
    else:
        is_binary = True if binary is None else binary
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with (os.fdopen(fd, "wb") if is_binary else os.fdopen(fd, "w", encoding="utf-8", newline="")) as f:
            if isinstance(data, (str, bytes, bytearray, memoryview)):
                f.write(data)
            else:
                data(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:  # also Ctrl-C: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, Exception) and _disk_full(exc, target.parent):
            from .errors import DiskFullError

            raise DiskFullError(f"disk full at {target.parent}: cannot write {target.name}") from None
        raise
    return target


def _disk_full(exc: Exception, folder: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW
    except OSError:
        return False


def read_text(path: str | os.PathLike[str], what: str, size_limit: str, *, error: type[Exception]) -> str:
    """The text of a user's file: at most the bytes of the limit ``size_limit``
    (:mod:`recommender.limits`), UTF-8; anything else (unreadable, too large, other bytes) is a
    one-line ``error`` naming ``what`` it is."""
    from . import limits

    p = Path(path)
    cap = limits.limit(size_limit).high
    try:
        with open(p, "rb") as f:
            data = f.read(cap + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if len(data) > cap:
        raise error(f"{what} {p} is larger than {cap:,} bytes ({limits.limit(size_limit).why})")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {p} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None


def remove_file(path: str | os.PathLike[str]) -> bool:
    """Delete ``path`` if it exists; returns whether a file was removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
