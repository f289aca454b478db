"""Device latency profiles: the file ``recommend device-profile`` writes, read back and checked.

A profile is JSON (format ``recommender-latency-profile``, version
:data:`recommender.latency_ops.FORMAT_VERSION`) measured on the target device, at batch 1, with
a stated number of CPU threads:

- ``device``: machine, processor, system, torch version, threads, quantized engines;
- ``entries``: one per operator timed, ``{"spec", "engine", "ms", "iqr_ms"}`` (the operator's
  spec as :mod:`recommender.latency_ops` records it; ``engine`` for int8 operators);
- ``calibration``: ``{"scales": {class: factor}, "overhead_ms"}`` fitted on whole models
  replayed on the device (``models``);
- ``validation``: per held-out model the measured and predicted ms and the error in %, and
  ``median_error_pct``, ``p90_error_pct``, ``max_error_pct`` over them.

:func:`load_profile` refuses, with one line (:class:`ProfileError`, exit 2), a missing file,
one that is not JSON or not a profile, and one of another format version. What a profile
predicts is :mod:`recommender.latency_predict`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import latency_ops
from .errors import ProfileError
from .io import atomic_write

__all__ = ["LatencyProfile", "load_profile", "profile_from_dict", "make_profile", "write_script",
           "FORMAT", "FORMAT_VERSION"]

FORMAT = latency_ops.FORMAT
FORMAT_VERSION = latency_ops.FORMAT_VERSION
MAKE_HINT = "make one on the device with `recommend device-profile --out FILE`"


@dataclass(frozen=True)
class LatencyProfile:
    """A profile read from ``path`` (``digest``: the first 12 hex digits of the file's SHA-256).

    ``table`` maps an operator's key and engine (``spec_key(spec) + "@" + engine``) to its
    median time in ms; ``kinds`` the operator kinds it timed (``aten.conv2d``,
    ``quantized.conv2d@x86``, ...); ``error_pct`` the 90th percentile of the absolute error of
    its predictions on held-out whole models (None when it validated none)."""

    path: str
    digest: str
    data: dict[str, Any] = field(repr=False, compare=False)
    table: dict[str, float] = field(repr=False, compare=False)
    kinds: frozenset[str] = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def device(self) -> dict[str, Any]:
        return self.data.get("device", {})

    @property
    def threads(self) -> int:
        return int(self.data.get("threads", 1))

    @property
    def calibration(self) -> dict[str, Any]:
        return self.data.get("calibration", {})

    @property
    def error_pct(self) -> float | None:
        v = self.data.get("validation", {}).get("p90_error_pct")
        return None if v is None else float(v)

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self.data.get("entries", [])

    def describe(self) -> str:
        """``board.json (aarch64, torch 2.5.1, 1 thread, validation error 6.2 %)``."""
        d = self.device
        err = self.error_pct
        parts = [d.get("machine") or "?", f"torch {d.get('torch', '?')}",
                 f"{self.threads} thread{'s' if self.threads != 1 else ''}",
                 f"validation error {err:.1f} %" if err is not None else "not validated"]
        return f"{self.name} ({', '.join(parts)})"


def _fail(path: str, why: str) -> ProfileError:
    return ProfileError(f"latency profile {path}: {why}")


def profile_from_dict(d: Any, path: str = "<profile>", digest: str = "") -> LatencyProfile:
    """Check a profile's content and index it (one-line :class:`ProfileError` when it is not a
    valid profile of this format version)."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise _fail(path, f"not a recommender latency profile; {MAKE_HINT}")
    version = d.get("version")
    if version != FORMAT_VERSION:
        raise _fail(path, f"format version {version!r}, this recommender reads version {FORMAT_VERSION}; "
                          f"make it again with this version's `recommend device-profile`")
    entries = d.get("entries")
    if not isinstance(entries, list) or not entries:
        raise _fail(path, "malformed: no timed operators ('entries')")
    cal = d.get("calibration")
    if not isinstance(cal, dict) or not isinstance(cal.get("scales"), dict):
        raise _fail(path, "malformed: no calibration")
    for name in ("threads",):
        if not isinstance(d.get(name), int) or d[name] < 1:
            raise _fail(path, f"malformed: {name!r} must be a positive integer")
    table: dict[str, float] = {}
    kinds: set[str] = set()
    for i, e in enumerate(entries):
        ok = isinstance(e, dict) and isinstance(e.get("spec"), dict) and isinstance(e["spec"].get("op"), str)
        ms = e.get("ms") if ok else None
        if not ok or not isinstance(ms, (int, float)) or not (math.isfinite(ms) and ms >= 0):
            raise _fail(path, f"malformed: entry {i} is not an operator with a time in ms")
        spec = {**e["spec"], "engine": e.get("engine")}
        table[latency_ops.spec_key(spec) + "@" + (e.get("engine") or "")] = float(ms)
        kinds.add(latency_ops.kind_of(spec))
    for c, v in cal["scales"].items():
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _fail(path, f"malformed: calibration scale of {c!r}")
    if not isinstance(cal.get("overhead_ms", 0.0), (int, float)):
        raise _fail(path, "malformed: calibration overhead_ms")
    return LatencyProfile(path=path, digest=digest, data=d, table=table, kinds=frozenset(kinds))


_CACHE: dict[tuple[str, int, int], LatencyProfile] = {}


def load_profile(path: str | os.PathLike[str]) -> LatencyProfile:
    """Read and check a profile file (cached per path, size and modification time)."""
    p = Path(path).expanduser()
    shown = str(path)
    try:
        st = p.stat()
    except OSError:
        raise _fail(shown, f"no such file; {MAKE_HINT}") from None
    if not p.is_file():
        raise _fail(shown, "not a file")
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    try:
        raw = p.read_bytes()
        d = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _fail(shown, f"malformed, not JSON ({str(exc).splitlines()[0][:80]})") from None
    prof = profile_from_dict(d, shown, hashlib.sha256(raw).hexdigest()[:12])
    _CACHE[key] = prof
    return prof


def make_profile(out: str | os.PathLike[str], *, threads: int = 1, input_sizes: tuple[int, ...] = (32,),
                 engines: tuple[str, ...] | None = None, models: tuple[str, ...] | None = None,
                 samples: int = 7, plan: dict[str, Any] | None = None,
                 log: Callable[[str], None] | None = None) -> LatencyProfile:
    """Profile this machine and write the profile to ``out``: the operators of the bundled
    presets and models (``plan``, default :func:`recommender.profile_plan.make_plan` at
    ``input_sizes`` (px) with ``engines`` and ``models``), timed at batch 1 with ``threads``
    CPU threads (the process's setting is restored)."""
    from .profile_plan import make_plan

    if plan is None:
        plan = make_plan(input_sizes=input_sizes, engines=engines, models=models, log=log)
    prof = latency_ops.run_plan(plan, threads=threads, samples=samples, log=log)
    atomic_write(out, json.dumps(prof))
    return load_profile(out)


def write_script(path: str | os.PathLike[str], *, input_sizes: tuple[int, ...] = (32,),
                 engines: tuple[str, ...] | None = None, models: tuple[str, ...] | None = None,
                 log: Callable[[str], None] | None = None) -> Path:
    """Write a standalone profiling script (needs only torch): :mod:`recommender.latency_ops`
    with the plan of :func:`recommender.profile_plan.make_plan` appended. On the device:
    ``python profile_device.py --out board.json``."""
    from .profile_plan import make_plan

    plan = make_plan(input_sizes=input_sizes, engines=engines, models=models, log=log)
    src = Path(latency_ops.__file__).read_text(encoding="utf-8")
    packed = base64.b64encode(zlib.compress(json.dumps(plan).encode("utf-8"), 9)).decode("ascii")
    lines = "\n".join(packed[i:i + 100] for i in range(0, len(packed), 100))
    text = ("#!/usr/bin/env python3\n# Written by `recommend device-profile --write-script`: "
            "copy to the device, run `python3 " + Path(path).name + " --out board.json`.\n"
            + src + "\n\n_PACKED_PLAN = \"\"\"\n" + lines + "\n\"\"\"\n"
            "PLAN = json.loads(zlib.decompress(base64.b64decode(\"\".join(_PACKED_PLAN.split()))))\n\n"
            "if __name__ == \"__main__\":\n    sys.exit(main())\n")
    return atomic_write(path, text)
