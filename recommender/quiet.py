"""A library call prints only what its caller asks for.

Optuna logs every study it creates or loads and every trial it finishes at INFO, its default
verbosity, and warns that some of the stable-enough features this project uses are experimental
(heartbeats, metric names, grouped TPE, ``fail_stale_trials``). Inside :func:`library_calls`
neither reaches the caller: Optuna's default INFO verbosity is raised to WARNING and its
``ExperimentalWarning`` is ignored, both for the duration of the call only and restored after it.
A caller who set Optuna's verbosity to DEBUG, or who wants those lines, keeps them: only the
default is quietened. The CLI sets its own levels (:func:`recommender.cli.command_environment`).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

__all__ = ["library_calls", "no_experimental_warnings"]


@contextlib.contextmanager
def no_experimental_warnings() -> Iterator[None]:
    """Ignore Optuna's ``ExperimentalWarning`` inside the block (the filters are restored)."""
    import optuna

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        yield


@contextlib.contextmanager
def library_calls() -> Iterator[None]:
    """Optuna at WARNING (when it is at its default INFO) and without experimental warnings for
    the block; both restored afterwards."""
    import optuna

    before = optuna.logging.get_verbosity()
    quieter = before == logging.INFO
    if quieter:
        optuna.logging.set_verbosity(logging.WARNING)
    try:
        with no_experimental_warnings():
            yield
    finally:
        if quieter:
            optuna.logging.set_verbosity(before)
