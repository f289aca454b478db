"""The smallest costs a search space can reach: a budget below them is refused before any work.

For each structural budget (params, non-zero params, MFLOPs, size) the search looks for the
space's point whose best case (the structure on the meta device and each compression method's
quick lower bound, :func:`~recommender.search.structure.quick_best_case`) is lowest, by
coordinate descent: every dimension in turn takes each of its values (a numeric range: its
grid, or its ends) and keeps the lowest, until a pass changes nothing, restarted from each value
of every dimension that others depend on (the block type decides which widths exist). Each
point costs tens of milliseconds; the search stops early at the first point within the budget
(the budget is then reachable, and nothing more is needed).

What it finds is a *lower* bound of the candidates' costs (the methods' quick bounds are below
what they reach), at the point a local search finds lowest: a region the descent never enters
could hold a smaller point, and the refusal would then be wrong; on the bundled spaces every
restart ends at the same few points. A budget below the floor divided by :data:`MARGIN` is
refused up front (exit 1); a budget above it that no draft meets still ends: the search stops
after a few trials whose drafts all break it (:mod:`recommender.search.study`), reporting this
floor and the closest drafts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from ..constraints import Budget, format_quantity
from ..errors import ArchError, RecommenderError
from ..recipe import Recipe
from .space import Dimension, SearchSpace
from .structure import STRUCTURAL, quick_best_case, structure

__all__ = ["Floor", "space_floor", "MARGIN", "BudgetBelowFloor"]

#: A budget is refused up front below floor / MARGIN (see the module docstring).
MARGIN = 1.0
#: Values tried for a numeric dimension whose grid is longer than this: its ends and middle.
MAX_GRID = 16
#: Passes of the descent from one start.
MAX_PASSES = 4


class BudgetBelowFloor(RecommenderError):
    """A budget below the smallest cost the search space reaches: nothing can be trained to fit
    it (exit 1, like a search that found nothing feasible)."""

    exit_code = 1


@dataclass
class Floor:
    """The lowest best case found for one budget: ``value`` in the budget's unit (count, MFLOPs,
    MB), the point reaching it (``recipe``), whether the budget was met (``reached``: the search
    stopped there) and how many points were measured."""

    budget: Budget
    value: float
    recipe: Recipe | None
    reached: bool
    points: int

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget.describe(), "metric": self.budget.metric, "unit": self.budget.unit,
                "value": self.value, "limit": self.budget.limit, "reached": self.reached,
                "recipe": self.recipe.to_dict() if self.recipe else None,
                "describe": self.recipe.describe() if self.recipe else None, "points": self.points}

    def describe(self) -> str:
        """``4.21k params (best case of <recipe>)``."""
        return f"{format_quantity(self.value, self.budget.unit)}" + (
            f" (best case of {self.recipe.describe()})" if self.recipe else "")


def _values(dim: Dimension) -> list[Any]:
    if dim.fixed:
        return [dim.value]
    if dim.choices is not None:
        return list(dim.choices)
    lo, hi = dim.low, dim.high
    if dim.step:
        n = int(math.floor((hi - lo) / dim.step + 1e-9)) + 1
        if n <= MAX_GRID:
            grid = [lo + i * dim.step for i in range(n)]
            return [int(round(v)) for v in grid] if dim.is_int else [round(v, 12) for v in grid]
        mid = lo + dim.step * ((n - 1) // 2)
        return [int(v) for v in (lo, mid, lo + dim.step * (n - 1))] if dim.is_int else [lo, mid, lo + dim.step * (n - 1)]
    return [int(lo), int(hi)] if dim.is_int else [float(lo), float(hi)]


class _Descent:
    """Coordinate descent of one budget's metric over a space (see the module docstring)."""

    def __init__(self, space: SearchSpace, model: str, num_classes: int, input_size: tuple[int, ...],
                 budget: Budget, stop_when_reached: bool = True):
        self.space, self.model, self.num_classes, self.input_size = space, model, num_classes, tuple(input_size)
        self.budget = budget
        self.stop_when_reached = stop_when_reached
        self.flops = budget.metric == "flops"
        self.memo: dict[str, tuple[float, Recipe | None]] = {}
        self.best = (math.inf, None)

    def realise(self, prefs: dict[str, Any]) -> dict[str, Any]:
        """The active assignment the preferred values give (inactive dimensions dropped)."""
        assigned: dict[str, Any] = {}
        for dim in self.space.dimensions:
            if dim.active(assigned):
                assigned[dim.key] = prefs[dim.key]
        return assigned

    def cost(self, prefs: dict[str, Any]) -> float:
        assigned = self.realise(prefs)
        key = repr(sorted(assigned.items()))
        if key not in self.memo:
            self.memo[key] = self._measure(assigned)
            value, recipe = self.memo[key]
            if value < self.best[0]:
                self.best = (value, recipe)
        return self.memo[key][0]

    def _measure(self, assigned: dict[str, Any]) -> tuple[float, Recipe | None]:
        try:
            recipe = self.space.recipe(assigned)
            net, costs, _ = structure(self.model, self.num_classes, recipe.arch, self.input_size, self.flops)
            low, unbounded, _ = quick_best_case(net, costs, recipe, self.input_size)
        except (ArchError, RecommenderError):
            return math.inf, None  # a combination this model cannot build
        except Exception:  # a structure the shape counter cannot run: not a point of the floor
            return math.inf, None
        if self.budget.metric in unbounded:
            return 0.0, recipe  # a method lowers it without a bound: no floor
        v = self.budget.value(low.as_costs())
        return (math.inf if v is None else float(v)), recipe

    def reached(self) -> bool:
        return self.stop_when_reached and self.best[0] <= self.budget.limit

    def run(self, starts: Iterable[dict[str, Any]]) -> None:
        for prefs in starts:
            prefs = dict(prefs)
            current = self.cost(prefs)
            for _ in range(MAX_PASSES):
                changed = False
                for dim in self.space.dimensions:
                    if dim.fixed or dim.key not in self.realise(prefs):
                        continue
                    for v in _values(dim):
                        if v == prefs[dim.key]:
                            continue
                        trial = {**prefs, dim.key: v}
                        c = self.cost(trial)
                        if c < current:
                            prefs, current, changed = trial, c, True
                        if self.reached():
                            return
                if not changed:
                    break


def _starts(space: SearchSpace) -> list[dict[str, Any]]:
    first = {d.key: _values(d)[0] for d in space.dimensions}
    parents = {p for d in space.dimensions for p, _ in d.when}
    out = [first]
    for d in space.dimensions:
        if d.key in parents and not d.fixed:
            out += [{**first, d.key: v} for v in _values(d)[1:]]
    return out


def space_floor(space: SearchSpace, model: str, num_classes: int, input_size: tuple[int, ...],
                budgets: list[Budget], *, stop_when_reached: bool = True) -> list[Floor]:
    """The lowest best case found (module docstring) for each structural budget of ``budgets``;
    with ``stop_when_reached`` a budget's search ends at its first point within it."""
    out = []
    for b in budgets:
        if b.metric not in STRUCTURAL:
            continue
        d = _Descent(space, model, num_classes, input_size, b, stop_when_reached)
        d.run(_starts(space))
        out.append(Floor(b, d.best[0], d.best[1], d.best[0] <= b.limit, len(d.memo)))
    return out


def refuse_below_floor(floors: list[Floor]) -> None:
    """Raise :class:`BudgetBelowFloor` for the first budget below its floor / :data:`MARGIN`."""
    for f in floors:
        if not f.reached and math.isfinite(f.value) and f.budget.limit < f.value / MARGIN:
            raise BudgetBelowFloor(
                f"budget {f.budget.text or f.budget.describe()} is below the smallest {f.budget.metric} this "
                f"search space reaches, {f.describe()}: nothing can be trained to fit it (raise the budget, "
                "or give a --space with smaller architectures)")
