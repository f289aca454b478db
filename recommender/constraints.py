"""Budgets and the accuracy tolerance: grammar, parsing and checking.

Budget grammar (case of the unit suffix matters only for ``M`` vs ``m`` in ``ms``)::

    5M-params   800k-params   1.5M-nonzero-params   60M-flops   2G-flops   4MB   512kB   12ms
    12ms-cuda

``params`` counts trainable parameters, ``nonzero-params`` the ones that are not zero after
unstructured pruning, ``flops`` multiply-accumulates as fvcore counts them at batch 1 and the model family's deploy
size (1x3x32x32 for the paper's CIFAR networks, the paper's count;
:meth:`recommender.models.registry.ModelFamily.deploy_size`), ``MB`` the serialised state dict in MiB (bytes / 1024**2), ``ms`` the median CPU
latency at batch 1 (``12ms-cpu`` is the same), ``ms-cuda`` the median latency at batch 1 on a
CUDA GPU (metric ``latency-cuda``; it needs a GPU where the study runs). A latency budget whose
limit lies within the measured median +- IQR is inside the timing noise
(:meth:`Budget.within_noise`).

Max-drop grammar: ``2%`` or ``2pp`` (percentage points of top-1 accuracy below the baseline, the
paper's convention), ``0.5%``, ``5%rel`` (relative to the baseline accuracy).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from .errors import ConstraintSyntaxError

Metric = Literal["params", "nonzero-params", "flops", "size", "latency", "latency-cuda"]
METRICS: tuple[str, ...] = ("params", "nonzero-params", "flops", "size", "latency", "latency-cuda")

BUDGET_FORMS = "5M-params, 800k-params, 1.5M-nonzero-params, 60M-flops, 4MB, 512kB, 12ms, 12ms-cuda"
DROP_FORMS = "2%, 2pp, 0.5%, 5%rel"

_NUM = r"(?P<num>\d+(?:\.\d*)?|\.\d+)"
# ASCII digits only: Python's float() also reads "1_0" as 10 and other scripts' digits
_COUNT = re.compile(_NUM + r"\s*(?P<mult>[kKMGB]?)-?(?P<metric>params|nonzero-params|flops)$", re.ASCII)
_SIZE = re.compile(_NUM + r"\s*(?P<unit>[kKMG])B$", re.ASCII)
_LATENCY = re.compile(_NUM + r"\s*ms(?:-(?P<device>cpu|cuda))?$", re.ASCII)
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
}
# Costs field holding the interquartile range of each timed metric.
_NOISE_FIELD = {"latency": "latency_iqr_ms", "latency-cuda": "latency_cuda_iqr_ms"}
# Device on which each timed metric is measured.
_DEVICE = {"latency": "cpu", "latency-cuda": "cuda"}


@dataclass(frozen=True)
class Budget:
    """A limit on one cost metric.

    Args:
        metric: one of ``params``, ``nonzero-params``, ``flops``, ``size``, ``latency`` (CPU),
            ``latency-cuda`` (CUDA GPU).
        limit: the largest allowed value, in the metric's unit: a count for params and
            nonzero-params, MFLOPs (10**6 multiply-accumulates) for flops, MB (MiB) for size,
            milliseconds for latency.
        text: the user's spelling, for reports.
    """

    metric: Metric
    limit: float
    text: str = ""

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConstraintSyntaxError(f"unknown budget metric {self.metric!r}; valid: {', '.join(METRICS)}")
        if not (self.limit > 0 and math.isfinite(self.limit)):
            raise ConstraintSyntaxError(f"budget limit must be positive, got {self.limit!r}")

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
            metric = "latency-cuda" if m["device"] == "cuda" else "latency"
            return cls(metric, _checked(metric, float(m["num"]), text), s)
        raise ConstraintSyntaxError(f"malformed budget {text!r}; accepted forms: {BUDGET_FORMS}")

    @property
    def cost_field(self) -> str:
        """Name of the :class:`recommender.measure.Costs` field this budget limits."""
        return _COST_FIELD[self.metric]

    @property
    def unit(self) -> str:
        return {"params": "params", "nonzero-params": "params", "flops": "MFLOPs",
                "size": "MB", "latency": "ms", "latency-cuda": "ms"}[self.metric]

    @property
    def device(self) -> str | None:
        """``cpu`` or ``cuda`` for a latency budget (where it is measured), else None."""
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
        IQR (``latency_iqr_ms`` / ``latency_cuda_iqr_ms``): meeting or missing it is then inside
        the timing noise. Counts and sizes are exact: always False."""
        noise = _NOISE_FIELD.get(self.metric)
        if noise is None:
            return False
        get = (lambda k: costs.get(k)) if isinstance(costs, Mapping) else (
            lambda k: getattr(costs, k, None))
        median, iqr = get(self.cost_field), get(noise)
        if median is None or iqr is None:
            return False
        return abs(self.limit - float(median)) <= float(iqr)

    def describe(self) -> str:
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
