"""Checks of user input that the command, the API and the dashboard share, each a one-line
:class:`~recommender.errors.RecommenderError` raised before any expensive work.

One rule per kind of value, applied the same wherever it is given: a study name (it becomes a
file name under ``--studies-dir`` and a folder of reports), a seed, a TCP port, a percentage, a
folder the run must write into. This module imports neither torch nor optuna.
"""

from __future__ import annotations

import math
import numbers
import re
import tempfile
from pathlib import Path
from typing import Any

from .errors import RecommenderError

__all__ = ["STUDY_NAME", "study_name", "seed", "port", "percent", "writable_dir"]

#: A study name: a letter or digit, then up to 127 letters, digits, ``.``, ``_`` or ``-``. No
#: path separators (the name is a file under --studies-dir), no ``%`` or ``?`` (a SQLite URL
#: would decode or cut them), no ``..``.
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Seeds feed numpy (< 2**32) and the confirm stage adds one; keep them in a signed 32-bit int.
MAX_SEED = 2**31 - 1


def study_name(name: Any) -> str:
    """``name`` if it is a valid study name (see :data:`STUDY_NAME`), else a RecommenderError."""
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name) or ".." in name:
        raise RecommenderError(f"invalid study name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
                               "starting with a letter or digit, without '..'")
    return name


def seed(value: Any, flag: str = "--seed") -> int:
    """A seed in [0, 2**31 - 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= MAX_SEED:
        raise RecommenderError(f"{flag} must be an integer in [0, {MAX_SEED}], got {value!r}")
    return int(value)


def port(value: Any, flag: str = "--port") -> int:
    """A TCP port in [0, 65535] (0: pick a free one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= 65535:
        raise RecommenderError(f"{flag} must be an integer in [0, 65535] (0 picks a free port), got {value!r}")
    return int(value)


def percent(value: Any, flag: str) -> float:
    """A finite percentage in [0, 100]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not 0 <= value <= 100:
        raise RecommenderError(f"{flag} must be a percentage in [0, 100], got {value!r}")
    return float(value)


def writable_dir(path: str | Path, what: str, error: type[RecommenderError] = RecommenderError) -> Path:
    """Create ``path`` (with its parents) and check that a file can be written in it; an
    impossible path (a file on the way, a read-only filesystem) or an unwritable folder is a
    one-line ``error`` naming ``what`` it is for."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise error(f"cannot use {p} as {what}: it exists and is not a folder") from None
    except OSError as exc:
        raise error(f"cannot create {p} ({what}): {exc.strerror or exc}") from None
    if not p.is_dir():
        raise error(f"cannot use {p} as {what}: it is not a folder")
    try:  # os.access says yes to root on any folder; a real write says what the run will meet
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        raise error(f"cannot write into {p} ({what}): {exc.strerror or exc}") from None
    return p
