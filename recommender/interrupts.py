"""Ctrl-C and SIGTERM that CPython swallowed, raised again at the next safe point.

A Python signal handler runs between bytecodes of the main thread, wherever it is, also inside a
weakref callback or ``__del__`` that the garbage collector started. An exception raised there is
printed as "Exception ignored in ..." and dropped: the KeyboardInterrupt of a Ctrl-C is then lost
and the run goes on (measured: 2 of 8 Ctrl-Cs during a loaded test run, inside SQLAlchemy's class
registry clean-up). The CLI's handlers therefore record the interrupt here before they raise it,
and the training loops and the search's trial callback call :func:`check`, which raises it again
if it is still pending. Nothing here installs a handler: only the CLI (and its worker processes)
do, and :func:`clear` resets the record when they start.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

__all__ = ["request", "requested", "check", "clear", "handler"]

_pending: list[type[KeyboardInterrupt]] = []
_lock = threading.Lock()


def request(kind: type[KeyboardInterrupt] = KeyboardInterrupt) -> None:
    """Record an interrupt (called by a signal handler just before it raises ``kind``)."""
    with _lock:
        if not _pending:
            _pending.append(kind)


def requested() -> bool:
    """Whether an interrupt was recorded since the last :func:`clear`."""
    return bool(_pending)


def check() -> None:
    """Raise the recorded interrupt again (a safe point: between training steps, after a trial).
    Once raised it is cleared, so that clean-up code that handles it is not interrupted again."""
    with _lock:
        kind = _pending.pop() if _pending else None
    if kind is not None:
        raise kind()


def handler(kind: type[KeyboardInterrupt] = KeyboardInterrupt) -> Callable[[int, Any], None]:
    """A signal handler that records ``kind`` (see :func:`request`) and raises it; for
    ``signal.signal`` in a process of this package's own (the CLI, a ``--jobs`` worker)."""

    def raise_it(signum: int, frame: Any) -> None:
        request(kind)
        raise kind()

    return raise_it


def clear() -> None:
    """Forget any recorded interrupt (a new command starts)."""
    with _lock:
        _pending.clear()
