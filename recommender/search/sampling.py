"""Which candidate is proposed next: the samplers, and a wrapper that proposes only candidates a
cheap check accepts.

``make_sampler`` builds a sampler by name. Every sampler reads feasibility from the trials' own
constraint values (``trial.set_constraint``, Optuna >= 5): TPE puts infeasible trials in its
"bad" group ranked by total violation (their objective values are ignored), NSGA-II ranks them
below every feasible trial by total violation, and the GP sampler fits one GP per constraint and
multiplies the expected hypervolume improvement by the probability of feasibility (it fits its
objective GPs to the infeasible trials' values too).

:class:`FeasibleSampler` wraps any of them: it drafts a trial's whole parameter set the way
``optuna.Trial`` would (the sampler's relative sample, then its independent samples), asks a
predicate whether the draft is acceptable, and draws again if not. Rejected drafts never become
trials: the study's trial count, the report and the sampler's history hold trained candidates
only. Why a draft was rejected is kept per trial (:meth:`FeasibleSampler.pop_rejections`).
"""

from __future__ import annotations

import hashlib

import json
import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import optuna
from optuna.distributions import (BaseDistribution, CategoricalDistribution, FloatDistribution,
                                  IntDistribution, check_distribution_compatibility)
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

from ..errors import UnknownNameError

__all__ = ["SAMPLERS", "SamplerSettings", "make_sampler", "FeasibleSampler", "Draft"]

SAMPLERS = ("tpe", "nsga2", "gp", "random")


@dataclass(frozen=True)
class SamplerSettings:
    """Named settings of the built-in samplers.

    Args:
        tpe_startup_trials: random trials before TPE starts modelling.
        tpe_multivariate: one joint density over the parameters (grouped by the conditional
            structure of the space, ``group=True``) instead of one density per parameter.
        nsga2_population: NSGA-II's generation size.
        gp_startup_trials: random trials before the GP sampler starts modelling.
    """

    tpe_startup_trials: int = 8
    tpe_multivariate: bool = True
    nsga2_population: int = 12
    gp_startup_trials: int = 10


def make_sampler(name: str, seed: int | None, settings: SamplerSettings = SamplerSettings()
                 ) -> optuna.samplers.BaseSampler:
    """The sampler ``name`` (``tpe``, ``nsga2``, ``gp``, ``random``), seeded (None: unseeded).
    Constraints reach it through ``trial.set_constraint``."""
    s = settings
    if name == "tpe":
        # ``group`` warns that it is experimental; the CLI filters that warning, a library
        # function leaves the caller's warning filters alone
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.tpe_startup_trials,
                                          multivariate=s.tpe_multivariate, group=s.tpe_multivariate)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=s.nsga2_population)
    if name == "gp":
        # Conditional dimensions (absent from some trials) fall outside the GP's intersection
        # search space and are drawn at random; that is expected here, not worth a warning.
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=s.gp_startup_trials,
                                         warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise UnknownNameError("sampler", name, SAMPLERS)


class Draft:
    """A stand-in for ``optuna.Trial`` that records what a sampler would suggest, without
    touching the study: fixed (enqueued) values first, then the sampler's relative sample, then
    its independent samples, as ``optuna.Trial._suggest`` does."""

    def __init__(self, study: Study, trial: FrozenTrial, sampler: BaseSampler, *, relative: bool = True):
        self._study, self._trial, self._sampler = study, trial, sampler
        self._fixed: Mapping[str, Any] = trial.system_attrs.get("fixed_params", {})
        self._space: dict[str, BaseDistribution] = {}
        self._relative: dict[str, Any] = {}
        if relative:
            self._space = sampler.infer_relative_search_space(study, trial)
            self._relative = sampler.sample_relative(study, trial, self._space)
        self.params: dict[str, Any] = {}
        self.distributions: dict[str, BaseDistribution] = {}

    def _suggest(self, name: str, dist: BaseDistribution) -> Any:
        if name in self.params:
            return self.params[name]
        if name in self._fixed:
            value = self._fixed[name]
        elif dist.single():
            value = optuna.distributions._get_single_value(dist)
        elif name in self._relative and name in self._space and _compatible(self._space[name], dist):
            value = self._relative[name]
        else:
            value = self._sampler.sample_independent(self._study, self._trial, name, dist)
        self.params[name] = value
        self.distributions[name] = dist
        return value

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        return self._suggest(name, CategoricalDistribution(choices))

    def suggest_int(self, name: str, low: int, high: int, step: int = 1, log: bool = False) -> int:
        return int(self._suggest(name, IntDistribution(low, high, log=log, step=step)))

    def suggest_float(self, name: str, low: float, high: float, *, step: float | None = None,
                      log: bool = False) -> float:
        return float(self._suggest(name, FloatDistribution(low, high, log=log, step=step)))

    def key(self) -> str:
        return json.dumps(self.params, sort_keys=True, default=str)


def _compatible(a: BaseDistribution, b: BaseDistribution) -> bool:
    try:
        check_distribution_compatibility(a, b)
    except ValueError:
        return False
    return True


Propose = Callable[[Draft], Any]
Check = Callable[[Any], "str | None"]


def _fallback_seed(seed: int | None) -> int | None:
    """The random fallback's seed, derived from ``seed`` (None: unseeded)."""
    if seed is None:
        return None
    return int.from_bytes(hashlib.sha256(f"fallback/{seed}".encode()).digest()[:4], "big")


class FeasibleSampler(BaseSampler):
    """Proposes only drafts that ``check`` accepts (see the module docstring).

    Args:
        base: the sampler that proposes (its model learns from the trained trials only).
        search_space: every parameter ``propose`` may suggest, with its distribution.
        propose: suggests a full candidate on a trial-like object and returns it
            (``SearchSpace.sample``).
        check: None to accept a candidate, else the reason to reject it (milliseconds to
            seconds: it runs for every draft).
        max_draws: drafts per trial before giving up; the base sampler's first draft is then
            used and the objective decides what to do with it.
        base_draws: how many of those drafts come from ``base``; the rest are drawn uniformly
            at random (a sampler whose proposals are nearly deterministic, such as the GP's
            acquisition optimum, would otherwise propose the same rejected draft again). A
            draft identical to one already rejected switches to random drafts at once.
        seed: seeds the random drafts.
    """

    def __init__(self, base: BaseSampler, search_space: Mapping[str, BaseDistribution], propose: Propose,
                 check: Check, *, max_draws: int = 64, base_draws: int = 16, seed: int | None = None):
        if max_draws < 1 or base_draws < 1:
            raise ValueError("max_draws and base_draws must be at least 1")
        self.base = base
        self.search_space = dict(search_space)
        self.propose = propose
        self.check = check
        self.max_draws = max_draws
        self.base_draws = min(base_draws, max_draws)
        # a seed of its own: seeded like the base sampler, it would replay the base's drafts
        self._random = optuna.samplers.RandomSampler(seed=_fallback_seed(seed))
        self._rejections: dict[int, list[str]] = {}
        self._lock = threading.Lock()

    # -- drafting ----------------------------------------------------------------------------
    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self.search_space)

    def sample_relative(self, study: Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        first: Draft | None = None
        rejected: list[str] = []
        seen: set[str] = set()
        use_base = True
        for i in range(self.max_draws):
            use_base = use_base and i < self.base_draws
            sampler = self.base if use_base else self._random
            draft = Draft(study, trial, sampler, relative=use_base)
            candidate = self.propose(draft)
            first = first or draft
            reason = self.check(candidate)
            if reason is None:
                self._note(trial.number, rejected)
                return self._own(draft)
            rejected.append(reason)
            key = draft.key()
            if key in seen:
                use_base = False
            seen.add(key)
        self._note(trial.number, rejected)
        assert first is not None
        return self._own(first)

    def _own(self, draft: Draft) -> dict[str, Any]:
        # optuna.Trial only takes a relative value whose distribution matches the suggestion.
        return {k: v for k, v in draft.params.items() if k in self.search_space}

    def _note(self, number: int, rejected: list[str]) -> None:
        with self._lock:
            self._rejections[number] = rejected

    def pop_rejections(self, number: int) -> list[str]:
        """The reasons the drafts of trial ``number`` were rejected, in order (then forgotten)."""
        with self._lock:
            return self._rejections.pop(number, [])

    def sample_independent(self, study: Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    # -- the base sampler's bookkeeping ------------------------------------------------------
    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
        self._random.reseed_rng()
