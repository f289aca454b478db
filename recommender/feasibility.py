"""The one feasibility predicate: does a measured candidate meet the question, and how settled is it?

Every place that decides or shows feasibility asks :class:`Feasibility`: the objective's Optuna
constraint values, promotion (:meth:`Feasibility.might_hold`), the ledger's verdict per rung,
the answer, the reports and the exit code. A drop *at* the tolerance holds: float rounding at
the boundary (7 worse images of 1,000 against ``0.7%`` give ``0.7000000000000001`` pp;
``10%rel`` of a 57 % baseline is ``5.699999999999999`` pp) is absorbed by a stated slack,
:data:`BOUNDARY_SLACK_PP`, far below one image of any validation set.

Besides holding or not, a verdict says why the data may not settle it (*uncertain*): the drop's
95 % interval crosses the tolerance, or a latency lies within its timing noise of the limit
(:meth:`recommender.constraints.Budget.within_noise`). Answer-level doubts (a chance-level
baseline, a validation set too small for the tolerance) are :func:`chance_level` and
:class:`Power`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .constraints import Budget, MaxDrop, format_quantity
from .stats import min_resolvable_drop

__all__ = ["BOUNDARY_SLACK_PP", "Feasibility", "Verdict", "Power", "chance_level"]

#: pp by which a drop may exceed the tolerance and still hold: float rounding only (one image
#: of a 10-million-image validation set is 1e-5 pp).
BOUNDARY_SLACK_PP = 1e-9
#: Relative excess over a budget's limit that still holds (float rounding of MB and ms).
BUDGET_SLACK = 1e-12
#: Scale (pp) under which a tolerance is not used to normalise the drop's constraint value.
MIN_DROP_SCALE_PP = 0.1


@dataclass(frozen=True)
class Verdict:
    """A measured candidate against the question at one rung.

    holds: the drop is within the tolerance (with :data:`BOUNDARY_SLACK_PP`) and every budget
        holds. A failed evaluation never holds.
    misses: what it misses, in words (empty when it holds).
    excess: how far it misses, normalised (0 when it holds; inf for a failed evaluation):
        the drop's excess over the tolerance in tolerances plus each budget's relative excess.
    uncertain: why the data do not settle it (the drop's interval crosses the tolerance, a
        latency within its timing noise of the limit); empty when settled.
    """

    holds: bool
    misses: tuple[str, ...] = ()
    excess: float = 0.0
    uncertain: tuple[str, ...] = ()


@dataclass(frozen=True)
class Feasibility:
    """The question's constraints: the tolerated drop and every budget.

    Args:
        max_drop: the tolerance (points, or relative to the baseline).
        budgets: cost limits; the first is the primary cost.
        slack_pp: pp a drop may exceed the tolerance by and still hold (float rounding).
    """

    max_drop: MaxDrop
    budgets: tuple[Budget, ...]
    slack_pp: float = BOUNDARY_SLACK_PP

    def __post_init__(self) -> None:
        object.__setattr__(self, "budgets", tuple(self.budgets))

    @property
    def primary(self) -> Budget | None:
        return self.budgets[0] if self.budgets else None

    def allowed_pp(self, baseline_accuracy: float) -> float:
        """Tolerated drop (pp) against a baseline of this accuracy (a fraction)."""
        return self.max_drop.allowed_pp(baseline_accuracy)

    def drop_excess_pp(self, drop_pp: float | None, baseline_accuracy: float) -> float:
        """pp by which ``drop_pp`` exceeds the tolerance; <= 0 when it holds (a drop within
        the slack of the tolerance counts as at it); inf when unknown."""
        if drop_pp is None or not math.isfinite(drop_pp):
            return math.inf
        e = drop_pp - self.allowed_pp(baseline_accuracy)
        return e if e > self.slack_pp else min(e, 0.0)

    def budget_excess(self, b: Budget, costs: Mapping[str, Any]) -> float:
        """Relative excess of ``costs`` over budget ``b``; <= 0 when it holds."""
        v = b.violation(costs)
        return v if v > BUDGET_SLACK else min(v, 0.0)

    def budgets_hold(self, costs: Mapping[str, Any]) -> bool:
        return all(self.budget_excess(b, costs) <= 0 for b in self.budgets)

    def constraint_values(self, drop_pp: float | None, costs: Mapping[str, Any],
                          baseline_accuracy: float) -> list[float]:
        """Optuna's constraint values (<= 0 satisfied): the drop's excess in tolerances (at
        least :data:`MIN_DROP_SCALE_PP`), then each budget's relative excess. <= 0 on every
        value exactly when :meth:`verdict` holds."""
        scale = max(self.allowed_pp(baseline_accuracy), MIN_DROP_SCALE_PP)
        return [self.drop_excess_pp(drop_pp, baseline_accuracy) / scale] + [
            self.budget_excess(b, costs) for b in self.budgets]

    def verdict(self, ev: Any, baseline_accuracy: float | None) -> Verdict:
        """The verdict on an evaluation (:class:`recommender.evaluation.Evaluation`, or its
        dict) against a baseline of ``baseline_accuracy`` (None: no baseline, never holds)."""
        get = ev.get if isinstance(ev, Mapping) else (lambda k, d=None: getattr(ev, k, d))
        if not get("ok", True) or get("accuracy") is None:
            return Verdict(False, (str(get("reason") or "failed"),), math.inf)
        if baseline_accuracy is None:
            return Verdict(False, ("no baseline to measure the drop against",), math.inf)
        costs = get("costs") or {}
        drop, lo, hi = get("drop_pp"), get("drop_low_pp"), get("drop_high_pp")
        allowed = self.allowed_pp(baseline_accuracy)
        misses, uncertain = [], []
        drop_excess = self.drop_excess_pp(drop, baseline_accuracy)
        excess = 0.0
        if drop_excess > 0:
            misses.append(f"drop {drop:+.2f} pp > {allowed:g} pp" if drop is not None else "drop unknown")
            excess += drop_excess / max(allowed, MIN_DROP_SCALE_PP)
        for b in self.budgets:
            v = self.budget_excess(b, costs)
            if v > 0:
                misses.append(f"{b.metric} {format_quantity(b.value(costs), b.unit)} > "
                              f"{format_quantity(b.limit, b.unit)}")
                excess += v
            if b.within_noise(costs):
                uncertain.append(f"{b.metric} {format_quantity(b.value(costs), b.unit)} is within its "
                                 f"measurement noise of the {format_quantity(b.limit, b.unit)} limit")
        if lo is not None and hi is not None:
            if drop_excess <= 0 and self.drop_excess_pp(hi, baseline_accuracy) > 0:
                uncertain.insert(0, f"the drop's 95% interval [{lo:+.1f}, {hi:+.1f}] pp crosses the "
                                    f"{allowed:g} pp tolerance")
            elif drop_excess > 0 and self.drop_excess_pp(lo, baseline_accuracy) <= 0:
                uncertain.insert(0, f"the drop's 95% interval [{lo:+.1f}, {hi:+.1f}] pp reaches into the "
                                    f"{allowed:g} pp tolerance")
        return Verdict(not misses, tuple(misses), excess, tuple(uncertain))

    def might_hold(self, ev: Any, baseline_accuracy: float | None) -> bool:
        """Worth measuring again at a higher fidelity: it ran, every budget holds (costs do not
        change with the fidelity) and its drop's interval reaches into the tolerance."""
        get = ev.get if isinstance(ev, Mapping) else (lambda k, d=None: getattr(ev, k, d))
        if not get("ok", True) or get("accuracy") is None or baseline_accuracy is None:
            return False
        if not self.budgets_hold(get("costs") or {}):
            return False
        low = get("drop_low_pp")
        low = get("drop_pp") if low is None else low
        return low is None or self.drop_excess_pp(low, baseline_accuracy) <= 0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {"max_drop": asdict(self.max_drop), "budgets": [b.to_dict() for b in self.budgets],
                "slack_pp": self.slack_pp}


def chance_level(accuracy: float, acc_low: float, num_classes: int | None) -> str | None:
    """Why a baseline is indistinguishable from guessing (its 95 % interval reaches 1 / classes),
    or None. Candidates measured against such a baseline say nothing about the tolerance."""
    if not num_classes or num_classes < 2:
        return None
    chance = 1.0 / num_classes
    if min(acc_low, accuracy) > chance:
        return None
    return (f"the baseline ({100 * accuracy:.2f}%, 95% interval from {100 * acc_low:.1f}%) is not "
            f"distinguishable from chance ({100 * chance:.1f}% on {num_classes} classes): drops measured "
            "against it say nothing about the tolerance")


@dataclass(frozen=True)
class Power:
    """What the validation set of one rung can resolve.

    n_val: validation images; baseline_accuracy: a fraction; min_resolvable_drop_pp: the 95 %
    half-width of a paired drop before any candidate (errors independent of the baseline's,
    :func:`recommender.stats.min_resolvable_drop`); measured_pp: the median half-width of the
    candidates' drop intervals at this rung (None: none measured); tolerance_pp: the allowed drop.
    """

    n_val: int
    baseline_accuracy: float
    min_resolvable_drop_pp: float
    tolerance_pp: float
    measured_pp: float | None = None
    rung: int = 0
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def at(cls, n_val: int, baseline_accuracy: float, tolerance_pp: float,
           half_widths: Sequence[float] = (), rung: int = 0) -> "Power":
        widths = sorted(w for w in half_widths if w is not None and math.isfinite(w))
        measured = widths[len(widths) // 2] if widths else None
        return cls(n_val, baseline_accuracy, round(min_resolvable_drop(n_val, baseline_accuracy), 3),
                   tolerance_pp, None if measured is None else round(measured, 3), rung)

    @property
    def resolves(self) -> bool:
        """Whether drops within the tolerance can be told from drops beyond it: both the
        expected and the measured resolution are within the tolerance."""
        return self.min_resolvable_drop_pp <= self.tolerance_pp and (
            self.measured_pp is None or self.measured_pp <= self.tolerance_pp)

    def sentence(self) -> str | None:
        """One sentence when the validation set cannot resolve the tolerance, else None; it
        names which figure is wider than the tolerance."""
        if self.resolves:
            return None
        tol = self.tolerance_pp
        expected = f"±{self.min_resolvable_drop_pp:.1f} pp expected"
        measured = "" if self.measured_pp is None else f", ±{self.measured_pp:.1f} pp measured on the candidates"
        wide = [name for name, v in (("expected", self.min_resolvable_drop_pp), ("measured", self.measured_pp))
                if v is not None and v > tol]
        which = " and ".join(wide)
        return (f"Power: at rung {self.rung}, {self.n_val} validation images at a {100 * self.baseline_accuracy:.1f}% "
                f"baseline resolve drops of {expected}{measured}; the {which} resolution is wider than the "
                f"{tol:g} pp tolerance, so this data cannot establish 'within {tol:g} pp' (use more validation "
                "images, a higher fidelity or --checkpoint).")

    def to_dict(self) -> dict[str, Any]:
        return {"rung": self.rung, "n_val": self.n_val, "baseline_accuracy": self.baseline_accuracy,
                "min_resolvable_drop_pp": self.min_resolvable_drop_pp, "measured_pp": self.measured_pp,
                "tolerance_pp": self.tolerance_pp, "resolves": self.resolves,
                "assumption": "errors independent of the baseline's"}
