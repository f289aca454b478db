"""A study-wide mutex, so that work done once per study (the baseline, the warm start, the
confirm stage) is done once even when several workers start together.

PostgreSQL storages use a session-level advisory lock on the same database (every worker of a
fleet sees it); SQLite storages use a lock file beside the database (SQLite
studies are local to one machine), taken with :mod:`filelock` (``fcntl`` on POSIX, ``msvcrt`` on
Windows); other storages (in-memory) need no lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

from filelock import FileLock
from sqlalchemy import create_engine, text

from .storage import engine_url, is_postgres, sqlite_path


def _lock_id(name: str) -> int:
    # Advisory locks take a signed 64-bit key.
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def study_lock(storage_url: str | None, study_name: str, what: str = "baseline") -> Iterator[None]:
    """Hold an exclusive lock named (study, what) for the body of the ``with`` block (blocking)."""
    if not storage_url:
        yield
        return
    if is_postgres(storage_url):
        # Autocommit: a session-level lock held outside any transaction, so a server's
        # idle_in_transaction_session_timeout cannot cut it during a long baseline training.
        engine = create_engine(engine_url(storage_url), isolation_level="AUTOCOMMIT")
        key = _lock_id(f"{study_name}/{what}")
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                try:
                    yield
                finally:
                    conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        finally:
            engine.dispose()
        return
    db = sqlite_path(storage_url)
    if db is not None:
        safe = hashlib.sha256(f"{study_name}/{what}".encode()).hexdigest()[:16]
        lock_path = db.with_name(f".{db.name}.{safe}.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        if os.name == "posix":
            with _removed_when_released(lock_path):
                yield
            return
        # elsewhere the lock file stays: deleting it while another process waits on it would let
        # two processes hold "the" lock at once
        with FileLock(str(lock_path)):
            yield
        return
    yield


@contextlib.contextmanager
def _removed_when_released(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``, whose file is removed by its holder before it lets
    go, so lock files do not pile up beside the database. A waiter that then gets the lock on the
    removed file sees that the path no longer names it and takes the lock again on the new file:
    two processes never hold it at once."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            os.close(fd)
            raise
        if now is not None and (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
            break
        os.close(fd)  # its last holder removed it: lock the file the path names now
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # closing releases the lock
