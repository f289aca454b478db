"""One Optuna trial: sample a recipe, pre-check its structure, evaluate it, store everything.

Objectives: maximise accuracy (fraction), minimise the primary cost (the first budget's metric).
Constraints (``trial.set_constraint``, <= 0 is feasible): the drop against the baseline over the
tolerance, then every budget's relative excess. Every trial stores its recipe, evaluation and
constraint values as user attributes, so ``recommend show`` and the dashboard can explain it.

Before any training, the candidate's *structure* is measured and its compression methods' best
case estimated (:mod:`recommender.search.structure`), and its proxy training time estimated from
two timed steps. What to do with a structure that breaks a budget is the *structure policy*:

- ``resample`` (default): the sampler never proposes it. The study's sampler is wrapped in a
  :class:`~recommender.search.sampling.FeasibleSampler` that drafts whole candidates and draws
  again (up to ``max_draws``) until one passes the pre-check; rejected drafts are not trials.
  A candidate estimated to train longer than the trial time limit, or whose architecture cannot
  be built, is redrawn the same way.
- ``constraint``: the candidate becomes a COMPLETE trial without training, whose constraint
  values are its known structural excess, so a constrained sampler learns where the budget
  lies. Such a trial carries the user attribute ``skipped_by_structure`` (the reason), has no
  ``evaluation``, does not count towards ``--trials`` (:func:`~recommender.search.recovery.counts_toward_target`) and is not a
  candidate of the report.

Measured in ``benchmarks/search_efficiency.py`` (docs/measurements.md): see there for why
``resample`` is the default.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import optuna

from ..constraints import Budget, MaxDrop
from ..errors import ArchError, UnknownNameError
from ..evaluation import Baseline, Evaluation, Evaluator
from ..feasibility import Feasibility
from ..models.arch import ArchConfig
from ..recipe import Recipe
from .sampling import FeasibleSampler
from .space import SearchSpace
from .recovery import SKIPPED_ATTR, mark_interrupted
from .structure import STRUCTURAL, StructureCheck, check_structure

STRUCTURE_POLICIES = ("resample", "constraint")
DEFAULT_STRUCTURE_POLICY = "resample"
#: Budget excess recorded, under the ``constraint`` policy, for an architecture that cannot be
#: built (its costs are unknown): as if it were twice the limit of every budget.
INVALID_EXCESS = 1.0

#: A trial estimated within the time limit is stopped (failed) at this multiple of it: the
#: estimate is a two-step timing, the limit a hard bound on the whole evaluation.
HARD_LIMIT_FACTOR = 1.5

_ATTACH_LOCK = threading.Lock()
#: User attribute of a trial whose every draft was rejected before training (what the closest
#: drafts were); a few such trials in a row stop the search (Search.optimize).
NO_FIT_ATTR = "no_draft_fits"
#: Study attribute with the trained baseline's layers that matter (per-layer pruning and int8
#: sensitivity summaries), set once a candidate has measured them.
SENSITIVITY_ATTR = "layers_that_matter"


class TrialFailed(Exception):
    """A candidate that could not be trained, compressed or evaluated; the study goes on."""


@dataclass(frozen=True)
class Verdict:
    """Why a candidate is not trained: ``kind`` is ``invalid`` (the architecture cannot be
    built), ``structure`` (its best case breaks a budget) or ``time`` (its proxy training is
    estimated over the trial time limit); ``short`` is a label for counting rejected drafts."""

    kind: str
    reason: str
    short: str
    check: StructureCheck | None = None


def objective_values(ev: Evaluation | dict, primary: Budget) -> tuple[float, float]:
    """A study's objective values of a successful evaluation (or of one stored on a trial, its
    ``evaluation`` user attribute): (accuracy as a fraction, the primary budget's cost in its own
    unit: params, MFLOPs, MB or ms)."""
    if isinstance(ev, dict):
        ev = Evaluation.from_dict(ev)
    return float(ev.accuracy), primary.value(ev.costs)


@dataclass
class Objective:
    """Callable objective for :meth:`optuna.Study.optimize`.

    Args:
        evaluator, space, baseline, max_drop, budgets: what a trial samples and measures.
        max_trial_seconds: skip a candidate whose proxy training is estimated (two timed steps)
            to take longer than this many seconds, and longer than ``max_trial_scale`` times the
            baseline architecture's estimate; None: no time limit.
        structure_policy: ``resample`` or ``constraint`` (module docstring).
        max_draws: drafts per trial under ``resample`` before the trial takes what it got.
        max_trial_scale: the time limit is raised to this multiple of the baseline
            architecture's estimated proxy training time at this dataset and resolution, so a
            candidate no slower to train than the baseline is never skipped for time (a fixed
            limit tuned on 8 px digits skips everything at 32 px); None: ``max_trial_seconds``
            alone.
        seed: seeds the random drafts of ``resample`` (None: unseeded).
        gate: ``gate(trial)`` -> a reason not to run this trial at all (it is pruned, not
            counted), e.g. other workers' running trials already complete the study.
        stop_at: ``stop_at()`` -> the ``time.monotonic()`` at which the run's time budget for
            the search ends (``--timeout`` less what the promotions need), or None. A trial
            still training then is stopped, marked interrupted and queued again (it does not
            count, and a resumed run evaluates it), so ``--timeout`` bounds the run.
    """

    evaluator: Evaluator
    space: SearchSpace
    baseline: Baseline
    max_drop: MaxDrop
    budgets: list[Budget]
    max_trial_seconds: float | None = None
    structure_policy: str = DEFAULT_STRUCTURE_POLICY
    max_draws: int = 64
    max_trial_scale: float | None = 1.0
    seed: int | None = None
    gate: Callable[[optuna.Trial], str | None] | None = None
    stop_at: Callable[[], float | None] | None = None
    _verdicts: dict[str, Verdict | None] = field(default_factory=dict, init=False, repr=False)
    _seconds: dict[str, float | None] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.structure_policy not in STRUCTURE_POLICIES:
            raise UnknownNameError("structure policy", self.structure_policy, STRUCTURE_POLICIES)

    @property
    def constraint_names(self) -> list[str]:
        return ["max_drop"] + [f"budget_{b.metric}" for b in self.budgets]

    @property
    def primary(self) -> Budget:
        return self.budgets[0]

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        if self.gate is not None:
            why = self.gate(trial)
            if why:
                trial.set_user_attr("pruned_reason", why)
                raise optuna.TrialPruned(why)
        if self.structure_policy == "resample":
            self.attach(trial.study)
        recipe = self.space.sample(trial)
        trial.set_user_attr("recipe", recipe.to_dict())
        trial.set_user_attr("describe", recipe.describe())
        sampler = trial.study.sampler
        rejected: list[str] = []
        if isinstance(sampler, FeasibleSampler):
            rejected = sampler.pop_rejections(trial.number)
            if rejected:
                trial.set_user_attr("rejected_draws", dict(Counter(rejected)))
        verdict = self.verdict(recipe)
        if verdict is None:
            limit = self.time_limit()
            deadline = time.monotonic() + HARD_LIMIT_FACTOR * limit if limit else None
            stop = self.stop_at() if self.stop_at is not None else None
            if stop is not None and (deadline is None or stop < deadline):
                deadline = stop
            ev = self.evaluator.evaluate(recipe, self.baseline, self.max_drop, deadline=deadline)
            if not ev.ok and stop is not None and time.monotonic() >= stop:
                self.out_of_time(trial)
            return self.record(trial, ev)
        if verdict.kind != "time" and self.structure_policy == "constraint":
            return self.skip(trial, verdict)
        if verdict.kind == "invalid":  # a combination the builder rejects: recorded, the study goes on
            trial.set_user_attr("fail_reason", verdict.reason)
            raise TrialFailed(verdict.reason)
        enqueued = "fixed_params" in trial.study._storage.get_trial_system_attrs(trial._trial_id)
        if rejected and not enqueued:
            # Every draft was rejected: a trial the user sees, counted towards --trials, and a
            # sign that the budget may be out of reach (Search stops after a few in a row).
            why = f"none of {len(rejected)} drafts fits ({verdict.reason})"
            trial.set_user_attr(NO_FIT_ATTR, {"drafts": len(rejected), "closest": self.closest_drafts()})
            trial.set_user_attr("fail_reason", why)
            raise TrialFailed(why)
        # Under resample: the parameters were enqueued (a preset) and are not worth training.
        trial.set_user_attr("pruned_reason", verdict.reason)
        raise optuna.TrialPruned(verdict.reason)

    def closest_drafts(self, n: int = 3) -> list[dict]:
        """The ``n`` drafts seen so far whose structure missed the budgets least (the sum of
        their relative excesses): recipe, best-case costs, excess per budget."""
        seen = [(key, v) for key, v in self._verdicts.items() if v is not None and v.kind == "structure" and v.check]
        seen.sort(key=lambda kv: sum(max(0.0, x) for x in kv[1].check.excess.values()))
        return [{"recipe": json.loads(key), "describe": Recipe.from_json(key).describe(),
                 "costs": v.check.costs.as_costs(), "excess": dict(v.check.violations)} for key, v in seen[:n]]

    def out_of_time(self, trial: optuna.Trial) -> None:
        """The run's time budget ended this trial's evaluation: interrupted and queued again
        (not a failed candidate; a resumed run evaluates it). Raises :class:`TrialFailed`."""
        why = "stopped at the end of the time budget (--timeout) before its evaluation finished; queued again"
        mark_interrupted(trial, why)
        raise TrialFailed(why)

    def record(self, trial: optuna.Trial, ev: Evaluation) -> tuple[float, float]:
        if ev.ok:  # constraints before the evaluation: a stored evaluation is a finished trial
            self._set_constraints(trial, self.feasibility.constraint_values(ev.drop_pp, ev.costs,
                                                                           self.baseline.accuracy))
        trial.set_user_attr("evaluation", ev.to_dict())
        self._record_sensitivity(trial)
        if not ev.ok:
            trial.set_user_attr("fail_reason", ev.reason)
            raise TrialFailed(ev.reason)
        return self.values(ev)

    def _record_sensitivity(self, trial: optuna.Trial) -> None:
        """The trained baseline's layers that matter, on the study once a candidate has measured
        them (every output reads them from there)."""
        layers = self.evaluator.layers_that_matter()
        study = getattr(trial, "study", None)
        if layers and study is not None and any(study.user_attrs.get(SENSITIVITY_ATTR, {}).get(k) != v
                                                for k, v in layers.items()):
            study.set_user_attr(SENSITIVITY_ATTR, {**study.user_attrs.get(SENSITIVITY_ATTR, {}), **layers})

    @cached_property
    def feasibility(self) -> Feasibility:
        """The question's one feasibility predicate (its constraint values go to Optuna)."""
        return Feasibility(self.max_drop, tuple(self.budgets))

    def values(self, ev: Evaluation) -> tuple[float, float]:
        """The objective values of a successful evaluation: (accuracy, primary cost)."""
        return objective_values(ev, self.primary)

    def values_from_dict(self, ev: dict) -> tuple[float, float]:
        """:meth:`values` of an evaluation stored on a trial (``evaluation`` user attribute)."""
        return objective_values(ev, self.primary)

    def skip(self, trial: optuna.Trial, verdict: Verdict) -> tuple[float, float]:
        """``constraint`` policy: complete the trial untrained with its structural excess as
        the budget constraints. The drop constraint is 0 (unknown, not violated), the accuracy
        the baseline's (TPE and NSGA-II ignore an infeasible trial's values; the GP sampler fits
        them, and the baseline's accuracy, what a model this large can reach, does not pull
        its accuracy model down around the budget), the cost the best case's."""
        excess = verdict.check.excess if verdict.check is not None else {}
        cons = [0.0] + [INVALID_EXCESS if verdict.kind == "invalid" else excess.get(b.describe(), 0.0)
                        for b in self.budgets]
        trial.set_user_attr(SKIPPED_ATTR, verdict.reason)
        self._set_constraints(trial, cons)
        return float(self.baseline.accuracy), self._skip_cost(verdict)

    def _skip_cost(self, verdict: Verdict) -> float:
        p = self.primary
        if verdict.check is not None and p.metric in STRUCTURAL and p.describe() in verdict.check.excess:
            return p.value(verdict.check.costs.as_costs())
        base = self.baseline.costs.get(p.cost_field)
        return float(base) if base is not None else p.limit * (1 + INVALID_EXCESS)

    def _set_constraints(self, trial: optuna.Trial, cons: list[float]) -> None:
        trial.set_user_attr("constraints", cons)
        # Optuna >= 5: samplers read feasibility from the trial's own constraints.
        for name, value in zip(self.constraint_names, cons):
            trial.set_constraint(name, value)

    # -- the pre-check -----------------------------------------------------------------------
    def attach(self, study: optuna.Study) -> FeasibleSampler:
        """Wrap the study's sampler (once) so that it proposes only candidates that pass
        :meth:`verdict` (the ``resample`` policy); returns the wrapper."""
        with _ATTACH_LOCK:
            current = study.sampler
            if isinstance(current, FeasibleSampler) and current.check == self.draft_check:
                return current
            base = current.base if isinstance(current, FeasibleSampler) else current
            study.sampler = FeasibleSampler(base, self.space.distributions(), self.space.sample, self.draft_check,
                                            max_draws=self.max_draws, seed=self.seed)
            return study.sampler

    def draft_check(self, recipe: Recipe) -> str | None:
        """None for a draft worth training, else a short label of why not."""
        v = self.verdict(recipe)
        return None if v is None else v.short

    def verdict(self, recipe: Recipe) -> Verdict | None:
        """Why ``recipe`` is not worth training (None: train it); memoised per recipe."""
        key = recipe.to_json(sort_keys=True)
        if key not in self._verdicts:
            self._verdicts[key] = self._verdict(recipe)
        return self._verdicts[key]

    def _verdict(self, recipe: Recipe) -> Verdict | None:
        ev = self.evaluator
        try:
            check = check_structure(ev.model_name, ev.data.num_classes, recipe, self.budgets, ev.input_size)
        except ArchError as exc:
            return Verdict("invalid", f"invalid architecture: {exc}", "invalid architecture")
        if not check.feasible:
            return Verdict("structure", check.reason(), "breaks " + ", ".join(check.violations), check)
        limit = self.time_limit()
        if limit:
            est = self._train_seconds(recipe.arch)
            if est is not None and est > limit:
                return Verdict("time", f"proxy training too slow: estimated {est:.0f} s > {limit:.0f} s per trial "
                               "(--max-trial-time)", "proxy training too slow", check)
        return None

    def _train_seconds(self, arch: ArchConfig) -> float | None:
        key = arch.to_json(sort_keys=True)
        if key not in self._seconds:
            self._seconds[key] = self.evaluator.estimate_train_seconds(arch)
        return self._seconds[key]

    def time_limit(self) -> float | None:
        """Seconds of estimated proxy training above which a candidate is skipped (None: no
        limit): ``max_trial_seconds``, raised to ``max_trial_scale`` times the baseline
        architecture's estimate, measured once, the same way, on this dataset and resolution."""
        if not self.max_trial_seconds:
            return None
        if self.max_trial_scale is None:
            return self.max_trial_seconds
        ref = self._baseline_arch_seconds
        return max(self.max_trial_seconds, self.max_trial_scale * ref) if ref else self.max_trial_seconds

    @cached_property
    def _baseline_arch_seconds(self) -> float | None:
        # measured once per objective (per worker), the same way as every candidate's estimate
        return self.evaluator.estimate_train_seconds(ArchConfig(), always=True)

