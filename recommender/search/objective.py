"""One Optuna trial: sample a recipe, pre-check its structure, evaluate it, store everything.

Objectives: maximise accuracy (fraction), minimise the primary cost (the first budget's metric).
Constraints (Optuna's ``constraints_func``, <= 0 is feasible): the drop against the baseline over
the tolerance, then every budget's relative excess. Every trial stores its recipe, evaluation and
constraint values as user attributes, so ``recommend show`` and the dashboard can explain it.

Before any training, the candidate's *structure* is measured and its compression methods' best
case estimated (:mod:`recommender.search.structure`): a recipe whose best case already breaks a
budget is skipped in seconds instead of trained for minutes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import optuna

from ..constraints import Budget, MaxDrop
from ..errors import ArchError
from ..evaluation import Baseline, Evaluation, Evaluator
from ..recipe import Recipe
from .space import SearchSpace
from .structure import check_structure


#: A trial estimated within ``max_trial_seconds`` is stopped (failed) at this multiple of it: the
#: estimate is a two-step timing, the limit a hard bound on the whole evaluation.
HARD_LIMIT_FACTOR = 1.5


class TrialFailed(Exception):
    """A candidate that could not be trained, compressed or evaluated; the study goes on."""


@dataclass
class Objective:
    """Callable objective for :meth:`optuna.Study.optimize`."""

    evaluator: Evaluator
    space: SearchSpace
    baseline: Baseline
    max_drop: MaxDrop
    budgets: list[Budget]
    max_trial_seconds: float | None = None
    #: ``gate(trial)`` -> a reason not to run this trial at all (it is pruned, not counted)
    gate: Callable[[optuna.Trial], str | None] | None = None

    @property
    def constraint_names(self) -> list[str]:
        return ["max_drop"] + [f"budget_{b.metric}" for b in self.budgets]

    @property
    def primary(self) -> Budget:
        return self.budgets[0]

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        if self.gate is not None:
            why = self.gate(trial)
            if why:  # e.g. other workers' running trials already complete the study
                trial.set_user_attr("pruned_reason", why)
                raise optuna.TrialPruned(why)
        recipe = self.space.sample(trial)
        trial.set_user_attr("recipe", recipe.to_dict())
        trial.set_user_attr("describe", recipe.describe())
        try:
            verdict = self.precheck(recipe)
        except ArchError as exc:  # a combination the builder rejects: recorded, the study goes on
            trial.set_user_attr("fail_reason", f"invalid architecture: {exc}")
            raise TrialFailed(str(exc)) from None
        if verdict:
            trial.set_user_attr("pruned_reason", verdict)
            raise optuna.TrialPruned(verdict)
        deadline = (time.monotonic() + HARD_LIMIT_FACTOR * self.max_trial_seconds) if self.max_trial_seconds else None
        ev = self.evaluator.evaluate(recipe, self.baseline, self.max_drop, deadline=deadline)
        return self.record(trial, ev)

    def record(self, trial: optuna.Trial, ev: Evaluation) -> tuple[float, float]:
        trial.set_user_attr("evaluation", ev.to_dict())
        if not ev.ok:
            trial.set_user_attr("fail_reason", ev.reason)
            raise TrialFailed(ev.reason)
        cons = ev.constraint_values(self.max_drop, self.budgets, self.baseline.accuracy)
        trial.set_user_attr("constraints", cons)
        # Optuna >= 5: samplers read feasibility from the trial's own constraints.
        for name, value in zip(self.constraint_names, cons):
            trial.set_constraint(name, value)
        return self.values(ev)

    def values(self, ev: Evaluation) -> tuple[float, float]:
        """The objective values of a successful evaluation: (accuracy, primary cost)."""
        return float(ev.accuracy), self.primary.value(ev.costs)

    def values_from_dict(self, ev: dict) -> tuple[float, float]:
        """:meth:`values` of an evaluation stored on a trial (``evaluation`` user attribute)."""
        return self.values(Evaluation.from_dict(ev))

    def precheck(self, recipe: Recipe) -> str | None:
        """A reason to skip training: the structure's best case breaks a budget, or the proxy
        training would take longer than ``max_trial_seconds``."""
        ev = self.evaluator
        check = check_structure(ev.model_name, ev.data.num_classes, recipe, self.budgets, ev.input_size)
        if not check.feasible:
            return check.reason()
        if self.max_trial_seconds:
            est = ev.estimate_train_seconds(recipe.arch)
            if est is not None and est > self.max_trial_seconds:
                return (f"proxy training too slow: estimated {est:.0f} s > {self.max_trial_seconds:.0f} s "
                        "per trial (--max-trial-time)")
        return None

