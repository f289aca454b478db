"""One recipe measured end to end: build -> train (or inherit, or cache) -> compress -> evaluate -> measure.

:class:`Evaluator` holds what every trial of a study shares (the data, the proxy protocol, the
trained-weights cache, the baseline and its logits for distillation). Trained weights are keyed by
(model, ArchConfig, protocol, seed, dataset), so trials that share an architecture and differ only
in pruning or quantization cost an evaluation, not a training. Pruning and quantization are always
applied to trained weights and measured, never guessed.
"""

from __future__ import annotations

import base64
import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import measure as measure_mod
from .cache import WeightsCache
from .compress import checkpoint as ckpt
from .compress.pipeline import compress
from .compress.prune_sensitivity import PruneSensitivity, SensitivityConfig, measure_sensitivity, sensitivity_name
from .constraints import MaxDrop
from .data import TensorData
from .errors import ArchError, RecommenderError, TrainingError
from .latency_profile import load_profile
from .models import build_model, get_family
from .models.arch import ArchConfig
from .ort_latency import ort_unsupported
from .protocol import ProxyProtocol
from .recipe import Recipe
from .train import (TimeLimitReached, batches, evaluate, finetune_fn, paired_drop, protocol_data, step_seconds,
                    teacher_features, teacher_logits, train_model)

Log = Callable[[str], None]
# progress(label, step, total_steps, loss): after every optimiser step of a training run.
TrainProgress = Callable[[str, int, int, float], None]


def pack_bools(a: np.ndarray | None) -> str | None:
    """Per-image correctness vector -> compact base64 (stored on the study)."""
    if a is None:
        return None
    a = np.asarray(a, dtype=bool)
    return f"{a.size}:" + base64.b64encode(np.packbits(a).tobytes()).decode()


def unpack_bools(s: str | None) -> np.ndarray | None:
    if not s:
        return None
    n, _, data = s.partition(":")
    return np.unpackbits(np.frombuffer(base64.b64decode(data), dtype=np.uint8))[: int(n)].astype(bool)


@dataclass
class Baseline:
    """The reference: the unmodified model under the same protocol (or the user's checkpoint).

    accuracy, acc_low, acc_high: fractions in [0, 1] with a 95 % interval.
    correct: per-image correctness on the validation images (None for a stated accuracy).
    costs: :class:`recommender.measure.Costs` as a dict (params, MFLOPs, MB, ms).
    source: ``trained`` (under ``fidelity``), ``checkpoint`` or ``stated``.
    """

    accuracy: float
    acc_low: float
    acc_high: float
    costs: dict[str, Any]
    source: str
    fidelity: str
    correct: np.ndarray | None = None
    train_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "correct"}
        d["correct"] = pack_bools(self.correct)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Baseline":
        d = dict(d)
        correct = unpack_bools(d.pop("correct", None))
        return cls(correct=correct, **d)


@dataclass
class Evaluation:
    """A recipe's measured outcome.

    Accuracies are fractions; drops are percentage points (positive = worse than the baseline)
    with a paired 95 % bootstrap interval; ``prob_within`` is the bootstrap probability that the
    drop is within the tolerance. ``costs`` holds params, nonzero_params, mflops (MFLOPs),
    size_mb, sparse_size_mb (MB), latency_ms (ms), peak_memory_mb (MB).
    """

    recipe: dict[str, Any]
    ok: bool = True
    reason: str = ""
    accuracy: float | None = None
    acc_low: float | None = None
    acc_high: float | None = None
    drop_pp: float | None = None
    drop_low_pp: float | None = None
    drop_high_pp: float | None = None
    prob_within: float | None = None
    costs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fidelity: str = ""
    seed: int = 0
    cached_training: bool = False
    inherited: bool = False
    train_seconds: float = 0.0
    wall_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Evaluation":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Evaluator:
    """Evaluates recipes of one base model on one dataset under one proxy protocol.

    Trained-model-first: the baseline is trained once (or given, ``checkpoint``) and every
    candidate that keeps its layers (pruning, quantization of the baseline architecture) starts
    from its trained weights and recovers for ``protocol.recovery_epochs`` with logit distillation
    from it; architecture rewrites, which cannot inherit weights, train from scratch under the
    protocol, distilling from the trained baseline when the protocol says so.

    Args:
        model: a registered model name (``resnet101``, ``tv:mobilenet_v2``, a registered user
            module; see :func:`recommender.models.list_models`).
        data: the dataset (its ``num_classes`` sets the classifier).
        protocol: the proxy protocol that trains candidates (and the baseline).
        cache: the trained-weights cache (None: train every time, keep nothing).
        deploy_size: input side in px at which FLOPs, size and latency are measured (default:
            the family's, e.g. 32 for the paper's CIFAR networks).
        latency: measure CPU latency (ms, batch 1, ``latency_threads`` threads).
        latency_profile: a device latency profile (path): also predict each candidate's
            latency on that device (``latency_predicted_ms``; a kind of operator the profile
            lacks is a one-line :class:`ProfileError`).
        ort_latency: also time each candidate in ONNX Runtime (``latency_ort_ms``; None, with
            a note, for recipes it cannot run).
        checkpoint: a trained baseline state dict (evaluated, never retrained).
        weights: initial weights of the baseline (e.g. ImageNet-pretrained), loaded where shapes
            match (a classifier of another class count is re-initialised), then trained.
        distill: candidates learn from the trained baseline's logits when the protocol asks
            for it (``distill_alpha`` > 0); off for a stated baseline accuracy (no teacher).
        teacher_protocol: the protocol the baseline (reference and teacher) was trained under,
            when it differs from ``protocol`` only in its seed (a second seed reuses the
            search's baseline instead of training another one).
        log: where progress lines go.
        progress: called after every training step as ``progress(label, step, total, loss)``
            (label: ``baseline`` or the architecture's description); None: silent.
    """

    def __init__(self, model: str, data: TensorData, protocol: ProxyProtocol, *,
                 cache: WeightsCache | None = None, deploy_size: int | None = None, latency: bool = True,
                 latency_threads: int = 1, latency_profile: str | Path | None = None,
                 ort_latency: bool = False, checkpoint: str | Path | None = None,
                 weights: str | Path | None = None, distill: bool = True,
                 teacher_protocol: ProxyProtocol | None = None, log: Log | None = None,
                 progress: TrainProgress | None = None):
        self.model_name = model
        self.family = get_family(model)
        self.data = data
        min_res = self.family.min_input
        if protocol.input_resolution(data.native_resolution) < min_res:
            protocol = protocol.replace(resolution=min_res)
        self.protocol = protocol
        self.teacher_protocol = protocol if teacher_protocol is None else teacher_protocol.replace(
            resolution=protocol.resolution, max_resolution=protocol.max_resolution)
        self.cache = cache
        self.deploy_size = int(deploy_size or self.family.deploy_size(data.native_resolution))
        self.latency = latency
        self.latency_threads = latency_threads
        self.profile = load_profile(latency_profile) if latency_profile else None
        self.ort_latency = ort_latency
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.weights = Path(weights) if weights else None
        self.log = log or (lambda s: None)
        self.progress = progress
        self.distill = distill
        self._baseline_model: nn.Module | None = None
        self._baseline_seconds = 0.0
        self._estimates: dict[str, float] = {}  # arch -> estimated training seconds
        self._teacher: torch.Tensor | None = None
        self._features: tuple[int, list[torch.Tensor]] | None = None
        self._sensitivity: dict[SensitivityConfig, PruneSensitivity] = {}
        self._quant_sensitivity: dict[tuple[Any, ...], Any] = {}
        self._bn_images: list[torch.Tensor] | None = None
        self._source = self._source_identity()
        net = self._build(ArchConfig())  # fail fast on a bad model or class count
        if self.family.style == "custom":
            self._check_outputs(net)

    def _check_outputs(self, net: nn.Module) -> None:
        """A user module has its own classifier: it must output one score per class."""
        try:
            with torch.no_grad():
                out = net.eval()(torch.zeros(self.input_size))
        except Exception as exc:
            raise RecommenderError(f"{self.model_name} does not run on a {self.input_size} input: "
                                   f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != self.data.num_classes:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise RecommenderError(f"{self.model_name} outputs {shape} for one image; the dataset has "
                                   f"{self.data.num_classes} classes (expected (1, {self.data.num_classes}))")

    # -- identity ----------------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int, int, int]:
        return (1, 3, self.deploy_size, self.deploy_size)

    def _source_identity(self) -> dict[str, Any]:
        """What besides the name identifies the baseline's weights: a user module's hash, the
        checkpoint or initial weights (by content)."""
        src: dict[str, Any] = {}
        if self.family.identity:
            src["module"] = self.family.identity
        if self.checkpoint:
            src["checkpoint"] = ckpt.file_digest(self.checkpoint)
        if self.weights:
            src["weights"] = ckpt.file_digest(self.weights)
        return src

    def _build(self, arch: ArchConfig) -> nn.Module:
        return build_model(self.model_name, arch, num_classes=self.data.num_classes)

    def _key(self, arch: ArchConfig, protocol: ProxyProtocol, teacher: bool) -> str:
        extra = {"distilled_from": self.baseline_key()} if teacher else {}
        return WeightsCache.key(self.model_name, {"arch": arch.to_dict(), **extra}, protocol.key(),
                                protocol.seed, self.data.identity)

    def baseline_key(self, protocol: ProxyProtocol | None = None) -> str:
        p = (protocol or self.teacher_protocol).for_baseline()
        return WeightsCache.key(self.model_name, {"arch": ArchConfig().to_dict(), **self._source}, p.key(), p.seed,
                                self.data.identity)

    # -- training ----------------------------------------------------------------------------
    def baseline_model(self) -> nn.Module:
        """The trained baseline: the user's checkpoint, else trained once and cached."""
        if self._baseline_model is None:
            if self.checkpoint:
                model = self._build(ArchConfig())
                ckpt.load_checked(model, self.checkpoint, what=f"{self.model_name} with "
                                  f"{self.data.num_classes} classes")
                model.eval()
                self._baseline_model = model
            else:
                self._baseline_model, meta, _ = self._train(ArchConfig(), self.teacher_protocol, teacher=False)
                self._baseline_seconds = float(meta.get("seconds", 0.0))
        return self._baseline_model

    def _teacher_arrays(self, names: list[str], compute: Callable[[], list[torch.Tensor]],
                        shapes: list[tuple[int | None, ...]] | None = None) -> list[torch.Tensor]:
        """Arrays computed from the trained baseline (teacher logits, stage outputs): from the
        cache under the baseline's key (a cached array not of its expected shape in ``shapes``
        is discarded), else ``compute()`` once and stored there."""
        key = self.baseline_key()
        shapes = shapes or [None] * len(names)
        arrs = [self.cache.load_array(key, n, s) for n, s in zip(names, shapes)] if self.cache else [None]
        if any(a is None for a in arrs):
            arrs = [t.numpy() for t in compute()]
            if self.cache:
                for n, a in zip(names, arrs):
                    self.cache.save_array(key, n, a)
        return [torch.as_tensor(a) for a in arrs]

    def _teacher_logits(self, protocol: ProxyProtocol, *, recovery: bool = False) -> torch.Tensor | None:
        alpha = protocol.recovery_distill_alpha if recovery else protocol.distill_alpha
        if alpha <= 0 or not self.distill:
            return None
        if self._teacher is None:
            rows = protocol_data(self.data, self.teacher_protocol).n_train
            self._teacher = self._teacher_arrays(
                ["teacher_logits"], lambda: [teacher_logits(self.baseline_model(), self.data, self.teacher_protocol)],
                [(rows, self.data.num_classes)])[0]
        return self._teacher

    def _teacher_features(self, protocol: ProxyProtocol) -> list[torch.Tensor] | None:
        """The trained baseline's pooled stage outputs (block-wise distillation), computed once
        and cached; None when the protocol does not ask for them or the family has no stages."""
        if protocol.feature_distill_alpha <= 0 or not self.distill or not self.family.stages:
            return None
        pool = protocol.feature_distill_pool
        if self._features is None or self._features[0] != pool:
            stages = self.family.stages
            names = [f"stage_features_p{pool}_{i}" for i in range(len(stages))]
            teacher_p = self.teacher_protocol.replace(feature_distill_pool=pool)
            rows = protocol_data(self.data, teacher_p).n_train
            self._features = (pool, self._teacher_arrays(
                names, lambda: teacher_features(self.baseline_model(), self.data, teacher_p, stages),
                [(rows, None, pool, pool)] * len(names)))
        return self._features[1]

    def _init_baseline(self, model: nn.Module) -> None:
        if self.weights:
            skipped = ckpt.load_matching(model, self.weights)
            if skipped:
                self.log(f"initial weights {self.weights.name}: re-initialised {', '.join(skipped[:3])}"
                         f"{' ...' if len(skipped) > 3 else ''} (shapes differ, e.g. the class count)")

    def _train(self, arch: ArchConfig, protocol: ProxyProtocol, *, teacher: bool, deadline: float | None = None
               ) -> tuple[nn.Module, dict[str, Any], bool]:
        """Build and train ``arch`` (or load it from the cache). Returns (model, meta, cache hit).
        A training stopped at ``deadline`` (``time.monotonic()``) fails and is not cached."""
        logits = self._teacher_logits(protocol) if teacher else None
        feats = self._teacher_features(protocol) if teacher else None
        baseline = arch == ArchConfig() and not teacher
        key = self.baseline_key(protocol) if baseline else self._key(arch, protocol,
                                                                      logits is not None or feats is not None)
        label = "baseline" if baseline else arch.describe()

        def train_fn(m: nn.Module) -> dict[str, Any]:
            if baseline:
                self._init_baseline(m)
            self.log(f"training {self.model_name} [{label}] at {protocol.fidelity} fidelity")
            # the baseline's pace is estimated here (3 steps of a throwaway build); a candidate's
            # comes from the search's pre-check, which timed it the same way
            est = self._estimates.get(arch.to_json(sort_keys=True))
            if est is None and baseline:
                est = self._estimate(arch, protocol)
            report = self.progress
            step_fn = (lambda step, total, loss: report(label, step, total, loss)) if report else None
            res = train_model(m, self.data, protocol, teacher_logits=logits, teacher_features=feats,
                              stages=self.family.stages, progress=step_fn, deadline=deadline)
            note = pace_note(label, res.seconds, est)
            if note:
                self.log(note)
            if not res.ok:
                raise TrainingFailed(res.reason)
            return res.to_dict()

        build = lambda: self._build(arch)  # noqa: E731
        if self.cache is None:
            torch.manual_seed(protocol.seed)
            m = build()
            return m, train_fn(m), False
        res = self.cache.get_or_train(key, build, train_fn, seed=protocol.seed)
        return res.model, res.meta, res.hit

    def inherits(self, recipe: Recipe) -> bool:
        """Whether ``recipe`` starts from the trained baseline's weights (it keeps its layers)."""
        return recipe.arch == ArchConfig()

    def estimate_train_seconds(self, arch: ArchConfig, steps: int = 2, *, always: bool = False) -> float | None:
        """Seconds a proxy training of ``arch`` would take here, from ``steps`` timed SGD steps
        (after one warm-up) at the protocol's batch size and resolution on its device; None when no
        training is needed (the baseline's architecture, or trained weights already cached), unless
        ``always`` (a reference time: the baseline architecture's, say)."""
        if not always:
            if arch == ArchConfig():
                return None
            if self.cache is not None and self.cache.contains(self._key(arch, self.protocol, self._teacher is not None)):
                return None
        return self._estimate(arch, self.protocol, steps)

    def _estimate(self, arch: ArchConfig, protocol: ProxyProtocol, steps: int = 2) -> float:
        """Training seconds of ``arch`` under ``protocol`` from ``steps`` timed SGD steps on its
        device, precision and memory format; remembered for the pace check after training."""
        d = protocol_data(self.data, protocol)
        per_epoch = math.ceil(d.n_train / protocol.batch_size)
        est = step_seconds(self._build(arch), self.data, protocol, steps) * per_epoch * protocol.epochs
        self._estimates[arch.to_json(sort_keys=True)] = est
        return est

    def steps_per_epoch(self) -> int:
        """Optimiser steps in one epoch of the protocol's training subset."""
        d = protocol_data(self.data, self.protocol)
        return int(math.ceil(d.n_train / self.protocol.batch_size))

    def quant_sensitivity(self, cfg: Any) -> Any:
        """The trained baseline's per-layer int8 sensitivity for ``cfg``'s engine, observer and
        weight granularity (:mod:`recommender.compress.quant_sensitivity`), measured once per
        study on ``SENSITIVITY_BATCHES`` calibration batches and cached beside the baseline."""
        from .compress.quant_sensitivity import SENSITIVITY_BATCHES, cached_quant_sensitivity

        opts = (cfg.engine, cfg.observer, cfg.per_channel)
        if opts not in self._quant_sensitivity:
            self._quant_sensitivity[opts] = cached_quant_sensitivity(
                self.cache, self.baseline_key(), self.baseline_model(),
                batches(self.data, self.protocol, SENSITIVITY_BATCHES),
                engine=cfg.engine, observer=cfg.observer, per_channel=cfg.per_channel)
        return self._quant_sensitivity[opts]

    def quant_ranking(self, cfg: Any) -> tuple[str, ...] | None:
        """Layer names most int8-sensitive first, for a config that keeps some in float (None
        otherwise: nothing is measured)."""
        if getattr(cfg, "keep_float", 0) <= 0:
            return None
        return self.quant_sensitivity(cfg).ranking()

    def bn_images(self) -> list[torch.Tensor] | None:
        """The training images that re-estimate a pruned candidate's BN statistics
        (``protocol.recovery_bn_batches`` batches, the same seeded ones for every candidate):
        drawn once per evaluator, not once per trial; None when the re-estimation is off."""
        k = self.protocol.recovery_bn_batches
        if k and self._bn_images is None:
            self._bn_images = [b[0] for b in batches(self.data, self.protocol, k)]
        return self._bn_images if k else None

    def layers_that_matter(self, k: int = 5) -> dict[str, Any]:
        """What this evaluator has measured of the trained baseline's per-layer sensitivity, as
        ``{"prune": ..., "int8": ...}`` summaries (:meth:`PruneSensitivity.summary`,
        :meth:`QuantSensitivity.summary`) of the ``k`` layers that cost most; empty when no
        candidate needed a measurement (nothing is measured for this)."""
        out: dict[str, Any] = {}
        if self._sensitivity:
            out["prune"] = next(iter(self._sensitivity.values())).summary(k)
        if self._quant_sensitivity:
            out["int8"] = next(iter(self._quant_sensitivity.values())).summary(k)
        return out

    def recovery_steps(self) -> int:
        """Optimiser steps of recovery training after pruning (``protocol.recovery_epochs``)."""
        return int(math.ceil(self.protocol.recovery_epochs * self.steps_per_epoch()))

    def prune_sensitivity(self, config: SensitivityConfig | None = None) -> PruneSensitivity:
        """The trained baseline's per-group pruning sensitivity (:mod:`.compress.prune_sensitivity`),
        measured once on training batches at the deploy input size and kept in the cache next to
        the baseline's weights (whose key names the checkpoint, the dataset and the protocol)."""
        cfg = config or SensitivityConfig()
        if cfg in self._sensitivity:
            return self._sensitivity[cfg]

        def measure() -> PruneSensitivity:
            model = self.baseline_model()
            bs = list(batches(self.data, self.protocol, cfg.calib_batches + cfg.score_batches))
            self.log(f"measuring the pruning sensitivity of {self.model_name} ({len(bs)} training batches)")
            t0 = time.perf_counter()
            sens = measure_sensitivity(model, bs[:cfg.calib_batches], bs[cfg.calib_batches:],
                                       torch.randn(self.input_size), ratios=cfg.ratios)
            # once per baseline, and not stopped by --timeout: say what it cost
            self.log(f"pruning sensitivity of {len(sens.groups)} groups measured in {time.perf_counter() - t0:.0f} s"
                     f"{'; cached for every later study of this baseline' if self.cache else ''}")
            return sens

        sens = measure() if not self.cache else self.cache.json_once(
            self.baseline_key(), sensitivity_name(cfg), measure,
            parse=PruneSensitivity.from_dict, dump=PruneSensitivity.to_dict)
        self._sensitivity[cfg] = sens
        return sens

    # -- evaluation --------------------------------------------------------------------------
    def evaluate_baseline(self, stated_accuracy: float | None = None) -> Baseline:
        """Evaluate the baseline once (its costs always; its accuracy unless stated). A baseline
        whose training diverges is a one-line :class:`TrainingError`: no candidate can be
        measured against it."""
        t0 = time.perf_counter()
        float_model = self._build(ArchConfig())
        costs = measure_mod.measure(float_model, self.input_size, latency=self.latency,
                                    threads=self.latency_threads, ort_latency=self.ort_latency,
                                    profile=self.profile).to_dict()
        if stated_accuracy is not None:
            acc = float(stated_accuracy)
            return Baseline(acc, acc, acc, costs, "stated", self.protocol.fidelity, None, 0.0)
        try:
            model = self.baseline_model()
        except TrainingFailed as exc:
            raise TrainingError(f"the baseline {self.model_name} could not be trained at "
                                f"{self.protocol.fidelity} fidelity: {exc}") from None
        ev = evaluate(model, self.data, self.protocol)
        src = "checkpoint" if self.checkpoint else "trained"
        # the training's own seconds (also when its weights came from the cache): what a rung
        # above costs is estimated from it
        return Baseline(ev.accuracy, ev.ci_low, ev.ci_high, costs, src, self.protocol.fidelity,
                        ev.correct, self._baseline_seconds or time.perf_counter() - t0)

    def evaluate(self, recipe: Recipe, baseline: Baseline | None, max_drop: MaxDrop | None = None,
                 *, return_model: bool = False, deadline: float | None = None) -> Any:
        """Build, train (or inherit), prune, recover, quantize, evaluate and measure one recipe.

        ``deadline`` (a ``time.monotonic()`` value) bounds the whole evaluation: training stops
        there and the evaluation fails with the reason (the trial time limit).
        Returns the :class:`Evaluation`, or ``(evaluation, compressed model)`` with
        ``return_model`` (the model is None when the evaluation failed)."""
        model = None
        t0 = time.perf_counter()
        out = Evaluation(recipe=recipe.to_dict(), fidelity=self.protocol.fidelity, seed=self.protocol.seed)
        try:
            if self.inherits(recipe):
                trained, meta, hit = self.baseline_model(), {}, True
                out.inherited = True
            else:
                trained, meta, hit = self._train(recipe.arch, self.protocol, teacher=True, deadline=deadline)
            _check_deadline(deadline, "after training")
            out.cached_training = hit
            out.train_seconds = float(meta.get("seconds", 0.0)) if not hit else 0.0
            model = copy.deepcopy(trained)
            example = torch.randn(self.input_size)
            n_batches = max(cfg.batches_needed() for cfg in recipe.stages())
            train_batches = list(batches(self.data, self.protocol, n_batches)) if n_batches else None
            qat = getattr(recipe.quant, "qat_epochs", 0) > 0
            teacher = self._teacher_logits(self.protocol, recovery=True) if recipe.prune.active or qat else None
            sens = (self.prune_sensitivity() if out.inherited and getattr(recipe.prune, "allocation", "") == "sensitivity"
                    else None)
            ranking = self.quant_ranking(recipe.quant) if self.inherits(recipe) else None
            bn_images = self.bn_images() if recipe.prune.active else None
            model, report = compress(model, recipe, example_input=example, batches=train_batches,
                                     finetune=finetune_fn(self.data, self.protocol, teacher, deadline=deadline),
                                     finetune_steps=self.recovery_steps(), sensitivity=sens,
                                     steps_per_epoch=self.steps_per_epoch(), quant_ranking=ranking,
                                     bn_images=bn_images)
            out.notes = compression_notes(report)
            _check_deadline(deadline, "after compression")
            ev = evaluate(model, self.data, self.protocol)
            out.accuracy, out.acc_low, out.acc_high = ev.accuracy, ev.ci_low, ev.ci_high
            if baseline is not None:
                self._fill_drop(out, ev.correct, baseline, max_drop)
            float_model = getattr(report, "float_model", None)
            out.costs = measure_mod.measure(model, self.input_size, latency=self.latency,
                                            float_model=float_model, threads=self.latency_threads,
                                            ort_latency=self.ort_latency, profile=self.profile).to_dict()
            if self.ort_latency and out.costs.get("latency_ort_ms") is None:
                out.notes.append(f"ONNX Runtime cannot time this recipe ({ort_unsupported(model)}): "
                                 f"its ONNX Runtime latency is unknown and counts as over a -ort budget")
        except (TrialTimeout, TimeLimitReached) as exc:
            out.ok, out.reason = False, str(exc)
        except TrainingFailed as exc:
            reason = str(exc)
            out.ok, out.reason = False, reason if reason.startswith("time limit") else f"training diverged: {reason}"
        except ArchError as exc:
            out.ok, out.reason = False, f"invalid architecture: {exc}"
        except RecommenderError:
            raise
        except Exception as exc:  # a candidate that cannot be built/compressed is a failed trial
            out.ok, out.reason = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        out.wall_seconds = time.perf_counter() - t0
        return (out, model if out.ok else None) if return_model else out

    def _fill_drop(self, out: Evaluation, correct: np.ndarray, baseline: Baseline,
                   max_drop: MaxDrop | None) -> None:
        if baseline.correct is not None and len(baseline.correct) == len(correct):
            d = paired_drop(baseline.correct, correct, seed=self.protocol.seed)
            out.drop_pp, out.drop_low_pp, out.drop_high_pp = d.drop_pp, d.ci_low_pp, d.ci_high_pp
            if max_drop is not None:
                out.prob_within = float(d.prob_within(max_drop.allowed_pp(baseline.accuracy)))
        else:  # a stated baseline accuracy: unpaired, the candidate's own interval only
            acc = out.accuracy or 0.0
            out.drop_pp = (baseline.accuracy - acc) * 100
            out.drop_low_pp = (baseline.accuracy - (out.acc_high or acc)) * 100
            out.drop_high_pp = (baseline.accuracy - (out.acc_low or acc)) * 100


def compression_notes(report: Any) -> list[str]:
    """What pruning and quantization left undone, in words (for the explanation)."""
    notes = []
    p, q = report.prune, report.quant
    if p.note and p.method != "none" and p.note != "no pruning requested":
        notes.append(f"pruning: {p.note}")
    if p.ignored_layers:
        shown = ", ".join(list(p.ignored_layers)[:4])
        more = f" and {len(p.ignored_layers) - 4} more" if len(p.ignored_layers) > 4 else ""
        n = len(p.ignored_layers)
        notes.append(f"structured pruning left {n} layer{'' if n == 1 else 's'} unpruned ({shown}{more})")
    if q.note:
        notes.append(f"quantization: {q.note}")
    if getattr(q, "qat_steps", 0):
        notes.append(f"quantization-aware fine-tune: {q.qat_steps} steps before int8 conversion")
    if q.float_modules:
        notes.append(f"quantization kept {len(q.float_modules)} modules in float "
                     f"({', '.join(list(q.float_modules)[:3])}{'...' if len(q.float_modules) > 3 else ''})")
    return notes


#: A training that takes this many times its two-step estimate is reported as slowed down.
SLOW_FACTOR = 3.0


def pace_note(label: str, seconds: float, estimate: float | None) -> str | None:
    """A line when a training ran far slower than estimated from its first timed steps (another
    process on the CPUs, most often), else None."""
    if not estimate or estimate <= 0 or seconds < SLOW_FACTOR * estimate:
        return None
    return (f"training [{label}] took {seconds:.0f} s, {seconds / estimate:.1f}x its estimate from timed steps "
            f"({estimate:.0f} s): something else is using the CPUs (two trainings at once ran about 5x slower on 2 "
            "cores); stop it, or lower --jobs / --threads")


class TrainingFailed(Exception):
    """A training run diverged (non-finite loss) or hit its time limit; the trial fails with the reason."""


class TrialTimeout(Exception):
    """The evaluation passed its deadline (the trial time limit)."""


def _check_deadline(deadline: float | None, where: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise TrialTimeout(f"time limit reached {where} (--max-trial-time)")



