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

from . import limits
from .errors import RecommenderError

__all__ = ["STUDY_NAME", "study_name", "seed", "port", "percent", "writable_dir", "spec_bounds", "jobs"]

#: A study name: a letter or digit, then up to 127 letters, digits, ``.``, ``_`` or ``-``. No
#: path separators (the name is a file under --studies-dir), no ``%`` or ``?`` (a SQLite URL
#: would decode or cut them), no ``..``.
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Seeds feed numpy (< 2**32) and the confirm stage adds one; keep them in a signed 32-bit int.
MAX_SEED = limits.limit("seed").high


def study_name(name: Any) -> str:
    """``name`` if it is a valid study name (see :data:`STUDY_NAME`), else a RecommenderError."""
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name) or ".." in name:
        raise RecommenderError(f"invalid study name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
                               "starting with a letter or digit, without '..'")
    return name


def seed(value: Any, flag: str = "--seed") -> int:
    """A seed in [0, 2**31 - 1]."""
    return int(limits.check("seed", value, flag))


def port(value: Any, flag: str = "--port") -> int:
    """A TCP port in [0, 65535] (0: pick a free one)."""
    return int(limits.check("port", value, flag))


def jobs(value: Any, flag: str = "--jobs") -> int:
    """Worker processes: 0 (auto) or within the ``jobs`` limit."""
    return 0 if value == 0 and not isinstance(value, bool) else int(limits.check("jobs", value, flag))


def spec_bounds(spec: Any) -> None:
    """Every count of a study's settings (a :class:`~recommender.search.study.StudySpec`) within
    its limit (:mod:`recommender.limits`), else a one-line error before any work."""
    limits.check("trials", spec.trials)
    jobs(spec.jobs)
    limits.check("threads", spec.threads)
    limits.check("n_confirm", spec.n_confirm)
    limits.check("max_promoted", spec.max_promoted)
    if spec.image_size is not None:
        limits.check("image_size", spec.image_size)
    # --rungs is bounded where it is parsed (recommender.search.rungs.parse_ladder)
    for value, flag in ((spec.timeout, "--timeout"), (spec.max_trial_seconds, "--max-trial-time")):
        if value is not None:
            limits.check("timeout", value, flag, integer=False)
    limits.check("heartbeat", spec.heartbeat)
    limits.check("grace", spec.grace)


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
