"""Ctrl-C and SIGTERM that CPython swallowed, raised again at the next safe point.

A Python signal handler runs between bytecodes of the main thread, wherever it is, also inside a
weakref callback or ``__del__`` that the garbage collector started. An exception raised there is
printed as "Exception ignored in ..." and dropped: the KeyboardInterrupt of a Ctrl-C is then lost
and the run goes on (measured: 2 of 8 Ctrl-Cs during a loaded test run, inside SQLAlchemy's class
registry clean-up). The CLI's handlers therefore record the interrupt here before they raise it,
and the training loops and the search's trial callback call :func:`check`, which raises it again
if it is still pending. Only the CLI and its ``--jobs`` worker processes install these handlers
and keep CPython from printing such a dropped interrupt as a traceback, all through
:func:`take_over`; library code only calls :func:`check`.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Callable

__all__ = ["request", "requested", "check", "clear", "handler", "take_over", "take_over_sigint", "quiet_dropped"]

_pending: type[KeyboardInterrupt] | None = None  # the first interrupt not raised again yet
_fired = False  # an interrupt reached a ``once`` handler (see handler)
_lock = threading.Lock()


def request(kind: type[KeyboardInterrupt] = KeyboardInterrupt) -> None:
    """Record an interrupt (called by a signal handler just before it raises ``kind``)."""
    global _pending
    with _lock:
        _pending = _pending or kind


def requested() -> bool:
    """Whether an interrupt was recorded since the last :func:`clear`."""
    return _pending is not None


def check() -> None:
    """Raise the recorded interrupt again (a safe point: between training steps, after a trial).
    Once raised it is cleared, so that clean-up code that handles it is not interrupted again."""
    global _pending
    with _lock:
        kind, _pending = _pending, None
    if kind is not None:
        raise kind()


def handler(kind: type[KeyboardInterrupt] = KeyboardInterrupt, *, once: bool = False) -> Callable[[int, Any], None]:
    """A signal handler that records ``kind`` (see :func:`request`) and raises it; for
    ``signal.signal`` in a process of this package's own (the CLI, a ``--jobs`` worker).
    ``once``: after the first interrupt of this process (any handler made with ``once``), later
    signals are ignored, so that the same stop arriving twice (Ctrl-C to the process group and
    then from the coordinator) does not break the recording of the trial it interrupted."""

    def raise_it(signum: int, frame: Any) -> None:
        global _fired
        if once:
            with _lock:
                seen, _fired = _fired, True
            if seen:
                return
        request(kind)
        raise kind()

    return raise_it


def take_over_sigint(*, once: bool = False) -> Any:
    """Put :func:`handler` in place of Python's own Ctrl-C handler (main thread of a process of
    this package's own); returns the handler to restore, or None when SIGINT was not Python's
    default and is left as it is (ignored at start, as in a background job, it stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        return None
    signal.signal(signal.SIGINT, handler(KeyboardInterrupt, once=once))
    return previous


def quiet_dropped() -> Any:
    """Install a ``sys.unraisablehook`` that says nothing of an interrupt CPython dropped while
    it is recorded here (it is raised again at the next :func:`check`, and the command then
    reports it in one line); anything else goes to the previous hook, which is returned so that
    the caller can restore it. For the processes that install :func:`handler`."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and requested():
            return
        previous(unraisable)

    sys.unraisablehook = hook
    return previous


def take_over(terminated: type[KeyboardInterrupt] | None = None, *, once: bool = False) -> Callable[[], None]:
    """Interrupt handling of a process of this package's own (the CLI, a ``--jobs`` worker): a
    fresh record (:func:`clear`), Ctrl-C through :func:`handler` (:func:`take_over_sigint`),
    SIGTERM raising ``terminated`` when given (main thread only), and :func:`quiet_dropped`.
    ``once``: only the first of these signals interrupts (see :func:`handler`; a worker).
    Returns the function that puts back what was there before."""
    clear()
    main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, handler(terminated, once=once)) if terminated and main else None
    old_int = take_over_sigint(once=once)
    old_hook = quiet_dropped()

    def restore() -> None:
        sys.unraisablehook = old_hook
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if old_int is not None:
            signal.signal(signal.SIGINT, old_int)

    return restore


def clear() -> None:
    """Forget any recorded interrupt (a new command starts)."""
    global _pending, _fired
    with _lock:
        _pending, _fired = None, False
