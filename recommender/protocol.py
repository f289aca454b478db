"""How a candidate is trained and evaluated: :class:`ProxyProtocol` and the named fidelities.

A protocol fixes everything that decides a trained model's accuracy: data subset sizes, input
resolution, epochs, batch size, optimiser and schedule (SGD + OneCycle as in the paper), augmentation,
distillation and seed. Execution details that do not change the expected result (thread count,
device, precision, memory format, compilation, evaluation batch) are fields too but are left out
of :meth:`ProxyProtocol.key`.

Named fidelities (``FIDELITIES``), cheapest first:

- ``smoke``: tests and dry runs: 512 train / 256 val images, at most 8 px, 2 epochs, lr 0.05.
- ``proxy``: the search. Native resolution capped at 16 px (digits: 8 px), at most 4,096 train /
  2,000 val images (digits: all 1,347 / 450), 6 epochs, batch 64, Nesterov SGD, OneCycle max_lr
  0.02 (pct_start 0.25), wd 5e-4, zero-init residual BN, no augmentation.
- ``confirm``: the re-check of the finalists: up to 16,384 / 5,000 images, native resolution up
  to 32 px, 15 epochs, crop+flip augmentation.
- ``paper``: the paper's OneCycle protocol (section 5 of paper/variants.md): SGD m 0.9, wd 2e-5,
  max_lr 0.0125, pct_start 0.1, div 25 / 1e4, batch 128, 150 epochs, full data, 32 px, crop+flip.

How ``proxy`` was chosen (2-core CPU, torch 2.14, measured; ``benchmarks/proxy_cost.py``):

- ResNet-101 (CIFAR stem) trains at ~85 img/s at 8 px and batch 64 (2 threads, quiet machine;
  ~113 img/s at batch 128) and ~36 img/s at 16 px (32 px was only measured under load: 2-4
  img/s): 8 px is the only resolution at which the baseline fits the product's time budget on
  digits (16 s/epoch, 8 epochs ~2.2 min incl. evaluation). Under heavy CPU contention (load 5-7)
  the same run took 32 min: timings depend on what else runs.
- At 8 px, ResNet-101 with torchvision's init stays at chance for 2+ epochs (lr 0.01..0.1, with or
  without gradient clipping); with zero-init residual BN and max_lr 0.05 it reached 90% after 3
  epochs and then fell to 22% at the lr peak; with max_lr 0.02 and 8 epochs it reached 92.7%
  [89.9, 94.7] (450 val images).
- 6 epochs (the default since): the baseline reached 94.9% [92.4, 96.6] in 93 s on a quiet
  machine, presets 6-14 trained in 21-38 s each, and the README's main command finished cold
  (baseline included) in 643 s.
- Half the steps (4 epochs at batch 128, max_lr 0.03) was measured and rejected: the baseline
  trains in half the time (114 s against 223 s, 2 threads, a slower host than above) but the
  search rung's ranking of presets 6-14 against long reference trainings falls from Kendall tau
  +0.36 to -0.23 and its drops err by 3.2 pp instead of 1.4 pp (``benchmarks/proxy_fidelity.py``,
  variant ``fast``).
- paper-resnet101-11 / -13 at the same protocol: 94.4% / 97.6% in ~32 s each (1 thread, loaded
  machine, ~330 img/s).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .devices import DEVICES, PRECISIONS, TOGGLES, Execution, available_cpus, resolve_device
from .errors import RecommenderError, UnknownNameError

__all__ = ["ProxyProtocol", "FIDELITIES", "get_protocol", "list_fidelities", "describe_fidelity"]

# Fields that change how fast a run goes, not what it converges to: left out of key().
_EXECUTION_FIELDS = ("threads", "device", "eval_batch_size", "precision", "channels_last", "compile")
# Fields that change how candidates learn from the trained baseline, never how the baseline
# itself trains: reset to their defaults in the baseline's cache key (for_baseline), so that
# protocols differing only in them share one trained baseline.
CANDIDATE_ONLY_FIELDS = ("distill_alpha", "distill_temperature", "feature_distill_alpha", "feature_distill_pool",
                         "finetune_lr", "recovery_epochs", "recovery_distill_alpha", "recovery_bn_batches",
                         "calibration_batch_size")
# Fields added after weights were cached and references stored: in the key only when they differ
# from this default, so existing keys (and cached trainings) stay valid.
_KEYED_IF_SET = {"feature_distill_alpha": 0.0, "feature_distill_pool": 2, "recovery_bn_batches": 4}


@dataclass(frozen=True)
class ProxyProtocol:
    """A training and evaluation protocol.

    Args:
        fidelity: name of the fidelity it derives from (informational; part of the key).
        train_size: training images used (stratified prefix); 0 = all.
        val_size: validation images used (stratified prefix, the same for every model); 0 = all.
        resolution: training and evaluation input size in px; 0 = the dataset's native size
            capped at ``max_resolution``. FLOPs and latency are still measured at 32 px.
        max_resolution: cap on the native size when ``resolution`` is 0; 0 = no cap.
        epochs: passes over the training subset.
        batch_size: training batch size.
        lr: peak learning rate (OneCycle ``max_lr``; the constant rate for ``schedule='constant'``).
        momentum: SGD momentum (OneCycle cycles it between ``base_momentum`` and ``max_momentum``
            when ``cycle_momentum``).
        weight_decay: SGD weight decay.
        nesterov: Nesterov momentum.
        optimizer: ``sgd`` (the only one implemented; the paper's).
        schedule: ``onecycle`` (stepped every batch, the paper) or ``constant``.
        pct_start, div_factor, final_div_factor, anneal_strategy, cycle_momentum, base_momentum,
            max_momentum: ``torch.optim.lr_scheduler.OneCycleLR`` arguments (PyTorch defaults).
        grad_clip: max gradient norm (0 = no clipping, the paper).
        zero_init_residual: before training, zero the scale of the last BN of every residual
            branch (Goyal et al. 2017; torchvision's ``zero_init_residual``) so a deep ResNet starts
            as a shallow one. Measured: ResNet-101 on digits at 8 px stays at chance for 2+ epochs
            without it and reaches ~70% after 2 epochs with it. Off for ``paper``.
        label_smoothing: cross-entropy label smoothing (0 = none, the paper).
        augment: random crop (zero padding) + horizontal flip where the dataset allows it.
        distill_alpha: weight of the logit-distillation term (0 = plain cross-entropy).
        distill_temperature: softmax temperature of the distillation term.
        feature_distill_alpha: weight of block-wise feature distillation for candidates trained
            from scratch: each stage of the student matches the trained baseline's same stage
            (:mod:`recommender.feature_distill`; families that declare their stages). 0 = off,
            the default: see ``docs/measurements.md`` for the benchmark that decided it.
        feature_distill_pool: side (px) both stage outputs are average-pooled to before matching.
        finetune_lr: learning rate of the recovery training after pruning (constant).
        recovery_epochs: recovery budget after pruning, in epochs of the training subset: a
            candidate that inherits the trained baseline's weights is pruned, then trained this
            long (split over the rounds of iterative pruning).
        recovery_distill_alpha: weight of the logit distillation from the trained baseline in
            that recovery training. On by default and ``distill_alpha`` (training from scratch)
            off: in ``benchmarks/proxy_fidelity.py`` on digits, distillation brought the pruned
            candidates' drops closer to the reference (mean error 5.2 against 7.0 pp, same order)
            but ranked the rewritten architectures worse (Kendall tau -0.06 against +0.53).
        recovery_bn_batches: batches of ``calibration_batch_size`` training images whose
            statistics re-estimate every BatchNorm of a pruned candidate after its recovery
            training, before it is quantized and evaluated ("adaptive BN", EagleEye, ECCV 2020):
            iterative pruning leaves a few steps after its last round, too few for the running
            statistics to follow the pruned weights. 0 = off. Measured from the digits ResNet-101
            reference (``benchmarks/proxy_fidelity.py --variants default,adaptive-bn``): the
            search rung's pruning drops moved from +3.3 / +16.2 / +2.4 / +78.9 pp to +0.9 / +3.3 /
            -0.9 / +2.4 pp (structured 30 / 50 %, unstructured 59 / 80 %) against the
            reference's +0.9 / +4.9 / +0.9 pp for the first three.
        calibration_batch_size: batch size of ``train.batches`` (quantization calibration, Taylor).
        seed: seed of weight init (when the caller seeds), shuffling and augmentation.
        threads: CPU threads used while training/evaluating (0 = the CPUs this process may
            use: ``OMP_NUM_THREADS``, else the affinity mask; see
            :func:`recommender.devices.available_cpus`). Not in the key.
        device: ``auto`` (the default: a CUDA GPU when one is present, else the CPU), ``cpu``
            or ``cuda``. Not in the key.
        eval_batch_size: evaluation batch size. Not in the key.
        precision: ``auto`` (on a CUDA GPU, for inputs over 32 px: bf16 autocast where supported,
            else fp16 with loss scaling; float32 on a CPU and for inputs of at most 32 px, where
            the GPU is launch-bound and autocast was slower), ``fp32``, ``bf16`` or ``fp16``.
            Not in the key.
        channels_last: ``auto`` (on for CUDA inputs over 32 px; off on a CPU, where it was
            0.8-1.5x by model and changes the float rounding, and for small inputs), ``on``,
            ``off``. Not in the key.
        compile: train through ``torch.compile`` (off: on the 2-core CPU compiling
            paper-resnet101-11 took 291 s and made no step faster). Not in the key.
    """

    fidelity: str = "proxy"
    train_size: int = 4096
    val_size: int = 2000
    resolution: int = 0
    max_resolution: int = 16
    epochs: int = 6
    batch_size: int = 64
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    optimizer: str = "sgd"
    schedule: str = "onecycle"
    pct_start: float = 0.25
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal_strategy: str = "cos"
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95
    grad_clip: float = 0.0
    zero_init_residual: bool = True
    label_smoothing: float = 0.0
    augment: bool = False
    distill_alpha: float = 0.0
    distill_temperature: float = 4.0
    feature_distill_alpha: float = 0.0
    feature_distill_pool: int = 2
    finetune_lr: float = 1e-3
    recovery_epochs: float = 1.0
    recovery_distill_alpha: float = 0.5
    recovery_bn_batches: int = 4
    calibration_batch_size: int = 64
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    eval_batch_size: int = 512
    precision: str = "auto"
    channels_last: str = "auto"
    compile: bool = False

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise RecommenderError(f"invalid protocol {self.fidelity!r}: {msg}")

        for name in ("train_size", "val_size", "resolution", "max_resolution", "threads"):
            if int(getattr(self, name)) < 0:
                bad(f"{name} must be >= 0")
        for name in ("epochs", "batch_size", "eval_batch_size", "calibration_batch_size"):
            if int(getattr(self, name)) < 1:
                bad(f"{name} must be >= 1")
        if self.resolution and not 4 <= self.resolution <= 256:
            bad("resolution must be in [4, 256] px")
        if not self.lr > 0 or not self.finetune_lr > 0:
            bad("lr and finetune_lr must be > 0")
        if not 0 <= self.recovery_epochs <= 100:
            bad("recovery_epochs must be in [0, 100]")
        if not 0 <= int(self.recovery_bn_batches) <= 1000:
            bad("recovery_bn_batches must be in [0, 1000]")
        if self.optimizer not in ("sgd",):
            bad(f"optimizer must be 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("onecycle", "constant"):
            bad(f"schedule must be 'onecycle' or 'constant', got {self.schedule!r}")
        if self.anneal_strategy not in ("cos", "linear"):
            bad("anneal_strategy must be 'cos' or 'linear'")
        if not 0.0 < self.pct_start < 1.0:
            bad("pct_start must be in (0, 1)")
        if not 0.0 <= self.distill_alpha <= 1.0:
            bad("distill_alpha must be in [0, 1]")
        if not 0.0 <= self.recovery_distill_alpha <= 1.0:
            bad("recovery_distill_alpha must be in [0, 1]")
        if not self.distill_temperature > 0:
            bad("distill_temperature must be > 0")
        if not 0.0 <= self.feature_distill_alpha <= 100.0:
            bad("feature_distill_alpha must be in [0, 100]")
        if not 1 <= int(self.feature_distill_pool) <= 8:
            bad("feature_distill_pool must be in [1, 8] px")
        if self.device not in DEVICES:
            bad(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            bad(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.channels_last not in TOGGLES:
            bad(f"channels_last must be one of {', '.join(TOGGLES)}, got {self.channels_last!r}")

    # --- derived values -------------------------------------------------------------------
    def input_resolution(self, native: int) -> int:
        """The px size used for a dataset of native size ``native``."""
        if self.resolution:
            return int(self.resolution)
        return int(min(native, self.max_resolution) if self.max_resolution else native)

    def resolved_threads(self) -> int:
        """CPU threads: ``threads``, or 0 = :func:`~recommender.devices.available_cpus`."""
        return int(self.threads) if self.threads else available_cpus()

    def resolved_device(self) -> str:
        """``cpu`` or ``cuda`` (``auto``: cuda when a GPU is present; ``cuda`` without one
        raises a RecommenderError)."""
        return resolve_device(self.device)

    def execution(self) -> Execution:
        """Device, autocast dtype, memory format and compilation of this protocol's runs (``auto``
        choices depend on the largest input this protocol can feed: ``resolution``, else
        ``max_resolution``, else unknown)."""
        return Execution.resolve(self.device, self.precision, self.channels_last, self.compile,
                                 max_input_px=(self.resolution or self.max_resolution or None))

    # --- serialisation --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProxyProtocol:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecommenderError(f"unknown protocol field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> ProxyProtocol:
        return with_overrides(self, **changes)

    def for_baseline(self) -> ProxyProtocol:
        """This protocol with the candidate-only fields (``CANDIDATE_ONLY_FIELDS``) at their
        defaults: what identifies the baseline's own training."""
        defaults = {f.name: f.default for f in fields(self) if f.name in CANDIDATE_ONLY_FIELDS}
        return replace(self, **defaults)

    def key(self) -> str:
        """Stable cache key: ``<fidelity>-<12 hex of sha256(canonical JSON)>``; execution fields
        (threads, device, eval batch size) are excluded."""
        d = {k: v for k, v in self.to_dict().items() if k not in _EXECUTION_FIELDS
             and not (k in _KEYED_IF_SET and v == _KEYED_IF_SET[k])}
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str)
        return f"{self.fidelity}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def describe(self) -> str:
        res = f"{self.resolution}px" if self.resolution else (
            f"native<= {self.max_resolution}px" if self.max_resolution else "native px")
        size = f"{self.train_size or 'all'} train/{self.val_size or 'all'} val"
        kd = f", KD a{self.distill_alpha} T{self.distill_temperature}" if self.distill_alpha else ""
        return (f"{self.fidelity}: {size}, {res}, {self.epochs} ep, batch {self.batch_size}, "
                f"SGD lr {self.lr} {self.schedule}{', aug' if self.augment else ''}{kd}, "
                f"seed {self.seed}")


FIDELITIES: dict[str, ProxyProtocol] = {
    "smoke": ProxyProtocol(
        fidelity="smoke", train_size=512, val_size=256, max_resolution=8, epochs=2,
        batch_size=64, lr=0.05, pct_start=0.3),
    "proxy": ProxyProtocol(fidelity="proxy"),
    "confirm": ProxyProtocol(
        fidelity="confirm", train_size=16384, val_size=5000, max_resolution=32, epochs=15,
        batch_size=64, lr=0.02, augment=True),
    "paper": ProxyProtocol(
        fidelity="paper", train_size=0, val_size=0, resolution=32, max_resolution=0, epochs=150,
        batch_size=128, lr=0.0125, momentum=0.9, weight_decay=2e-5, nesterov=False,
        pct_start=0.1, div_factor=25.0, final_div_factor=1e4, augment=True,
        zero_init_residual=False),
}


#: What each named fidelity is for (shown by ``recommend --help`` and in the README's table).
FIDELITY_PURPOSE = {
    "smoke": "a dry run: tests the pipeline, not the tolerance",
    "proxy": "the search (default)",
    "confirm": "a re-check of finalists",
    "paper": "the paper's training protocol",
}


def list_fidelities() -> list[str]:
    return list(FIDELITIES)


def describe_fidelity(name: str) -> str:
    """One line: a fidelity's images, input size, epochs and purpose, from its protocol."""
    p = get_protocol(name)

    def count(n: int) -> str:
        return "all" if not n else f"<= {n:,}"

    size = f"{p.resolution} px" if p.resolution else (f"<= {p.max_resolution} px" if p.max_resolution else "native px")
    aug = ", aug" if p.augment else ""
    return (f"{name}: {count(p.train_size)} train / {count(p.val_size)} val images, {size}, {p.epochs} ep{aug}"
            f" ({FIDELITY_PURPOSE.get(name, '')})")


def with_overrides(base: ProxyProtocol, **overrides: Any) -> ProxyProtocol:
    known = {f.name for f in fields(ProxyProtocol)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise UnknownNameError("protocol field", unknown[0], sorted(known))
    return replace(base, **overrides)


def get_protocol(name: str | ProxyProtocol = "proxy", **overrides: Any) -> ProxyProtocol:
    """A named fidelity, optionally with fields overridden (``get_protocol('proxy', epochs=4)``).

    Raises UnknownNameError for an unknown fidelity or field.
    """
    if isinstance(name, ProxyProtocol):
        return with_overrides(name, **overrides) if overrides else name
    if name not in FIDELITIES:
        raise UnknownNameError("fidelity", name, list(FIDELITIES))
    base = FIDELITIES[name]
    return with_overrides(base, **overrides) if overrides else base
