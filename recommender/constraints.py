"""Budgets and the accuracy tolerance: grammar, parsing and checking.

Budget grammar (case of the unit suffix matters only for ``M`` vs ``m`` in ``ms``)::

    5M-params   800k-params   1.5M-nonzero-params   60M-flops   2G-flops   4MB   512kB   12ms
    12ms-cuda   12ms-ort   12ms@board.json

``params`` counts trainable parameters, ``nonzero-params`` the ones that are not zero after
unstructured pruning, ``flops`` multiply-accumulates as fvcore counts them at batch 1 and the model family's deploy
size (1x3x32x32 for the paper's CIFAR networks, the paper's count;
:meth:`recommender.models.registry.ModelFamily.deploy_size`), ``MB`` the serialised state dict in MiB (bytes / 1024**2), ``ms`` the median CPU
latency at batch 1 (``12ms-cpu`` is the same), ``ms-cuda`` the median latency at batch 1 on a
CUDA GPU (metric ``latency-cuda``; it needs a GPU where the study runs), ``ms-ort`` the median
latency at batch 1 in ONNX Runtime on this machine's CPU (metric ``latency-ort``; needs the
``export`` extra; int8 FX models cannot be timed there), ``ms@FILE`` the latency *predicted* for
the device that measured the profile ``FILE`` (metric ``latency-profile``; ``recommend
device-profile`` writes it; :mod:`recommender.latency_predict`). A latency budget whose limit
lies within the measured median +- IQR, or within the profile's validation error of a
prediction, is inside the noise (:meth:`Budget.within_noise`).

Max-drop grammar: ``2%`` or ``2pp`` (percentage points of top-1 accuracy below the baseline, the
paper's convention), ``0.5%``, ``5%rel`` (relative to the baseline accuracy).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal, Mapping

from .errors import ConstraintSyntaxError

Metric = Literal["params", "nonzero-params", "flops", "size", "latency", "latency-cuda", "latency-ort",
                 "latency-profile"]
METRICS: tuple[str, ...] = ("params", "nonzero-params", "flops", "size", "latency", "latency-cuda",
                            "latency-ort", "latency-profile")

BUDGET_FORMS = ("5M-params, 800k-params, 1.5M-nonzero-params, 60M-flops, 4MB, 512kB, 12ms, 12ms-cuda, "
                "12ms-ort, 12ms@board.json")
DROP_FORMS = "2%, 2pp, 0.5%, 5%rel"

_NUM = r"(?P<num>\d+(?:\.\d*)?|\.\d+)"
# ASCII digits only: Python's float() also reads "1_0" as 10 and other scripts' digits
_COUNT = re.compile(_NUM + r"\s*(?P<mult>[kKMGB]?)-?(?P<metric>params|nonzero-params|flops)$", re.ASCII)
_SIZE = re.compile(_NUM + r"\s*(?P<unit>[kKMG])B$", re.ASCII)
_LATENCY = re.compile(_NUM + r"\s*ms(?:-(?P<device>cpu|cuda|ort))?$", re.ASCII)
_PROFILED = re.compile(_NUM + r"\s*ms@(?P<path>.+)$", re.ASCII)
_MULT = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9}
_BYTES_MB = {"k": 1 / 1024, "K": 1 / 1024, "M": 1.0, "G": 1024.0}

# Costs field that each metric reads, and the unit in which a limit is stored.
_COST_FIELD = {
    "params": "params",
    "nonzero-params": "nonzero_params",
    "flops": "mflops",
    "size": "size_mb",
    "latency": "latency_ms",
    "latency-cuda": "latency_cuda_ms",
    "latency-ort": "latency_ort_ms",
    "latency-profile": "latency_predicted_ms",
}
# Costs field holding the interquartile range of each timed metric.
_NOISE_FIELD = {"latency": "latency_iqr_ms", "latency-cuda": "latency_cuda_iqr_ms",
                "latency-ort": "latency_ort_iqr_ms"}
# Device on which each timed metric is measured (a profile's device is the profile's).
_DEVICE = {"latency": "cpu", "latency-cuda": "cuda", "latency-ort": "cpu"}
_UNIT = {"params": "params", "nonzero-params": "params", "flops": "MFLOPs", "size": "MB",
         "latency": "ms", "latency-cuda": "ms", "latency-ort": "ms", "latency-profile": "ms"}


@dataclass(frozen=True)
class Budget:
    """A limit on one cost metric.

    Args:
        metric: one of ``params``, ``nonzero-params``, ``flops``, ``size``, ``latency`` (CPU),
            ``latency-cuda`` (CUDA GPU), ``latency-ort`` (ONNX Runtime, CPU),
            ``latency-profile`` (predicted from a device profile).
        limit: the largest allowed value, in the metric's unit: a count for params and
            nonzero-params, MFLOPs (10**6 multiply-accumulates) for flops, MB (MiB) for size,
            milliseconds for latency.
        text: the user's spelling, for reports.
        profile: ``latency-profile`` only: the profile file (absolute path).
        profile_digest: its SHA-256 (12 hex digits), part of the study's identity.
        profile_error_pct: its validation error (90th percentile of the absolute error on
            held-out whole models, %), None when it validated none.
        profile_device: what it was measured on, in words.
    """

    metric: Metric
    limit: float
    text: str = ""
    profile: str = ""
    profile_digest: str = ""
    profile_error_pct: float | None = None
    profile_device: str = ""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConstraintSyntaxError(f"unknown budget metric {self.metric!r}; valid: {', '.join(METRICS)}")
        if not (self.limit > 0 and math.isfinite(self.limit)):
            raise ConstraintSyntaxError(f"budget limit must be positive, got {self.limit!r}")
        if (self.metric == "latency-profile") != bool(self.profile):
            raise ConstraintSyntaxError("a latency-profile budget needs its profile (12ms@board.json), "
                                        "and only it has one")

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """Parse ``5M-params``, ``60M-flops``, ``4MB``, ``12ms`` ... (see module docstring)."""
        s = str(text).strip()
        m = _COUNT.fullmatch(s)
        if m:
            value = float(m["num"]) * _MULT[m["mult"]]
            metric = m["metric"]
            limit = value / 1e6 if metric == "flops" else value
            return cls(metric, _checked(metric, limit, text), s)
        m = _SIZE.fullmatch(s)
        if m:
            return cls("size", _checked("size", float(m["num"]) * _BYTES_MB[m["unit"]], text), s)
        m = _LATENCY.fullmatch(s)
        if m:
            metric = {"cuda": "latency-cuda", "ort": "latency-ort"}.get(m["device"] or "", "latency")
            return cls(metric, _checked(metric, float(m["num"]), text), s)
        m = _PROFILED.fullmatch(s)
        if m:
            return cls.profiled(_checked("latency-profile", float(m["num"]), text), m["path"], s)
        raise ConstraintSyntaxError(f"malformed budget {text!r}; accepted forms: {BUDGET_FORMS}")

    @classmethod
    def profiled(cls, limit_ms: float, path: str, text: str = "") -> "Budget":
        """A latency budget predicted from the device profile at ``path`` (read and checked
        now: a missing, malformed or incompatible file is a one-line :class:`ProfileError`)."""
        from pathlib import Path

        from .latency_profile import load_profile

        prof = load_profile(path)
        return cls("latency-profile", limit_ms, text or f"{limit_ms:g}ms@{path}",
                   profile=str(Path(path).expanduser().resolve()), profile_digest=prof.digest,
                   profile_error_pct=prof.error_pct, profile_device=prof.describe())

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict, without the profile fields of a budget that has none (the
        form studies stored before profiles existed)."""
        d = asdict(self)
        if not self.profile:
            for k in ("profile", "profile_digest", "profile_error_pct", "profile_device"):
                d.pop(k)
        return d

    @property
    def predicted(self) -> bool:
        """Whether this budget's value is a prediction (from a device profile), not a measurement."""
        return self.metric == "latency-profile"

    @property
    def source(self) -> str:
        """How the value is obtained, in words: ``predicted (profile board.json, validation
        error 6.2 %)``, ``measured in ONNX Runtime``, ``measured``, ``counted``."""
        if self.predicted:
            from pathlib import Path

            err = "not validated" if self.profile_error_pct is None else \
                f"validation error {self.profile_error_pct:.1f} %"
            return f"predicted (profile {Path(self.profile).name}, {err})"
        if self.metric == "latency-ort":
            return "measured in ONNX Runtime"
        return "measured" if self.metric in _DEVICE else "counted"

    @property
    def cost_field(self) -> str:
        """Name of the :class:`recommender.measure.Costs` field this budget limits."""
        return _COST_FIELD[self.metric]

    @property
    def unit(self) -> str:
        return _UNIT[self.metric]

    @property
    def device(self) -> str | None:
        """``cpu`` or ``cuda`` for a latency budget measured here (where), else None (also for
        a profile's prediction: its device is the profile's)."""
        return _DEVICE.get(self.metric)

    def value(self, costs: Mapping[str, Any] | Any) -> float:
        """The metric read from a Costs object or its dict form, in this budget's unit."""
        field = self.cost_field
        v = costs.get(field) if isinstance(costs, Mapping) else getattr(costs, field)
        return float("inf") if v is None else float(v)

    def violation(self, costs: Mapping[str, Any] | Any) -> float:
        """Relative excess over the limit: <= 0 means within budget (Optuna's convention)."""
        return (self.value(costs) - self.limit) / self.limit

    def within_noise(self, costs: Mapping[str, Any] | Any) -> bool:
        """True when this is a latency budget and its limit lies within the measured median +-
        IQR (``latency_iqr_ms`` / ``latency_cuda_iqr_ms`` / ``latency_ort_iqr_ms``), or, for a
        profile's prediction, within the prediction +- the profile's validation error: meeting
        or missing it is then inside the noise (the answer is uncertain). Counts and sizes are
        exact: always False."""
        get = (lambda k: costs.get(k)) if isinstance(costs, Mapping) else (
            lambda k: getattr(costs, k, None))
        if self.predicted:
            pred = get(self.cost_field)
            if pred is None or self.profile_error_pct is None:
                return False
            return abs(self.limit - float(pred)) <= float(pred) * float(self.profile_error_pct) / 100.0
        noise = _NOISE_FIELD.get(self.metric)
        if noise is None:
            return False
        median, iqr = get(self.cost_field), get(noise)
        if median is None or iqr is None:
            return False
        return abs(self.limit - float(median)) <= float(iqr)

    def describe(self) -> str:
        """``latency <= 12 ms``; a prediction names its profile: ``latency on board.json
        (predicted, validation error 6.2 %) <= 12 ms``."""
        if self.predicted:
            from pathlib import Path

            err = "" if self.profile_error_pct is None else f", validation error {self.profile_error_pct:.1f} %"
            return (f"latency on {Path(self.profile).name} (predicted{err}) <= "
                    f"{format_quantity(self.limit, self.unit)}")
        if self.metric == "latency-ort":
            return f"latency in ONNX Runtime <= {format_quantity(self.limit, self.unit)}"
        return f"{self.metric} <= {format_quantity(self.limit, self.unit)}"


def _checked(metric: str, limit: float, text: str) -> float:
    if not (limit > 0 and math.isfinite(limit)):
        raise ConstraintSyntaxError(f"budget {text!r} must be a positive number; accepted forms: {BUDGET_FORMS}")
    return limit


_DROP = re.compile(_NUM + r"\s*(?P<unit>%rel|%|pp)$", re.ASCII)
_PLAIN = re.compile(_NUM, re.ASCII)


@dataclass(frozen=True)
class MaxDrop:
    """The tolerated loss of top-1 accuracy against the baseline.

    Args:
        value: the tolerance as written (percentage points, or percent of the baseline if
            ``relative``).
        relative: ``5%rel`` means 5 % of the baseline accuracy rather than 5 points.
    """

    value: float
    relative: bool = False
    text: str = ""

    def __post_init__(self) -> None:
        if not (0 <= self.value <= 100 and math.isfinite(self.value)):
            raise ConstraintSyntaxError(f"max drop must be between 0 and 100, got {self.value!r}")

    @classmethod
    def parse(cls, text: str | float) -> "MaxDrop":
        """Parse ``2%``, ``2pp``, ``0.5%``, ``5%rel``; a bare number means percentage points."""
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            return cls(float(text), False, f"{text}pp")
        s = str(text).strip()
        m = _DROP.fullmatch(s)
        if not m:
            if _PLAIN.fullmatch(s):
                return cls(float(s), False, s)
            raise ConstraintSyntaxError(f"malformed max drop {text!r}; accepted forms: {DROP_FORMS}")
        value = float(m["num"])
        if value > 100:
            raise ConstraintSyntaxError(f"max drop {text!r} is over 100%; accepted forms: {DROP_FORMS}")
        return cls(value, m["unit"] == "%rel", s)

    def allowed_pp(self, baseline_accuracy: float) -> float:
        """Tolerated drop in percentage points, given the baseline accuracy as a fraction."""
        return self.value * baseline_accuracy if self.relative else self.value

    def describe(self) -> str:
        return f"{self.value:g}% of the baseline accuracy" if self.relative else f"{self.value:g} pp"


def parse_budgets(texts: list[str] | tuple[str, ...] | str | None) -> list[Budget]:
    """Parse one or more budgets; the first one is the primary cost objective."""
    if texts is None:
        return []
    if isinstance(texts, (str, Budget)):
        texts = [texts]  # type: ignore[list-item]
    out = [t if isinstance(t, Budget) else Budget.parse(t) for t in texts]
    seen = [b.metric for b in out]
    dup = {m for m in seen if seen.count(m) > 1}
    if dup:
        raise ConstraintSyntaxError(f"budget on {', '.join(sorted(dup))} given more than once")
    return out


def format_quantity(value: float | None, unit: str) -> str:
    """Human form of a cost: ``4.21M params``, ``61.3 MFLOPs``, ``3.52 MB``, ``8.1 ms``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "params":
        if value >= 1e6:
            return f"{value / 1e6:.3g}M params" if value < 1e8 else f"{value / 1e6:.0f}M params"
        if value >= 1e3:
            return f"{value / 1e3:.3g}k params"
        return f"{value:.0f} params"
    if unit == "MFLOPs":
        return f"{value:.4g} MFLOPs"
    if unit == "MB":
        return f"{value:.3g} MB"
    if unit == "ms":
        return f"{value:.3g} ms"
    return f"{value:g} {unit}"
