"""Exceptions the user can cause.

Every error a user can provoke with bad input (an unknown model, a malformed budget, a missing
dataset, an unreachable storage, a corrupt checkpoint or recipe) is a :class:`RecommenderError`.
The CLI prints its message as one line on stderr and exits non-zero; a traceback means a bug.
"""

from __future__ import annotations


class RecommenderError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""

    exit_code: int = 2


class UnknownNameError(RecommenderError, KeyError):
    """An unknown model, preset, dataset, fidelity, sampler or option value."""

    def __init__(self, kind: str, name: str, valid: list[str] | tuple[str, ...]):
        self.kind, self.name, self.valid = kind, name, list(valid)
        shown = ", ".join(self.valid)
        super().__init__(f"unknown {kind} {name!r}; valid: {shown}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class ArchError(RecommenderError, ValueError):
    """An architecture technique that cannot be applied to the chosen model."""


class ConstraintSyntaxError(RecommenderError, ValueError):
    """A malformed --budget or --max-drop."""


class DatasetError(RecommenderError):
    """A dataset that is missing, unreadable or malformed."""


class CheckpointError(RecommenderError):
    """A checkpoint, cache entry or recipe file that is corrupt or of the wrong kind."""


class StorageError(RecommenderError):
    """An Optuna storage that cannot be reached or opened."""


class SearchSpaceError(RecommenderError, ValueError):
    """A malformed search-space YAML file."""


class ProfileError(RecommenderError):
    """A device latency profile that is missing, malformed, of another format version, or that
    lacks a kind of operator a candidate needs."""


class DiskFullError(RecommenderError):
    """A write that failed because the file system is full (the work written before is kept)."""


class TrainingError(RecommenderError):
    """A training that cannot succeed (the baseline diverges): nothing can be measured against it."""

    exit_code = 1


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, systemd, ``docker stop``), raised by the CLI's handler so that a run
    stops as on Ctrl-C: the running trial is marked interrupted and queued again."""
