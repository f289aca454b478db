"""Atomic file writes: every report, recipe, cache entry and checkpoint goes through here.

A reader (another worker, ``recommend show``, a user's script) sees either the old file or the new
one, never half of one, and a crash or Ctrl-C mid-write leaves the old file in place: the data is
written to a temporary file in the same folder (same file system), flushed to disk, and moved over
the target with :func:`os.replace` (atomic on POSIX and on Windows).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Union

__all__ = ["atomic_write", "remove_file"]

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
    except BaseException:  # also Ctrl-C: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def remove_file(path: str | os.PathLike[str]) -> bool:
    """Delete ``path`` if it exists; returns whether a file was removed."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
