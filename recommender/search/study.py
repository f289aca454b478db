"""The study: storage, sampler, baseline, warm start, search, promotion rungs.

A study lives in an Optuna storage (default ``sqlite:///studies/<name>.db``). Running the same
command again resumes it: ``trials`` is the number of candidates the study should have evaluated
(trials skipped before training do not count), so a resumed study runs only what is missing and a
completed trial is never lost. Many machines join one study by giving the same
``--storage postgresql://...`` and study name (Optuna's own distributed mode); ``--jobs N`` runs N
worker processes on one machine the same way. Work done once per study (the baseline of each
rung, the warm start, each promotion decision) runs under a study-wide lock
(:mod:`recommender.search.lock`).

Flow: baseline (rung 0) -> warm start (presets whose structure fits) -> search (every candidate
on rung 0) -> promotions (the best fraction re-trained on each higher rung, within the time
budget; :mod:`recommender.search.rungs`) -> the answer is read back from storage
(:mod:`recommender.report`).
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import optuna
from optuna.exceptions import UpdateFinishedTrialError
import torch
from torch import nn
from optuna.trial import TrialState

from .. import interrupts, validate
from ..cache import WeightsCache
from ..constraints import Budget, MaxDrop, format_quantity, parse_budgets
from ..export import onnx_available
from ..data import ImageData, load_dataset
from ..devices import available_cpus, cuda_available
from ..errors import ArchError, RecommenderError, StorageError, UnknownNameError
from ..evaluation import Baseline, Evaluation, Evaluator
from ..models import get_family, get_preset
from ..models.registry import is_registered
from ..protocol import ProxyProtocol, get_protocol
from ..feasibility import Power, chance_level
from ..ledger import Ledger
from ..question import Question
from ..recipe import Recipe
from . import storage as storage_mod
from .lock import study_lock
from .plan import Plan
from .floor import Floor, refuse_below_floor, space_floor
from .objective import (DEFAULT_STRUCTURE_POLICY, NO_FIT_ATTR, STRUCTURE_POLICIES, Objective, TrialFailed,
                        objective_values)
from .recovery import (RequeueStale, counted_trials, counts_toward_target, guard_trial_creation, interruptible,
                       reap_dead_trials, release_own_trials)
from .rungs import LadderSpec, PromotionPolicy, Rung, auto_note, ladder, parse_ladder, rung_study_name
from .sampling import SAMPLERS, make_sampler
from .space import SearchSpace
from .storage import redact
from .structure import check_structure
from .workers import run_workers

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
DEFAULT_STUDIES_DIR = Path("studies")


@dataclass(frozen=True)
class StudySpec:
    """Everything that defines a recommendation study (CLI flags map one to one).

    Args:
        model: base model name (``resnet101``).
        max_drop: tolerated accuracy drop (``2%``, ``2pp``, ``5%rel``).
        budgets: cost limits; the first is the primary cost objective.
        dataset: ``digits`` (offline default), ``cifar10``, ``cifar100``, ``imagefolder:PATH``.
        fidelity: proxy protocol of the search, rung 0 (``smoke``, ``proxy``, ``confirm``, ``paper``).
        rungs: the promotion ladder (:func:`recommender.search.rungs.ladder`): ``auto`` (rung 0
            and one derived rung: 3x the epochs, native resolution, augmentation), a count of
            derived rungs, or a comma list of fidelity names.
        confirm_fidelity: the older single re-check, overriding ``rungs``: ``search`` (the
            search's own fidelity with a second seed), a fidelity name, or ``none``.
        n_confirm: with ``confirm_fidelity``: how many candidates are re-checked.
        promote_fraction, max_promoted: share of the eligible candidates promoted per rung, and
            the most promoted per rung.
        trials: candidates the study should have evaluated (resumes count the earlier ones;
            trials skipped before training do not count).
        timeout: seconds for this invocation, baseline and promotions included (None: no limit);
            the search stops early enough to leave the promotions their estimated time.
        jobs: worker processes on this machine (1: in this process; 0: auto, see
            :meth:`Search.jobs`).
        threads: CPU threads in all (0: what this process may use); each worker gets threads/jobs.
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
        device: where candidates train and are evaluated: ``auto`` (a CUDA GPU when present),
            ``cpu`` or ``cuda``. Latency budgets name their own device (``12ms``: CPU,
            ``12ms-cuda``: GPU).
        threads: CPU threads of training and evaluation (0: ``OMP_NUM_THREADS``, else the CPUs
            this process may use).
        image_size: image folders and dataset pairs: side (px) the images are decoded to
            (None: their native size when square and at most 64 px, else 32).
        heartbeat, grace: seconds between a running trial's heartbeats, and the age of its last
            heartbeat at which another worker of the study takes it for dead (fails it and
            queues it again).
    """

    model: str
    max_drop: MaxDrop
    budgets: list[Budget]
    dataset: str = "digits"
    data_dir: str | None = None
    fidelity: str = "proxy"
    rungs: str = "auto"
    confirm_fidelity: str | None = None
    n_confirm: int = 2
    promote_fraction: float = 1 / 3
    max_promoted: int = 4
    trials: int = 20
    timeout: float | None = None
    jobs: int = 1
    threads: int = 0
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
    device: str = "auto"
    image_size: int | None = None
    heartbeat: int = 20
    grace: int = 60

    ladder: LadderSpec = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # A frozen question: every field is normalised here, once, and never changed after
        # (the search reads it; worker processes receive it as it is).
        from ..models import register_module, resolve_model

        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if isinstance(self.model, nn.Module):
            put("model", register_module(self.model))
        elif not is_registered(self.model):
            resolve_model(self.model, check_only=True)  # an unknown name fails before any work
        if self.checkpoint and self.weights:
            raise RecommenderError("give --checkpoint (a trained baseline) or --weights (initial weights), not both")
        if self.checkpoint and self.baseline_accuracy is not None:
            raise RecommenderError("give --checkpoint (a trained baseline, evaluated here) or --baseline-accuracy "
                                   "(a stated figure), not both: the stated figure would never be checked against it")
        # an unknown fidelity, device (or cuda without a GPU) fails before any storage is touched
        get_protocol(self.fidelity, device=self.device, threads=self.threads).resolved_device()
        if isinstance(self.max_drop, (str, int, float)):
            put("max_drop", MaxDrop.parse(self.max_drop))
        put("budgets", tuple(parse_budgets(list(self.budgets) if isinstance(self.budgets, (list, tuple))
                                           else self.budgets)))
        if not self.budgets:
            raise RecommenderError("give at least one budget, e.g. --budget 5M-params")
        for b in self.budgets:
            if b.device == "cuda" and not torch.cuda.is_available():
                raise RecommenderError(f"budget {b.text or b.describe()} is a CUDA latency but no CUDA "
                                       f"GPU is available here; use a CPU latency budget (e.g. 12ms)")
            if b.metric == "latency-ort" and not onnx_available():
                raise RecommenderError(f"budget {b.text or b.describe()} is an ONNX Runtime latency but "
                                       f"onnxruntime is not installed: pip install -e \".[export]\"")
        if self.sampler not in SAMPLERS:
            raise UnknownNameError("sampler", self.sampler, SAMPLERS)
        if self.structure_policy not in STRUCTURE_POLICIES:
            raise UnknownNameError("structure policy", self.structure_policy, STRUCTURE_POLICIES)
        if self.trials < 1:
            raise RecommenderError("--trials must be at least 1")
        if self.jobs < 0:
            raise RecommenderError("--jobs must be a positive number (0: auto)")
        if self.threads < 0:
            raise RecommenderError("--threads must be >= 0")
        if self.timeout is not None and self.timeout <= 0:
            raise RecommenderError("--timeout must be positive")
        validate.seed(self.seed)
        if self.baseline_accuracy is not None:
            put("baseline_accuracy", validate.percent(self.baseline_accuracy, "--baseline-accuracy"))
        if self.confirm_fidelity == "search":
            put("confirm_fidelity", self.fidelity)
        put("ladder", parse_ladder(self.rungs, self.confirm_fidelity, self.fidelity))  # parsed once
        self.policy()  # validates the promotion settings
        validate.spec_bounds(self)  # every count within its limit (recommender/limits.py)
        try:  # the study's name, also when derived from the flags: it becomes a file and a folder
            validate.study_name(self.name)
        except RecommenderError as exc:
            if self.study_name is not None:
                raise
            raise RecommenderError(f"{exc} (derived from the flags: pass --study-name)") from None

    def policy(self) -> PromotionPolicy:
        """The promotion policy (the older confirm stage re-checks exactly ``n_confirm``)."""
        if self.confirm_fidelity is not None:
            n = max(1, self.n_confirm)
            return PromotionPolicy(fraction=1.0, min_promoted=n, max_promoted=n)
        return PromotionPolicy(fraction=self.promote_fraction, max_promoted=max(2, self.max_promoted))

    @property
    def name(self) -> str:
        if self.study_name is not None:
            return self.study_name
        ds = re.sub(r"[^A-Za-z0-9]+", "-", Path(self.dataset.split(":", 1)[-1]).name if ":" in self.dataset
                    else self.dataset).strip("-")
        # a factory (package.module:factory) names its study after itself
        model = self.model if is_registered(self.model) else self.model.replace(":", "-")
        parts = [model, ds, *(b.text or b.metric for b in self.budgets if b.text),
                 f"drop{self.max_drop.text or self.max_drop.value}", self.fidelity]
        return re.sub(r"[^A-Za-z0-9._-]+", "", "-".join(parts).replace("%", "pct"))

    @property
    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        return storage_mod.sqlite_url(Path(self.studies_dir) / (self.name + ".db"))

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.studies_dir) / "cache"

    def identity(self, model: str | None = None) -> dict[str, Any]:
        """What must match when a study is resumed: the question (model, dataset, fidelity,
        tolerance, budgets, seed) and the baseline it is measured against (a checkpoint or
        initial weights by the sha256 of their bytes, a stated accuracy). ``model``: the model
        as resolved (a factory's registered name carries a hash of its architecture and initial
        weights), default the spec's own."""
        from ..compress.checkpoint import file_digest

        return {"model": model or self.model, "dataset": self.dataset, "fidelity": self.fidelity,
                "max_drop": asdict(self.max_drop), "budgets": [b.to_dict() for b in self.budgets],
                "seed": self.seed, "checkpoint": file_digest(self.checkpoint) if self.checkpoint else None,
                "weights": file_digest(self.weights) if self.weights else None,
                "baseline_accuracy": self.baseline_accuracy,
                # decoded size changes the data (absent: as before, resumes match)
                **({"image_size": self.image_size} if self.image_size else {})}

    def worker_threads(self) -> int:
        """Threads of each worker: the CPUs this process may use, shared among the jobs."""
        total = self.threads or available_cpus()
        return max(1, total // max(1, self.jobs))


def sampler_seed(base_seed: int, study: optuna.Study, worker: int = 0, run: int = 0) -> int:
    """The sampler's seed for one worker of ``study``.

    A fresh study's first run, worker 0, gets ``base_seed`` itself (a fresh single run is
    reproducible, as before). Any other gets a hash of (``base_seed``, the trials already in
    the study, ``run``: this invocation's index among all that opened the study
    (:func:`claim_run`), ``worker``: the index of a worker within one invocation), so a resumed
    run does not replay the first run's candidates and two workers on one study do not propose
    in lockstep. Returns an int in [0, 2**32).
    """
    n = len(study.get_trials(deepcopy=False))
    if n == 0 and run == 0 and worker == 0:
        return base_seed
    digest = hashlib.sha256(f"{base_seed}/{n}/{run}/{worker}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def claim_run(study: optuna.Study, storage_url: str) -> int:
    """This invocation's index among every one that opened ``study`` (0 for the first), taken
    under the study lock, so that two processes started together differ."""
    with study_lock(storage_url, study.study_name, "runs"):
        n = int(_reload(study).user_attrs.get("runs", 0))
        study.set_user_attr("runs", n + 1)
    return n


def open_storage(url: str, heartbeat: bool = True, *, heartbeat_interval: int = 20,
                 grace_period: int = 60) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats every ``heartbeat_interval`` seconds (a RUNNING trial whose
    heartbeat is ``grace_period`` seconds old belongs to a dead worker: it is failed and queued
    again, :class:`~recommender.search.recovery.RequeueStale`); unreachable or unusable storage
    is a one-line :class:`StorageError`."""
    if not heartbeat:
        return storage_mod.open_storage(url, heartbeat=False)
    return storage_mod.open_storage(url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                                    stale_callback=RequeueStale())


def space_note(model: str) -> str:
    """A sentence for the explanation when ``model``'s family supports no architecture technique
    (a user's module, a factory): its search space is pruning x quantization only."""
    family = get_family(model)
    if family.techniques_for(model):
        return ""
    return (f"{model} supports no architecture technique here (family {family.name}): "
            "the search space is pruning x quantization only.")


def open_study(spec: StudySpec, storage: optuna.storages.BaseStorage | None = None, worker: int = 0,
               model: str | None = None) -> optuna.Study:
    """Create or resume ``spec``'s study (a resumed one must have the same :meth:`StudySpec.identity`,
    ``model`` being the model as resolved) with its sampler seeded by :func:`sampler_seed` for
    ``worker``."""
    return _open_study(spec, storage, worker, model)[0]


def _open_study(spec: StudySpec, storage: optuna.storages.BaseStorage | None,
                worker: int, model: str | None = None) -> tuple[optuna.Study, int]:
    """:func:`open_study`, and the sampler seed it chose."""
    storage = storage or open_storage(spec.storage_url, heartbeat_interval=spec.heartbeat, grace_period=spec.grace)
    primary = spec.budgets[0]
    try:
        study = optuna.create_study(storage=storage, study_name=spec.name, load_if_exists=True,
                                    directions=["maximize", "minimize"])
    except Exception as exc:
        raise StorageError(f"cannot open study {spec.name!r} in {redact(spec.storage_url)}: "
                           f"{storage_mod.scrub(storage_mod.error_text(exc), spec.storage_url)}") from None
    if len(study.directions) != 2:  # a study of that name written by something else
        raise StorageError(f"study {spec.name!r} in {redact(spec.storage_url)} was not created by recommend "
                           f"(it has {len(study.directions)} objective(s), not 2); pass --study-name to start a new one")
    ident = study.user_attrs.get("spec")
    mine = spec.identity(model)
    if ident is None:
        study.set_user_attr("spec", mine)
        names = ["accuracy", f"{primary.metric} ({primary.unit})"]
        study.set_user_attr("objective_names", names)
        study.set_metric_names(names)  # axis names in optuna-dashboard
    else:
        # A study written before a key joined the identity is compared on the keys it has.
        theirs = {k: ident[k] for k in mine if k in ident}
        if theirs != {k: mine[k] for k in theirs}:
            raise RecommenderError(
                f"study {spec.name!r} already exists in {redact(spec.storage_url)} with other settings "
                f"({_diff(theirs, {k: mine[k] for k in theirs})}); pass --study-name to start a new one")
        if set(mine) - set(ident):
            study.set_user_attr("spec", mine)
    run = claim_run(study, spec.storage_url)
    seed = sampler_seed(spec.seed, study, worker=worker, run=run)
    study.sampler = make_sampler(spec.sampler, seed)
    return study, seed


def _diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    keys = [k for k in set(a) | set(b) if a.get(k) != b.get(k)]
    return ", ".join(f"{k}: {a.get(k)} vs {b.get(k)}" for k in sorted(keys))


#: Single-threaded workers run many small trainings faster than one worker with every thread
#: (measured in benchmarks/proxy_cost.py); more than two rarely pays on a laptop's memory bandwidth.
MAX_AUTO_JOBS = 2


def default_jobs(device: str = "auto") -> int:
    """``--jobs auto``: one worker per CPU up to ``MAX_AUTO_JOBS``; one on a GPU (it is shared)."""
    if device == "cuda" or (device == "auto" and cuda_available()):
        return 1
    return max(1, min(MAX_AUTO_JOBS, available_cpus()))


def finished_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Every finished trial (interrupted ones too); :func:`counted_trials` are those that count
    towards ``--trials``."""
    return study.get_trials(deepcopy=False, states=FINISHED)


#: Measured latency fields a promoted candidate keeps from the search rung (rungs re-train, they do
#: not re-time: the architecture and its compression are the same).
LATENCY_FIELDS = ("latency_ms", "latency_iqr_ms", "latency_cuda_ms", "latency_cuda_iqr_ms", "latency_ort_ms",
                  "latency_ort_iqr_ms", "latency_predicted_ms")

#: A study stops drawing after this many trials per requested trial, however many were skipped.
MAX_DRAWS_PER_TRIAL = 5
#: The search stops after this many trials in a row whose every draft broke a budget.
NO_FIT_STREAK = 3


class Search:
    """Runs one study: baseline (once), warm start (once), search, promotion rungs (each once).

    ``worker`` numbers the worker processes of ``--jobs`` (0: the coordinator)."""

    def __init__(self, spec: StudySpec, *, log: Callable[[str], None] | None = None,
                 callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
                 worker: int = 0, progress: Callable[[str, int, int, float], None] | None = None):
        self.spec = spec
        self.worker = worker
        self.log = log or (lambda s: None)
        self.progress = progress
        self.callbacks = list(callbacks)
        check_writable(spec)  # before any training: not found out after the baseline
        threads = spec.worker_threads() if worker else (spec.threads or 0)
        self.protocol: ProxyProtocol = get_protocol(spec.fidelity, seed=spec.seed, device=spec.device,
                                                    threads=threads)
        self.data: ImageData = load_dataset(spec.dataset, data_dir=spec.data_dir, seed=spec.seed,
                                            image_size=spec.image_size)
        from ..models import resolve_model

        # the model as measured: a factory (package.module:factory) is imported and called here,
        # and again in each worker process, under the same seed (the spec keeps its text)
        self.model: str = resolve_model(spec.model, num_classes=self.data.num_classes, seed=spec.seed)
        self.question = Question.of(self.model, spec.dataset, spec.max_drop, spec.budgets, self.data.num_classes,
                                    int(self.data.native_resolution))  # the size the data was decoded at
        self.space = SearchSpace.for_model(self.model, spec.space)
        for b in spec.budgets:  # recipes a device profile cannot predict: refused before any training
            if b.predicted:
                from ..latency_predict import check_space
                from ..latency_profile import load_profile

                check_space(load_profile(b.profile), self.space)
        self.cache = WeightsCache(spec.cache_root)
        for path in (spec.checkpoint, spec.weights):  # a corrupt file fails before a study is created
            if path:
                from ..compress.checkpoint import check_file

                check_file(path)
        if not worker:
            self.check_reachable()  # a budget below what the space can reach: refused before any work
        self.study, self.sampler_seed = _open_study(spec, None, worker, self.model)
        # A user's trained checkpoint is evaluated, and its weights inherited, at the size it was
        # trained at: the data's native size pins every rung (off the size it loses accuracy
        # that no candidate lost)
        pinned = int(self.data.native_resolution) if spec.checkpoint else 0
        own = self.protocol.input_resolution(pinned) if pinned else 0
        if pinned and own != pinned:
            self.protocol = self.protocol.replace(resolution=pinned)
            if not worker:
                self.log(f"--checkpoint: every rung runs at the data's {pinned} px, the size the "
                         f"checkpoint is evaluated at (set by --image-size), instead of the "
                         f"{spec.fidelity} fidelity's {own} px")
        self.evaluator = self._evaluator(self.protocol, latency=spec.latency)
        rungs = ladder(self.evaluator.protocol, self.data.native_resolution, spec.ladder, policy=spec.policy(),
                       pin_resolution=pinned, n_train=self.data.n_train, n_val=self.data.n_val)
        self.plan = Plan(rungs=tuple(rungs), policy=spec.policy(), jobs=self._jobs(), sampler=spec.sampler,
                         structure_policy=spec.structure_policy, trials=spec.trials, timeout=spec.timeout,
                         pinned_resolution=pinned, note=auto_note(self.evaluator.protocol, rungs, spec.ladder))
        self.rungs: tuple[Rung, ...] = self.plan.rungs
        if not worker:
            self.log(f"study {spec.name} in {redact(spec.storage_url)}")
            self._store_question()
        self.trials_run = 0
        self.deadline: float | None = None
        self._rung_evaluators: dict[int, Evaluator] = {}

    @property
    def worker_spec(self) -> StudySpec:
        """The spec worker processes get: this one with the resolved number of jobs (each worker
        takes ``threads / jobs`` CPU threads)."""
        return replace(self.spec, jobs=self.plan.jobs)

    def _store_question(self) -> None:
        """The question, the plan's rungs and the space note, on the study for the report."""
        attrs = self.study.user_attrs
        for key, value in (("question", self.question.to_dict()), ("rungs", [r.to_dict() for r in self.rungs]),
                           ("plan", self.plan.to_dict()), ("space_note", space_note(self.model) or None)):
            if value is not None and attrs.get(key) != value:
                self.study.set_user_attr(key, value)

    def _jobs(self) -> int:
        """Worker processes to use (1: this process). ``jobs=0`` (auto): one per CPU up to
        ``MAX_AUTO_JOBS`` (:func:`default_jobs`), except at the ``smoke`` fidelity, whose trainings
        take seconds, less than starting a worker process. A user module passed as an object
        cannot be rebuilt in another process: it runs in this one."""
        from ..models.registry import is_registered

        spec = self.spec
        jobs = spec.jobs or (1 if spec.fidelity == "smoke" else default_jobs(self.protocol.device))
        if jobs > 1 and is_registered(spec.model) and get_family(spec.model).style == "custom":
            if not self.worker:
                self.log("--jobs: a model given as an nn.Module object runs in this process only (jobs=1)")
            return 1
        return jobs

    def _deploy_input(self) -> tuple[int, int, int, int]:
        """The input size at which candidates' costs are measured (the evaluator's)."""
        side = get_family(self.model).deploy_size(self.data.native_resolution)
        return (1, 3, side, side)

    def check_reachable(self) -> list[Floor]:
        """The smallest cost the search space reaches for each structural budget
        (:mod:`recommender.search.floor`), stopping at the first point within the budget; a
        budget well below it is a :class:`~recommender.search.floor.BudgetBelowFloor` (exit 1)."""
        t0 = time.perf_counter()
        floors = space_floor(self.space, self.model, self.data.num_classes, self._deploy_input(), self.spec.budgets)
        refuse_below_floor(floors)
        if floors and not all(f.reached for f in floors):
            self.log(f"budget floor: {'; '.join(f.describe() for f in floors)} "
                     f"({sum(f.points for f in floors)} points, {time.perf_counter() - t0:.1f} s)")
        return floors

    def _no_fit_streak(self, study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
        """The last trials of ``study`` if the :data:`NO_FIT_STREAK` last finished ones all found
        no draft that fits the budgets, else []."""
        done = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED and not t.user_attrs.get("preset")
                and "pruned_reason" not in t.user_attrs]
        last = sorted(done, key=lambda t: t.number)[-NO_FIT_STREAK:]
        return last if len(last) == NO_FIT_STREAK and all(NO_FIT_ATTR in t.user_attrs for t in last) else []

    def stop_unreachable(self, study: optuna.Study, streak: list[optuna.trial.FrozenTrial]) -> None:
        """Record why the search stopped (``budget_unreachable``: the floor of every structural
        budget, the closest drafts, one line for the answer) and stop it."""
        if study.user_attrs.get("budget_unreachable"):
            study.stop()
            return
        floors = space_floor(self.space, self.model, self.data.num_classes, self._deploy_input(),
                             self.spec.budgets, stop_when_reached=False)
        closest: dict[str, dict] = {}
        for t in streak:
            for d in t.user_attrs[NO_FIT_ATTR].get("closest", []):
                closest.setdefault(d["describe"], d)
        ranked = sorted(closest.values(), key=lambda d: sum(max(0.0, x) for x in d["excess"].values()))[:3]
        drafts = sum(int(t.user_attrs[NO_FIT_ATTR].get("drafts", 0)) for t in streak)
        floor_text = "; ".join(f"{f.budget.metric} >= {format_quantity(f.value, f.budget.unit)}" for f in floors)
        near = (f"; closest draft: {ranked[0]['describe']} "
                f"({', '.join(f'{k} {v:+.0%}' for k, v in ranked[0]['excess'].items())})") if ranked else ""
        line = (f"No candidate fits the budgets: none of the {drafts} drafts of the last {len(streak)} trials did, "
                f"so the search stopped. The smallest best case found in this search space: "
                f"{floor_text or 'unknown'}{near}.")
        study.set_user_attr("budget_unreachable", {"line": line, "trials": [t.number for t in streak],
                                                   "drafts": drafts, "floor": [f.to_dict() for f in floors],
                                                   "closest": ranked})
        self.log(line)
        study.stop()

    def _evaluator(self, protocol: ProxyProtocol, *, latency: bool, teacher: ProxyProtocol | None = None
                   ) -> Evaluator:
        spec = self.spec
        profile = next((b.profile for b in spec.budgets if b.predicted), None)
        return Evaluator(self.model, self.data, protocol, cache=self.cache, latency=latency,
                         latency_profile=profile if latency else None,
                         ort_latency=latency and any(b.metric == "latency-ort" for b in spec.budgets),
                         checkpoint=spec.checkpoint, weights=spec.weights,
                         distill=spec.baseline_accuracy is None, teacher_protocol=teacher, log=self.log,
                         progress=self.progress)

    def _time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    # -- once per study ----------------------------------------------------------------------
    def baseline(self, rung: int = 0) -> Baseline:
        """The baseline of a rung, evaluated by the first worker and read by the others."""
        st = self.study if rung == 0 else self._rung_study(rung)
        attr = st.user_attrs.get("baseline")
        if attr is None:
            with study_lock(self.spec.storage_url, self.spec.name, f"baseline{rung or ''}"):
                attr = _reload(st).user_attrs.get("baseline")
                if attr is None:
                    ev = self.evaluator if rung == 0 else self._rung_evaluator(rung)
                    what = "the baseline" if rung == 0 else f"the baseline at rung {rung} ({self.rungs[rung].label})"
                    self.log(f"evaluating {what} (trained once, then cached across studies)")
                    stated = None if self.spec.baseline_accuracy is None else self.spec.baseline_accuracy / 100
                    base = ev.evaluate_baseline(stated)
                    st.set_user_attr("baseline", base.to_dict())
                    st.set_user_attr("baseline_evaluations", int(st.user_attrs.get("baseline_evaluations", 0)) + 1)
                    self._warn_if_unresolvable(base, rung)
                    return base
        return Baseline.from_dict(attr)

    def _warn_if_unresolvable(self, base: Baseline, rung: int) -> None:
        """Say at once when a rung's baseline is at chance level or its validation set cannot
        resolve the tolerance (the answer will be marked uncertain; the same predicates decide
        it in the ledger)."""
        if base.correct is None or not len(base.correct):
            return
        chance = chance_level(base.accuracy, base.acc_low, self.data.num_classes)
        if chance:
            self.log(f"rung {rung}: {chance}; answers at this rung are marked uncertain")
        power = Power.at(len(base.correct), base.accuracy, self.question.feasibility.allowed_pp(base.accuracy),
                         rung=rung)
        if not power.resolves:
            self.log(f"power: at rung {rung}, {power.n_val} validation images at {100 * base.accuracy:.1f}% resolve "
                     f"drops of about ±{power.min_resolvable_drop_pp:.1f} pp, wider than the "
                     f"{power.tolerance_pp:g} pp tolerance: answers at this rung are marked uncertain")

    def warm_start(self) -> int:
        """Enqueue the paper's presets once per study, except those whose structure already breaks
        a budget and those this model cannot build (each listed once with its reason); returns how
        many were enqueued."""
        if not self.spec.warm_start or self.study.user_attrs.get("warm_started"):
            return 0
        with study_lock(self.spec.storage_url, self.spec.name, "warm_start"):
            if _reload(self.study).user_attrs.get("warm_started"):
                return 0
            n, skipped = 0, {}
            ev = self.evaluator
            for name in self.space.warm_start:
                recipe = Recipe(arch=get_preset(name).arch)
                try:
                    check = check_structure(ev.model_name, self.data.num_classes, recipe, self.spec.budgets,
                                            ev.input_size)
                except ArchError as exc:  # a preset of the family that this member cannot build
                    skipped[name] = f"does not apply: {exc}"
                    continue
                if not check.feasible:
                    skipped[name] = check.reason()
                    continue
                self.study.enqueue_trial(self.space.params_for(recipe), user_attrs={"preset": name},
                                         skip_if_exists=True)
                n += 1
            self.study.set_user_attr("warm_start_skipped", skipped)
            self.study.set_user_attr("warm_started", True)
            if skipped:
                self.log(f"warm start: {n} presets enqueued; {len(skipped)} skipped (structure breaks the "
                         f"budget, or the preset does not apply): {', '.join(skipped)}")
            return n

    # -- search ------------------------------------------------------------------------------
    def remaining(self) -> int:
        """Trials still missing from ``--trials`` (skipped and interrupted trials do not count)."""
        return max(0, self.spec.trials - len(counted_trials(self.study)))

    def _draw_cap(self) -> int:
        return self.spec.trials * MAX_DRAWS_PER_TRIAL

    def optimize(self, baseline: Baseline, reserve: Callable[[], float] | None = None) -> None:
        """Run trials until the study has ``trials`` counted ones (or the draw cap, or the time
        left minus what ``reserve()`` keeps for the promotions)."""
        target, cap = self.spec.trials, self._draw_cap()
        said: set[str] = set()
        why_stopped = {"reason": ""}
        durations: list[float] = []

        def gate(trial: optuna.Trial) -> str | None:
            # Workers that start a trial at the same moment would overshoot the target: the
            # lower-numbered running trials have priority, a trial they already complete yields.
            trials = self.study.get_trials(deepcopy=False)
            ahead = sum(t.state == TrialState.RUNNING and t.number < trial.number for t in trials)
            if sum(counts_toward_target(t) for t in trials) + ahead >= target:
                return "the study reached its target (other workers' trials complete it)"
            return None

        def keep() -> float:
            """Seconds kept back for the promotions: their estimate while it fits the time left;
            once it no longer fits, nothing (the search uses the whole budget: keeping time for
            promotions that cannot run would only stop the search early)."""
            if reserve is None or self.deadline is None:
                return 0.0
            need, left = reserve(), self._time_left()
            if need < left:
                return need
            if "no-fit" not in said:
                said.add("no-fit")
                self.log(f"time budget: the promotions need an estimated {need:.0f} s of the {max(0.0, left):.0f} s "
                         "left, so the search uses all of it")
            return 0.0

        def stop_at() -> float | None:
            # the search's share of the time budget
            return None if self.deadline is None else self.deadline - keep()

        objective = Objective(self.evaluator, self.space, baseline, self.spec.max_drop, self.spec.budgets,
                              self.spec.max_trial_seconds, structure_policy=self.spec.structure_policy,
                              seed=self.sampler_seed, gate=gate, stop_at=stop_at)
        reap_dead_trials(self.study, objective.values_from_dict)  # a killed earlier run's trials
        if self.remaining() <= 0:
            return
        if self.spec.structure_policy == "resample":
            # before the first trial: Optuna draws a trial's relative sample when it creates it
            objective.attach(self.study)

        def stop(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            # Count the trials other workers are running too: with finished trials alone, every
            # worker of a fleet starts one more trial near the end and the study overshoots the
            # target by up to one trial per worker. A dead worker's trial stops counting once it
            # is known dead: at once on this machine, after its heartbeat's grace elsewhere
            # (failed here, and queued again for the next trial of a live worker).
            reap_dead_trials(study, objective.values_from_dict)
            optuna.storages.fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            if trial is not None and trial.duration is not None:
                durations.append(trial.duration.total_seconds())
            streak = self._no_fit_streak(study)
            if streak:
                why_stopped["reason"] = "no draft of the last trials fitted the budgets"
                self.stop_unreachable(study, streak)
            elif sum(counts_toward_target(t) for t in trials) + running >= target:
                study.stop()
            elif len(trials) >= cap:
                why_stopped["reason"] = (f"the study drew {cap} trials ({MAX_DRAWS_PER_TRIAL} per trial asked) "
                                         "without reaching its target")
                study.stop()
            elif self.deadline is not None:
                kept, left = keep(), self._time_left()
                # with time kept for the promotions, stop when the next trial (as long as the
                # median so far) would eat into it
                margin = sorted(durations)[len(durations) // 2] if durations and kept > 0 else 0.0
                if left <= kept + margin:
                    why_stopped["reason"] = ("the time budget (--timeout) ended the search, keeping an estimated "
                                             f"{kept:.0f} s for the promotions" if kept > 0
                                             else "the time budget (--timeout) ended the search")
                    self.log("time budget: the search stops here to leave the promotions their time" if kept > 0
                             else "time budget: the search stops here (the time is up)")
                    study.stop()

        def count(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            self.trials_run += 1
            interrupts.check()  # a Ctrl-C that CPython dropped while the trial ran

        for cb in self.callbacks:  # progress bars start with the trials, not before
            start = getattr(cb, "start", None)
            if start is not None:
                start(self.study)
        timeout = None if self.deadline is None else max(1.0, self._time_left())
        guard_trial_creation(self.study)  # no RUNNING trial without its worker, whenever Ctrl-C lands
        try:
            while True:
                try:
                    self.study.optimize(interruptible(objective), n_trials=max(1, cap - len(self.study.trials)),
                                        timeout=timeout, catch=(TrialFailed,), callbacks=[stop, count, *self.callbacks])
                    break
                except UpdateFinishedTrialError as exc:
                    # Another process finished this worker's trial first (a heartbeat judged stale on a
                    # loaded machine, a reaper): its outcome is recorded there; the search goes on.
                    self.log(f"trial finished by another process meanwhile ({exc}); the search goes on")
                    if self.remaining() <= 0 or (self.deadline is not None and self._time_left() <= 0):
                        break
                    timeout = None if self.deadline is None else max(1.0, self._time_left())
        except KeyboardInterrupt:
            release_own_trials(self.study, objective.values_from_dict)  # caught outside the objective
            raise
        self._note_stop(why_stopped["reason"] or ("the time budget (--timeout) ended the search"
                                                  if self.deadline is not None and self._time_left() <= 0 else ""))

    def _note_stop(self, reason: str) -> None:
        """Store why the search stopped short of ``--trials`` (cleared once it reached it), for
        the explanation's line saying so."""
        short = self.remaining() > 0
        value = reason or "the search stopped early" if short else None
        if self.study.user_attrs.get("search_stopped") != value:
            self.study.set_user_attr("search_stopped", value)

    # -- promotion rungs ---------------------------------------------------------------------
    def _rung_study(self, k: int) -> optuna.Study:
        st = optuna.create_study(storage=self.study._storage, study_name=rung_study_name(self.spec.name, k),
                                 load_if_exists=True, direction="maximize",
                                 sampler=optuna.samplers.RandomSampler(seed=self.spec.seed))
        if "label" not in st.user_attrs:
            st.set_user_attr("label", self.rungs[k].label)
            st.set_user_attr("protocol", self.rungs[k].protocol.to_dict())
        return st

    def _rung_evaluator(self, k: int) -> Evaluator:
        """Candidates of rung k train under its protocol and distil from the rung's baseline; a
        second-seed rung reuses the search's baseline."""
        if k not in self._rung_evaluators:
            p = self.rungs[k].protocol.replace(threads=self.protocol.threads)
            same = p.replace(seed=self.evaluator.protocol.seed) == self.evaluator.protocol
            self._rung_evaluators[k] = self._evaluator(p, latency=False,
                                                       teacher=self.evaluator.protocol if same else None)
        return self._rung_evaluators[k]

    def ledger(self) -> Ledger:
        """Everything the study has measured so far (read fresh from storage)."""
        return Ledger.from_study(_reload(self.study))

    def _estimate_rung_seconds(self, k: int, measured: list[Evaluation]) -> tuple[float, float]:
        """(baseline seconds, seconds per promoted candidate) of rung k, scaled from rung k-1 by
        epochs x pixels x training images (0 for what is cached or given); ``measured``: the
        evaluations at rung k-1."""
        lo, hi = self.rungs[k - 1].protocol, self.rungs[k].protocol
        native = self.data.native_resolution
        n = self.data.n_train

        def work(p: ProxyProtocol) -> float:
            size = min(p.train_size or n, n)
            return p.epochs * p.input_resolution(native) ** 2 * size

        factor = work(hi) / max(work(lo), 1.0)
        base_attr = (self.study if k == 1 else self._rung_study(k - 1)).user_attrs.get("baseline", {})
        base_s = 0.0
        if self.spec.checkpoint is None and self.spec.baseline_accuracy is None:
            ev = self._rung_evaluator(k)
            if not (self.cache and self.cache.contains(ev.baseline_key())):
                base_s = float(base_attr.get("train_seconds") or 0.0) * factor
        secs = [max(e.train_seconds, e.wall_seconds) for e in measured]
        per = (sorted(secs)[len(secs) // 2] if secs else 0.0) * factor
        return base_s, per

    def promotion_reserve(self) -> float:
        """Seconds the next promotion rung is estimated to need (0 when it will not run)."""
        if len(self.rungs) < 2 or self.study.user_attrs.get("promoted_1") is not None:
            return 0.0
        measured = [m.evaluation for _, m in Ledger.from_study(self.study).measured_at(0)]
        base_s, per = self._estimate_rung_seconds(1, measured)
        return base_s + per * self.plan.policy.min_promoted / max(1, self.plan.jobs)

    def decide(self, k: int, baseline: Baseline) -> list[int]:
        """Choose (once per study, under the lock) the candidates promoted to rung k and enqueue
        them in rung k's study; returns their source trial numbers ([] when the rung is skipped).
        Who goes up is the ledger's rule (:meth:`recommender.ledger.Ledger.promotion`: those that
        held before those that only might). A rung skipped because its estimated time does not
        fit the time left is not decided: a later run of the study (with time left) decides it."""
        key = f"promoted_{k}"
        if self.study.user_attrs.get(key) is not None:
            return list(self.study.user_attrs[key])
        with study_lock(self.spec.storage_url, self.spec.name, key):
            study = _reload(self.study)
            if study.user_attrs.get(key) is not None:
                return list(study.user_attrs[key])
            ledger = Ledger.from_study(study)
            base_s, per = self._estimate_rung_seconds(k, [m.evaluation for _, m in ledger.measured_at(k - 1)])
            left = self._time_left()
            limit = None
            reason = ""
            if base_s + per > left:
                reason = (f"estimated {base_s + per:.0f} s (baseline {base_s:.0f} s + one candidate {per:.0f} s) "
                          f"> {max(0.0, left):.0f} s left of the time budget")
                limit = 0
            elif per > 0 and math.isfinite(left):
                limit = int((left - base_s) * max(1, self.plan.jobs) // per)
            chosen = [] if limit == 0 else ledger.promotion(k, self.plan.policy.count, limit)
            if not chosen and not reason:
                reason = "no candidate of the rung below is eligible (budgets met, drop interval reaching the tolerance)"
            rst = self._rung_study(k)
            if reason:
                rst.set_user_attr("skipped", reason)
                self.log(f"rung {k} ({self.rungs[k].label}) not run: {reason}")
                if limit == 0:
                    # skipped for lack of time: not a decision, a later run with time left decides
                    return []
            elif rst.user_attrs.get("skipped"):
                rst.set_user_attr("skipped", None)  # an earlier run's time skip: it runs now
            for e in chosen:
                below = e.at(k - 1)
                costs = below.evaluation.costs if below is not None else {}
                rst.enqueue_trial({}, user_attrs={"source_trial": e.trial, "recipe": e.recipe.to_dict(),
                                                  "preset": e.preset,
                                                  "latency": {f: e.costs.get(f, costs.get(f)) for f in LATENCY_FIELDS}})
            numbers = [e.trial for e in chosen]
            rst.set_user_attr("promoted", numbers)
            self.study.set_user_attr(key, numbers)
            if numbers:
                self.log(f"promoting {len(numbers)} candidate(s) to rung {k} ({self.rungs[k].label}): "
                         f"trials {', '.join(map(str, numbers))}")
            return numbers

    def run_rung(self, k: int) -> int:
        """Evaluate the enqueued candidates of rung k (this worker's share); returns how many.

        Each is an Optuna trial of rung k's study run through ``optimize`` (heartbeats: a dead
        worker's candidate is failed and re-enqueued with the same attributes)."""
        rst = self._rung_study(k)
        baseline = self.baseline(k)
        ev = self._rung_evaluator(k)
        reap_dead_trials(rst, rung_values)  # a killed earlier run's evaluations count
        self._requeue(k)
        done = 0

        def objective(trial: optuna.Trial) -> float:
            src = trial.user_attrs.get("source_trial")
            if src is None:  # another worker took the last candidate: nothing to do in this trial
                raise optuna.TrialPruned("no candidate left to promote")
            recipe = Recipe.from_dict(trial.user_attrs["recipe"])
            self.log(f"rung {k}: trial {src} ({recipe.describe()})")
            res = ev.evaluate(recipe, baseline, self.spec.max_drop)
            if trial.user_attrs.get("latency"):  # costs do not depend on the fidelity: keep rung 0's
                res.costs = {**res.costs, **trial.user_attrs["latency"]}
            trial.set_user_attr("evaluation", res.to_dict())
            if not res.ok:
                trial.set_user_attr("fail_reason", res.reason)
                raise TrialFailed(res.reason)
            return float(res.accuracy)

        while rst.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            rst.optimize(objective, n_trials=1, catch=(TrialFailed,))
            done += 1
        return done

    def _teacher_ready(self, ev: Evaluator | None = None) -> None:
        """Compute the teacher's logits (and stage features) once here, cached on disk, before
        workers need them."""
        ev = ev or self.evaluator
        if ev.distill and self.spec.baseline_accuracy is None:
            ev._teacher_logits(ev.protocol)  # distillation of rewritten architectures, if on
            ev._teacher_logits(ev.protocol, recovery=True)  # of pruned candidates' recovery
            ev._teacher_features(ev.protocol)  # block-wise distillation, if on

    def _sensitivity_ready(self) -> None:
        """Measure the trained baseline's pruning sensitivity once here, with every thread, when
        the space can draw a sensitivity allocation: workers would otherwise wait for one of
        them to measure it on its share of the threads."""
        if any(d.key == "prune.allocation" and "sensitivity" in ((d.value,) if d.fixed else (d.choices or ()))
               for d in self.space.dimensions):
            self.evaluator.prune_sensitivity()

    def promote(self, jobs: int = 1) -> None:
        """Promotion rungs 1.. in order, each decided once and evaluated by every worker."""
        for k in range(1, len(self.rungs)):
            base_below = self.baseline(k - 1)
            if not self.decide(k, base_below):
                return
            self.baseline(k)  # trained here with every thread, before the workers start
            if jobs > 1:
                self._teacher_ready(self._rung_evaluator(k))
                run_workers(self.worker_spec, jobs, "rung", rung=k, deadline=self.deadline, log=self.log)
            else:
                self.run_rung(k)
            _wait_for(self._rung_study(k))

    def _requeue(self, k: int) -> None:
        """Enqueue again the promoted candidates of rung k whose evaluation never finished (an
        interrupted run): a resumed study continues its promotions where it stopped."""
        promoted = self.study.user_attrs.get(f"promoted_{k}") or []
        if not promoted:
            return
        with study_lock(self.spec.storage_url, self.spec.name, f"requeue_{k}"):
            rst = _reload(self._rung_study(k))
            live = {int(t.user_attrs["source_trial"]) for t in rst.get_trials(deepcopy=False)
                    if t.user_attrs.get("source_trial") is not None and (
                        t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
                        or (t.state == TrialState.FAIL and "fail_reason" in t.user_attrs))}
            by_src = {int(t.user_attrs["source_trial"]): t for t in rst.get_trials(deepcopy=False)
                      if t.user_attrs.get("source_trial") is not None}
            for n in promoted:
                if n not in live and n in by_src:
                    attrs = {a: v for a, v in by_src[n].user_attrs.items() if a not in ("evaluation", "fail_reason")}
                    rst.enqueue_trial({}, user_attrs=attrs)
                    self.log(f"rung {k}: trial {n} was interrupted; enqueued again")

    def _poll(self) -> None:
        for cb in self.callbacks:
            cb(self.study, None)

    def run(self) -> optuna.Study:
        t0 = time.perf_counter()
        if self.spec.timeout:
            self.deadline = time.monotonic() + self.spec.timeout
        baseline = self.baseline()
        self.warm_start()
        jobs = self.plan.jobs
        if jobs > 1:
            if self.remaining() > 0:
                for cb in self.callbacks:
                    start = getattr(cb, "start", None)
                    if start is not None:
                        start(self.study)
                self._teacher_ready()
                self._sensitivity_ready()
                try:
                    run_workers(self.worker_spec, jobs, "search", deadline=self.deadline, log=self.log, poll=self._poll)
                except KeyboardInterrupt:
                    # The workers have stopped or were killed past their grace period; a killed
                    # one's trial is still RUNNING: fail it and queue it again now, not at the
                    # next run (a trial it had finished evaluating is completed from its result).
                    reap_dead_trials(self.study, functools.partial(objective_values, primary=self.spec.budgets[0]))
                    raise
        else:
            self.optimize(baseline, reserve=self.promotion_reserve)
        self.promote(jobs)
        self.study.set_user_attr("last_run_seconds", round(time.perf_counter() - t0, 1))
        return self.study


def rung_values(ev: Any) -> list[float]:
    """A promotion rung's objective value from a stored evaluation: its accuracy."""
    return [float(ev["accuracy"])]


def _wait_for(study: optuna.Study, poll: float = 2.0) -> None:
    """Wait until no trial of rung ``study`` is running (other workers finishing their share); a
    dead worker's trial is finished from its stored evaluation (or failed and queued again) at
    once on this machine, once its heartbeat is stale elsewhere."""
    while True:
        reap_dead_trials(study, rung_values)
        optuna.storages.fail_stale_trials(study)
        if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            return
        time.sleep(poll)


def check_writable(spec: StudySpec) -> None:
    """The folders a run writes (the SQLite database's, the reports', the weights cache) exist
    or can be created, and can be written; else a one-line error before any work."""
    db = storage_mod.sqlite_path(spec.storage_url)
    if db is not None:
        validate.writable_dir(db.parent, "the folder of the study database", error=StorageError)
    validate.writable_dir(spec.studies_dir, "--studies-dir (reports)")
    validate.writable_dir(spec.cache_root, "--cache-dir (trained weights)")


def _reload(study: optuna.Study) -> optuna.Study:
    """A fresh view of the study's attributes (another worker may have written them)."""
    return optuna.load_study(study_name=study.study_name, storage=study._storage)
