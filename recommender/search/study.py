"""The study: storage, sampler, baseline, warm start, search, confirm stage.

A study lives in an Optuna storage (default ``sqlite:///studies/<name>.db``). Running the same
command again resumes it: ``trials`` is the number of finished trials the study should reach, so a
resumed study runs only what is missing and a completed trial is never lost. Many machines join
one study by giving the same ``--storage postgresql://...`` and study name (Optuna's own
distributed mode); work done once per study (the baseline, the warm start, the confirm stage)
runs under a study-wide lock (:mod:`recommender.search.lock`).
"""

from __future__ import annotations

import math
import os
import re
import warnings
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from torch import nn
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from ..cache import WeightsCache
from ..constraints import Budget, MaxDrop, parse_budgets
from ..data import TensorData, load_dataset
from ..errors import RecommenderError, StorageError, UnknownNameError
from ..evaluation import Baseline, Evaluation, Evaluator
from ..models import get_preset, list_presets
from ..protocol import ProxyProtocol, get_protocol
from ..recipe import Recipe
from .lock import study_lock
from .objective import (DEFAULT_STRUCTURE_POLICY, STRUCTURE_POLICIES, Objective, TrialFailed, counts_as_trial,
                        trial_evaluation)
from .sampling import SAMPLERS, make_sampler  # noqa: F401  (re-exported: older imports use study.make_sampler)
from .space import SearchSpace

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
DEFAULT_STUDIES_DIR = Path("studies")
#: Under the constraint policy, a study stops after this many structure skips per counted trial.
MAX_SKIPPED_PER_TRIAL = 10

# Failed trials are recorded with their reason and shown in the report; optuna would also print a
# traceback for each on stderr.
optuna.logging.set_verbosity(optuna.logging.ERROR)
# heartbeats, grouped multivariate TPE and metric names are "experimental" but documented and
# stable enough for us; the warning would only clutter every run.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


@dataclass
class StudySpec:
    """Everything that defines a recommendation study (CLI flags map one to one).

    Args:
        model: base model name (``resnet101``).
        max_drop: tolerated accuracy drop (``2%``, ``2pp``, ``5%rel``).
        budgets: cost limits; the first is the primary cost objective.
        dataset: ``digits`` (offline default), ``cifar10``, ``cifar100``, ``imagefolder:PATH``.
        fidelity: proxy protocol of the search (``smoke``, ``proxy``, ``confirm``, ``paper``).
        confirm_fidelity: protocol of the confirm stage: ``search`` (default: the search's own
            fidelity with a second seed, against the cached baseline), a fidelity name (the
            baseline is then also trained at it, once), or ``none`` (no confirm stage).
        n_confirm: how many of the best feasible candidates are re-evaluated.
        trials: finished trials the study should reach (resumes count the earlier ones).
        timeout: seconds of search for this invocation (None: no limit).
        sampler: ``tpe`` (default), ``nsga2``, ``gp`` or ``random``.
        seed: seeds the sampler and the protocol.
        storage: Optuna storage URL (default ``sqlite:///<studies_dir>/<study>.db``).
        study_name: defaults to a name derived from model, dataset, budgets and tolerance.
        space: a search-space YAML (default: the bundled one for the model family).
        warm_start: enqueue the paper's presets (in the space's ``warm_start`` list) first.
        checkpoint: a trained baseline state dict (evaluated, never retrained).
        weights: initial weights of the baseline (e.g. ImageNet-pretrained; loaded where shapes
            match), trained under the protocol once and cached.
        baseline_accuracy: a stated baseline accuracy in percent (no baseline evaluation).
        latency: measure CPU latency of every candidate (ms, batch 1).
        max_trial_seconds: skip a candidate whose proxy training is estimated, from two timed
            steps, to take longer than this and than the baseline architecture's estimate
            (:meth:`Objective.time_limit`); None: no limit.
        structure_policy: what the search does with a candidate whose structure breaks a budget
            before training: ``resample`` (default: the sampler draws again, the candidate never
            becomes a trial) or ``constraint`` (an untrained trial that reports its structural
            excess as constraint values and does not count towards ``trials``).
    """

    model: str
    max_drop: MaxDrop
    budgets: list[Budget]
    dataset: str = "digits"
    data_dir: str | None = None
    fidelity: str = "proxy"
    confirm_fidelity: str | None = "search"
    n_confirm: int = 2
    trials: int = 20
    timeout: float | None = None
    sampler: str = "tpe"
    seed: int = 0
    storage: str | None = None
    study_name: str | None = None
    space: str | None = None
    warm_start: bool = True
    checkpoint: str | None = None
    weights: str | None = None
    baseline_accuracy: float | None = None
    latency: bool = True
    max_trial_seconds: float | None = 120.0
    structure_policy: str = DEFAULT_STRUCTURE_POLICY
    studies_dir: str = str(DEFAULT_STUDIES_DIR)
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        from ..models import register_module, resolve_model
        from ..models.registry import is_registered

        if isinstance(self.model, nn.Module):
            self.model = register_module(self.model)
        elif not is_registered(self.model):
            resolve_model(self.model, check_only=True)  # an unknown name fails before any work
        if self.checkpoint and self.weights:
            raise RecommenderError("give --checkpoint (a trained baseline) or --weights (initial weights), not both")
        get_protocol(self.fidelity)  # an unknown fidelity fails before any storage is touched
        if isinstance(self.max_drop, str):
            self.max_drop = MaxDrop.parse(self.max_drop)
        self.budgets = parse_budgets(self.budgets)
        if not self.budgets:
            raise RecommenderError("give at least one budget, e.g. --budget 5M-params")
        if self.sampler not in SAMPLERS:
            raise UnknownNameError("sampler", self.sampler, SAMPLERS)
        if self.structure_policy not in STRUCTURE_POLICIES:
            raise UnknownNameError("structure policy", self.structure_policy, STRUCTURE_POLICIES)
        if self.trials < 1:
            raise RecommenderError("--trials must be at least 1")
        if self.confirm_fidelity in ("none", "", None):
            self.confirm_fidelity = None
        elif self.confirm_fidelity == "search":
            self.confirm_fidelity = self.fidelity
        else:
            get_protocol(self.confirm_fidelity)

    @property
    def name(self) -> str:
        if self.study_name:
            return self.study_name
        ds = re.sub(r"[^A-Za-z0-9]+", "-", Path(self.dataset.split(":", 1)[-1]).name if ":" in self.dataset
                    else self.dataset).strip("-")
        parts = [self.model, ds, *(b.text or b.metric for b in self.budgets if b.text),
                 f"drop{self.max_drop.text or self.max_drop.value}", self.fidelity]
        return re.sub(r"[^A-Za-z0-9._-]+", "", "-".join(parts).replace("%", "pct"))

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return f"sqlite:///{Path(self.studies_dir) / (self.name + '.db')}"

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.studies_dir) / "cache"

    def identity(self) -> dict[str, Any]:
        """What must match when a study is resumed."""
        return {"model": self.model, "dataset": self.dataset, "fidelity": self.fidelity,
                "max_drop": asdict(self.max_drop), "budgets": [asdict(b) for b in self.budgets],
                "seed": self.seed}


def open_storage(url: str, heartbeat: bool = True) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats (stale RUNNING trials of dead workers are failed and
    retried once); unreachable or unusable storage is a one-line :class:`StorageError`."""
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {}
    if heartbeat:
        kwargs = dict(heartbeat_interval=_env_seconds("RECOMMENDER_HEARTBEAT", 20),
                      grace_period=_env_seconds("RECOMMENDER_GRACE", 60),
                      heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    try:
        # Workers started together on an empty database would race to create Optuna's tables
        # (the losers fail with a duplicate-key error): create them under the advisory lock.
        with study_lock(url if url.startswith("postgresql") else None, "<optuna schema>", "create_tables"):
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None,
                              **kwargs)
    except Exception as exc:  # sqlalchemy/psycopg errors: unreachable, bad URL, no driver
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StorageError(f"cannot open storage {redact(url)}: {msg}") from None


def _env_seconds(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.strip().isdigit() or int(raw) < 1:
        raise RecommenderError(f"{name} must be a positive whole number of seconds, got {raw!r}")
    return int(raw)


def redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def open_study(spec: StudySpec, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    storage = storage or open_storage(spec.storage_url)
    primary = spec.budgets[0]
    # Workers of a fleet (a server storage) must not share the sampler's seed: with one seed and
    # one history they would propose the same candidates in lockstep. A SQLite study (one machine)
    # stays reproducible; --seed still fixes the training protocol everywhere.
    sampler_seed = _sampler_seed(spec)
    try:
        study = optuna.create_study(storage=storage, study_name=spec.name, load_if_exists=True,
                                    directions=["maximize", "minimize"],
                                    sampler=make_sampler(spec.sampler, sampler_seed))
    except Exception as exc:
        raise StorageError(f"cannot open study {spec.name!r} in {redact(spec.storage_url)}: "
                           f"{str(exc).splitlines()[0]}") from None
    ident = study.user_attrs.get("spec")
    if ident is None:
        study.set_user_attr("spec", spec.identity())
        names = ["accuracy", f"{primary.metric} ({primary.unit})"]
        study.set_user_attr("objective_names", names)
        study.set_metric_names(names)  # axis names in optuna-dashboard
    elif ident != spec.identity():
        raise RecommenderError(
            f"study {spec.name!r} already exists in {redact(spec.storage_url)} with other settings "
            f"({_diff(ident, spec.identity())}); pass --study-name to start a new one")
    return study


def _sampler_seed(spec: StudySpec) -> int | None:
    return spec.seed if spec.storage_url.startswith("sqlite") else None


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = [k for k in set(a) | set(b) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(keys))


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Finished trials that count towards ``trials`` (not the untrained structure skips of the
    ``constraint`` policy)."""
    return [t for t in study.get_trials(deepcopy=False, states=FINISHED) if counts_as_trial(t)]


class Search:
    """Runs one study: baseline (once), warm start (once), search, confirm stage (once)."""

    def __init__(self, spec: StudySpec, *, log: Callable[[str], None] | None = None,
                 callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = ()):
        self.spec = spec
        self.log = log or (lambda s: None)
        self.callbacks = list(callbacks)
        self.protocol: ProxyProtocol = get_protocol(spec.fidelity, seed=spec.seed)
        self.data: TensorData = load_dataset(spec.dataset, data_dir=spec.data_dir, seed=spec.seed)
        from ..models import resolve_model

        spec.model = resolve_model(spec.model, num_classes=self.data.num_classes, seed=spec.seed)
        self.space = SearchSpace.for_model(spec.model, spec.space)
        self.cache = WeightsCache(spec.cache_root)
        for path in (spec.checkpoint, spec.weights):  # a corrupt file fails before a study is created
            if path:
                from ..compress.checkpoint import load_state

                load_state(path)
        self.study = open_study(spec)
        self.log(f"study {spec.name} in {redact(spec.storage_url)}")
        self.evaluator = Evaluator(spec.model, self.data, self.protocol, cache=self.cache,
                                   latency=spec.latency, checkpoint=spec.checkpoint, weights=spec.weights,
                                   distill=spec.baseline_accuracy is None, log=self.log)
        self.trials_run = 0

    # -- once per study ----------------------------------------------------------------------
    def baseline(self) -> Baseline:
        """The study's baseline, evaluated by the first worker and read by the others."""
        attr = self.study.user_attrs.get("baseline")
        if attr is None:
            with study_lock(self.spec.storage_url, self.spec.name, "baseline"):
                attr = _reload(self.study).user_attrs.get("baseline")
                if attr is None:
                    self.log("evaluating the baseline (trained once, then cached across studies)")
                    stated = None if self.spec.baseline_accuracy is None else self.spec.baseline_accuracy / 100
                    base = self.evaluator.evaluate_baseline(stated)
                    self.study.set_user_attr("baseline", base.to_dict())
                    self.study.set_user_attr("baseline_evaluations",
                                             int(self.study.user_attrs.get("baseline_evaluations", 0)) + 1)
                    return base
        return Baseline.from_dict(attr)

    def warm_start(self) -> int:
        """Enqueue the paper's presets once per study; returns how many were enqueued."""
        if not self.spec.warm_start or self.study.user_attrs.get("warm_started"):
            return 0
        with study_lock(self.spec.storage_url, self.spec.name, "warm_start"):
            if _reload(self.study).user_attrs.get("warm_started"):
                return 0
            n = 0
            for name in self.space.warm_start:
                preset = get_preset(name)
                params = self.space.params_for(Recipe(arch=preset.arch))
                self.study.enqueue_trial(params, user_attrs={"preset": name}, skip_if_exists=True)
                n += 1
            self.study.set_user_attr("warm_started", True)
            return n

    # -- search ------------------------------------------------------------------------------
    def remaining(self) -> int:
        return max(0, self.spec.trials - len(finished_trials(self.study)))

    def optimize(self, baseline: Baseline) -> None:
        objective = Objective(self.evaluator, self.space, baseline, self.spec.max_drop, self.spec.budgets,
                              self.spec.max_trial_seconds, structure_policy=self.spec.structure_policy,
                              seed=_sampler_seed(self.spec))
        remaining = self.remaining()
        if remaining <= 0:
            return
        target = self.spec.trials
        # Structure skips of the constraint policy do not count, so optimize() cannot be told how
        # many trials to run; stop() ends it, and a space that is nearly all over budget ends
        # after MAX_SKIPPED_PER_TRIAL skips per trial.
        n_trials = remaining if self.spec.structure_policy == "resample" else None
        max_skipped = MAX_SKIPPED_PER_TRIAL * target

        def stop(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            # Count the trials other workers are running too: with finished trials alone, every
            # worker of a fleet starts one more trial near the end and the study overshoots the
            # target by up to one trial per worker. A dead worker's trial stops counting once its
            # heartbeat is stale (failed here, and retried by the next trial of a live worker).
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
            counted = sum(counts_as_trial(t) for t in trials)
            if counted >= target or len(trials) - counted >= max_skipped:
                study.stop()

        def count(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            self.trials_run += counts_as_trial(trial)

        for cb in self.callbacks:  # progress bars start with the trials, not before
            start = getattr(cb, "start", None)
            if start is not None:
                start(self.study)

        self.study.optimize(objective, n_trials=n_trials, timeout=self.spec.timeout,
                            catch=(TrialFailed,), callbacks=[stop, count, *self.callbacks])

    # -- confirm stage -----------------------------------------------------------------------
    def confirm(self, baseline: Baseline) -> dict[str, Any]:
        """Re-evaluate the best feasible candidates at the confirm fidelity (second seed)."""
        spec = self.spec
        if not spec.confirm_fidelity or spec.n_confirm <= 0:
            return {}
        from ..report import feasible_pareto  # the report owns the Pareto logic

        with study_lock(spec.storage_url, spec.name, "confirm"):
            study = _reload(self.study)
            confirmed: dict[str, Any] = dict(study.user_attrs.get("confirmed", {}))
            front = feasible_pareto(study)
            todo = [t for t in front[: spec.n_confirm] if str(t.number) not in confirmed]
            if not todo:
                return confirmed
            protocol = get_protocol(spec.confirm_fidelity, seed=spec.seed + 1)
            same = spec.confirm_fidelity == spec.fidelity
            # At the search's own fidelity the re-check is a second seed of each finalist against
            # the search's baseline (cached); at a higher fidelity the baseline is trained at that
            # fidelity too (once, then cached across studies).
            ev = Evaluator(spec.model, self.data, protocol, cache=self.cache, latency=False,
                           checkpoint=spec.checkpoint, weights=spec.weights,
                           distill=spec.baseline_accuracy is None,
                           teacher_protocol=self.protocol if same else None, log=self.log)
            base_attr = study.user_attrs.get("baseline_confirm")
            if same:
                cbase = baseline
                if base_attr is None:
                    self.study.set_user_attr("baseline_confirm", baseline.to_dict())
            elif base_attr is None or base_attr.get("fidelity") != protocol.fidelity:
                self.log(f"confirm stage: baseline at {protocol.fidelity} fidelity")
                stated = None if spec.baseline_accuracy is None else spec.baseline_accuracy / 100
                cbase = ev.evaluate_baseline(stated)
                self.study.set_user_attr("baseline_confirm", cbase.to_dict())
            else:
                cbase = Baseline.from_dict(base_attr)
            for t in todo:
                recipe = Recipe.from_dict(t.user_attrs["recipe"])
                self.log(f"confirm stage: trial {t.number} ({recipe.describe()})")
                res = ev.evaluate(recipe, cbase, spec.max_drop)
                prev = trial_evaluation(t)
                if prev is not None:  # costs do not depend on the fidelity; keep the measured latency
                    res.costs = {**res.costs, "latency_ms": prev.costs.get("latency_ms")}
                confirmed[str(t.number)] = res.to_dict()
                self.study.set_user_attr("confirmed", confirmed)
            return confirmed

    def run(self) -> optuna.Study:
        t0 = time.perf_counter()
        baseline = self.baseline()
        self.warm_start()
        self.optimize(baseline)
        self.confirm(baseline)
        self.study.set_user_attr("last_run_seconds", round(time.perf_counter() - t0, 1))
        return self.study


def _reload(study: optuna.Study) -> optuna.Study:
    """A fresh view of the study's attributes (another worker may have written them)."""
    return optuna.load_study(study_name=study.study_name, storage=study._storage)
