"""Proxy training and evaluation with intervals.

- :func:`train_model` trains a model under a :class:`~recommender.protocol.ProxyProtocol` (SGD with
  OneCycle stepped every batch, optional logit distillation), seeded and deterministic for a given
  thread count and device; a non-finite loss, or a ``deadline``, stops the run with ``ok=False``.
  It runs on the protocol's device (``auto``: a CUDA GPU when present) with its autocast dtype
  and memory format (:meth:`ProxyProtocol.execution`), and reads the loss back from the device
  only every ``check_every`` steps (no host sync per step).
- :func:`evaluate` returns the per-image correctness on the validation subset, the accuracy and a
  95% Wilson interval.
- :func:`paired_drop` compares two models on the same validation images with a paired bootstrap.
- :func:`teacher_logits`, :func:`teacher_features`, :func:`finetune_fn` and :func:`batches` serve
  distillation (of logits, and block-wise of stage outputs: :mod:`recommender.feature_distill`),
  pruning and quantization calibration.

Distillation choice: the teacher's logits are computed once, on the *un-augmented* training images
at the protocol resolution, and reused for every epoch whatever augmentation the student sees.
Running the teacher per augmented batch would cost a teacher forward pass per step (for a
ResNet-101 teacher, more than training a small student); with crop-and-flip augmentation the
un-augmented logits remain a good soft target (the same image, shifted by a few pixels).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import interrupts
from .data import ImageData
from .devices import Execution, synchronize
from .feature_distill import StageMatcher, has_stages, stage_features
from .protocol import ProxyProtocol
from .stats import DropEstimate, paired_drop, wilson_interval

__all__ = [
    "TrainResult", "EvalResult", "DropEstimate", "train_model", "evaluate", "paired_drop",
    "wilson_interval", "teacher_logits", "teacher_features", "finetune_fn", "batches", "seed_everything",
    "protocol_data", "threads", "zero_init_residual", "step_seconds", "TimeLimitReached",
]

ProgressFn = Callable[[int, int, float], None]


@dataclass
class TrainResult:
    """Outcome of :func:`train_model`.

    ``ok`` is False when the loss became NaN/inf (``reason`` says when); ``epochs_run`` counts
    completed epochs; ``final_loss`` is the mean training loss of the last completed epoch;
    ``images_per_s`` is the training throughput.
    """

    ok: bool
    reason: str
    seconds: float
    epochs_run: int
    final_loss: float
    images_per_s: float
    steps: int = 0
    losses: list[float] = field(default_factory=list)

    @property
    def epochs(self) -> int:  # the name in docs/architecture.md
        return self.epochs_run

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalResult:
    """Accuracy on the validation subset: ``correct`` (bool per image, in the stored order),
    ``accuracy`` in [0, 1], 95% Wilson interval ``ci_low``..``ci_high``, ``n`` images."""

    correct: np.ndarray
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"accuracy": self.accuracy, "ci_low": self.ci_low, "ci_high": self.ci_high,
                "n": self.n, "seconds": self.seconds}


# --- helpers --------------------------------------------------------------------------------

@contextlib.contextmanager
def threads(n: int):
    """Set torch's intra-op thread count for the block and restore it afterwards."""
    old = torch.get_num_threads()
    if n and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def seed_everything(seed: int) -> None:
    """Seed torch, numpy and Python's random (call before building a model to fix its init)."""
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def protocol_data(data: ImageData, protocol: ProxyProtocol) -> ImageData:
    """The subset of ``data`` a protocol trains and evaluates on."""
    return data.subset(protocol.train_size or None, protocol.val_size or None)




def _make_optimizer(model: nn.Module, protocol: ProxyProtocol, lr: float,
                    extra: nn.Module | None = None) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    if extra is not None:  # trained with the model (feature-distillation adapters)
        params += list(extra.parameters())
    return torch.optim.SGD(params, lr=lr, momentum=protocol.momentum,
                           weight_decay=protocol.weight_decay,
                           nesterov=protocol.nesterov and protocol.momentum > 0)


def _kd_loss(logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None,
             protocol: ProxyProtocol, alpha: float | None = None) -> torch.Tensor:
    ce = F.cross_entropy(logits, y, label_smoothing=protocol.label_smoothing)
    a = protocol.distill_alpha if alpha is None else alpha
    if teacher is None or a <= 0:
        return ce
    t = protocol.distill_temperature
    kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1),
                  reduction="batchmean", log_target=True) * (t * t)
    return (1.0 - a) * ce + a * kd


def zero_init_residual(model: nn.Module) -> int:
    """Zero the scale (gamma) of the last BN of every residual branch; returns how many.

    Recognised blocks: any module with a ``zero_init_last()`` method (timm's convention, for
    custom blocks), bottlenecks and inverted residuals (``bn3``), basic blocks (``bn2`` next to a
    ``downsample`` attribute), ghost bottlenecks (``ghost2.bn``). Others keep their init.
    """
    n = 0
    for m in model.modules():
        target = None
        if callable(getattr(m, "zero_init_last", None)):
            m.zero_init_last()
            n += 1
            continue
        if isinstance(getattr(m, "bn3", None), nn.BatchNorm2d) and (
                hasattr(m, "downsample") or hasattr(m, "shortcut")):
            target = m.bn3
        elif isinstance(getattr(m, "bn2", None), nn.BatchNorm2d) and hasattr(m, "downsample"):
            target = m.bn2
        elif isinstance(getattr(getattr(m, "ghost2", None), "bn", None), nn.BatchNorm2d):
            target = m.ghost2.bn
        if target is not None and target.weight is not None:
            with torch.no_grad():
                target.weight.zero_()
            n += 1
    return n


# --- training -------------------------------------------------------------------------------

class _NonFinite:
    """Finite-loss bookkeeping without a host sync per step: per-step flags and weighted losses
    stay on the device and are read every ``every`` steps (and at the end of an epoch)."""

    def __init__(self, every: int):
        self.every = max(1, int(every))
        self.flags: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []
        self.sizes: list[int] = []

    def add(self, loss: torch.Tensor, logits: torch.Tensor, n: int) -> None:
        loss = loss.detach().float()
        self.flags.append(torch.isfinite(loss) & torch.isfinite(logits.detach()).all())
        self.losses.append(loss)
        self.sizes.append(n)

    def due(self) -> bool:
        return len(self.flags) >= self.every

    def flush(self) -> tuple[int | None, list[float], list[int]]:
        """(index of the first non-finite step in the window or None, losses, batch sizes)."""
        if not self.flags:
            return None, [], []
        flags = torch.stack(self.flags).cpu()
        losses = torch.stack(self.losses).double().cpu().tolist()
        sizes = self.sizes
        self.flags, self.losses, self.sizes = [], [], []
        bad = (~flags).nonzero()
        return (int(bad[0]) if bad.numel() else None), losses, sizes


def train_model(model: nn.Module, data: ImageData, protocol: ProxyProtocol, *,
                teacher_logits: torch.Tensor | np.ndarray | None = None,
                teacher_features: Sequence[torch.Tensor] | None = None, stages: Sequence[str] = (),
                progress: ProgressFn | None = None, deadline: float | None = None,
                check_every: int = 25) -> TrainResult:
    """Train ``model`` in place under ``protocol`` on its subset of ``data``.

    Args:
        teacher_logits: ``(n_train_subset, num_classes)`` logits from :func:`teacher_logits`
            (same data and protocol); used when ``protocol.distill_alpha > 0``.
        teacher_features, stages: the teacher's pooled stage outputs on the training subset
            (:func:`recommender.feature_distill.stage_features`, same order) and the stage
            module names; block-wise distillation when ``protocol.feature_distill_alpha > 0``
            and the model has those stages.
        progress: called after every step as ``progress(step, total_steps, loss)`` (this reads
            the loss every step: a host sync per step on a GPU).
        deadline: a ``time.monotonic()`` value: no step starts after it; the run then stops
            with ``ok=False`` and ``reason`` "time limit reached at step k/n ...". None: no limit.
        check_every: steps between reads of the loss (NaN/inf check, loss bookkeeping); the
            device is not synchronised with the host in between.

    The run is deterministic for a given seed, thread count and device: shuffling and augmentation
    draw from a generator seeded with ``protocol.seed`` (weight init is the caller's: seed before
    building). A NaN/inf loss (or logit) stops the run: ``ok=False`` with the step in ``reason``
    (found at the next check; the steps after it are not counted).
    With ``protocol.zero_init_residual`` the residual branches' last BN scales are zeroed
    first (see :func:`zero_init_residual`): pass a freshly built model.
    On CUDA the protocol's autocast dtype (bf16, or fp16 with loss scaling) and channels_last
    apply (:meth:`ProxyProtocol.execution`). The model is left in eval mode on the CPU.
    """
    d = protocol_data(data, protocol)
    res = protocol.input_resolution(d.native_resolution)
    ex = protocol.execution()
    dev = ex.torch_device
    teacher = None
    if teacher_logits is not None and protocol.distill_alpha > 0:
        teacher = torch.as_tensor(np.asarray(teacher_logits), dtype=torch.float32)
        if teacher.shape != (d.n_train, d.num_classes):
            raise ValueError(f"teacher logits have shape {tuple(teacher.shape)}, expected "
                             f"{(d.n_train, d.num_classes)} (same data and protocol)")
        teacher = teacher.to(dev)
    steps_per_epoch = math.ceil(d.n_train / protocol.batch_size)
    total = steps_per_epoch * protocol.epochs
    gen = torch.Generator().manual_seed(protocol.seed)
    losses: list[float] = []
    step = 0
    images = 0
    ok, reason = True, ""
    t0 = time.perf_counter()
    check = _NonFinite(1 if progress is not None else check_every)
    with threads(protocol.resolved_threads()), ex.engine_flags():
        if protocol.zero_init_residual:
            zero_init_residual(model)
        ex.prepare_model(model)
        matcher = None
        if teacher_features is not None and protocol.feature_distill_alpha > 0 and has_stages(model, stages):
            probe = ex.input(next(iter(d.val_batches(2, res)))[0])
            matcher = StageMatcher(model, stages, [int(f.shape[1]) for f in teacher_features],
                                   protocol.feature_distill_pool, probe).to(dev)
            teacher_features = [f.to(dev) for f in teacher_features]
        opt = _make_optimizer(model, protocol, protocol.lr, extra=matcher)
        scaler = torch.amp.GradScaler(ex.device) if ex.needs_scaler else None
        forward = torch.compile(model) if ex.compile else model
        sched = None
        if protocol.schedule == "onecycle" and total >= 2:
            # a warm-up phase of at least 1.5 steps keeps OneCycleLR valid for tiny runs
            pct = min(max(protocol.pct_start, 1.5 / total), 0.9)
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=protocol.lr, total_steps=total, pct_start=pct,
                anneal_strategy=protocol.anneal_strategy, div_factor=protocol.div_factor,
                final_div_factor=protocol.final_div_factor,
                cycle_momentum=protocol.cycle_momentum and protocol.momentum > 0,
                base_momentum=protocol.base_momentum, max_momentum=protocol.max_momentum)
        model.train()

        def read(epoch: int) -> bool:
            """Read the pending steps; False (and the reason set) on a non-finite one."""
            nonlocal ok, reason, step, images, epoch_loss, epoch_n
            first_step = step - len(check.flags)
            bad, window, sizes = check.flush()
            if bad is not None:
                ok = False
                step = first_step + bad  # steps that completed with a finite loss
                images -= sum(sizes[bad:])
                reason = (f"diverged: non-finite loss ({window[bad]}) at step {step + 1}/{total} "
                          f"(epoch {epoch + 1}); lower the learning rate")
                return False
            for k, (lv, n) in enumerate(zip(window, sizes)):
                epoch_loss += lv * n
                epoch_n += n
                if progress is not None:
                    progress(first_step + k + 1, total, lv)
            return True

        for epoch in range(protocol.epochs):
            epoch_loss, epoch_n = 0.0, 0
            for x, y, idx in d.train_batches(protocol.batch_size, res, augment=protocol.augment,
                                             generator=gen, with_index=True):
                interrupts.check()  # a Ctrl-C that CPython dropped is raised here
                if deadline is not None and time.monotonic() >= deadline:
                    if read(epoch):
                        ok = False
                        reason = (f"time limit reached at step {step}/{total} (epoch "
                                  f"{epoch + 1}) after {time.perf_counter() - t0:.1f} s")
                    break
                x, y = ex.input(x), y.to(dev, non_blocking=True)
                i = idx.to(dev) if teacher is not None or matcher is not None else None
                with ex.autocast():
                    logits = forward(x)
                    loss = _kd_loss(logits.float(), y, None if teacher is None else teacher[i], protocol)
                    if matcher is not None:
                        loss = loss + protocol.feature_distill_alpha * matcher.loss([f[i] for f in teacher_features])
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if protocol.grad_clip > 0:
                        scaler.unscale_(opt)
                        nn.utils.clip_grad_norm_(model.parameters(), protocol.grad_clip)
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    if protocol.grad_clip > 0:
                        nn.utils.clip_grad_norm_(model.parameters(), protocol.grad_clip)
                    opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                images += int(y.shape[0])
                check.add(loss, logits, int(y.shape[0]))
                if check.due() and not read(epoch):
                    break
            if ok and not read(epoch):
                break
            if not ok:
                break
            losses.append(epoch_loss / max(epoch_n, 1))
        if matcher is not None:
            matcher.remove()
        model.eval()
        ex.release_model(model)
    seconds = time.perf_counter() - t0
    return TrainResult(ok=ok, reason=reason, seconds=seconds, epochs_run=len(losses),
                       final_loss=losses[-1] if losses else float("nan"),
                       images_per_s=images / seconds if seconds > 0 else 0.0, steps=step,
                       losses=losses)


def step_seconds(model: nn.Module, data: ImageData, protocol: ProxyProtocol,
                 steps: int = 2) -> float:
    """Seconds of one SGD step of ``model`` at the protocol's batch size and resolution, on its
    device, precision and memory format: the fastest of ``steps`` timed steps after one
    warm-up (the device synchronised around each). The model's weights change (a throwaway
    build); it is left on the CPU."""
    d = protocol_data(data, protocol)
    res = protocol.input_resolution(d.native_resolution)
    ex = protocol.execution()
    x, y = next(d.train_batches(protocol.batch_size, res, shuffle=False))
    times = []
    with threads(protocol.resolved_threads()), ex.engine_flags():
        ex.prepare_model(model).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        x, y = ex.input(x), y.to(ex.torch_device)
        for _ in range(max(1, steps) + 1):
            synchronize(ex.device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with ex.autocast():
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            synchronize(ex.device)
            times.append(time.perf_counter() - t0)
        ex.release_model(model)
    return min(times[1:])


@torch.no_grad()
def _predict(model: nn.Module, it: Iterator, ex: Execution) -> torch.Tensor:
    outs = []
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    # autocast only for float32 models (a half-precision model runs in its own dtype)
    amp = ex.autocast() if dtype == torch.float32 else contextlib.nullcontext()
    for x, *_ in it:
        with amp:
            outs.append(model(ex.input(x).to(dtype)).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0)


def _eval_execution(model: nn.Module, protocol: ProxyProtocol) -> Execution:
    """The protocol's execution; quantized models run on the CPU (their kernels are CPU-only)."""
    return Execution() if _is_quantized(model) else protocol.execution()


def evaluate(model: nn.Module, data: ImageData, protocol: ProxyProtocol) -> EvalResult:
    """Top-1 accuracy on the protocol's validation subset (the same images for every model).

    The model runs in eval mode at the protocol resolution, ``eval_batch_size`` images per batch,
    on the protocol's device (autocast and memory format as in training); its training mode is
    restored and it is left on the CPU. Quantized models are evaluated on the CPU.
    """
    d = protocol_data(data, protocol)
    res = protocol.input_resolution(d.native_resolution)
    ex = _eval_execution(model, protocol)
    was_training = model.training
    t0 = time.perf_counter()
    with threads(protocol.resolved_threads()), ex.engine_flags():
        model.eval()
        ex.prepare_model(model)
        logits = _predict(model, d.val_batches(protocol.eval_batch_size, res), ex)
        ex.release_model(model)
    model.train(was_training)
    correct = (logits.argmax(1) == d.val_y).numpy().astype(bool) if logits.numel() else \
        np.zeros(0, dtype=bool)
    k, n = int(correct.sum()), int(correct.size)
    lo, hi = wilson_interval(k, n)
    return EvalResult(correct=correct, accuracy=k / n if n else 0.0, ci_low=lo, ci_high=hi, n=n,
                      seconds=time.perf_counter() - t0)


def _is_quantized(model: nn.Module) -> bool:
    for p in list(model.parameters())[:1] + list(model.buffers())[:1]:
        if p.is_quantized:
            return True
    return any(type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))
               for m in model.modules())


# --- distillation, pruning fine-tune, calibration batches ------------------------------------

def teacher_logits(model: nn.Module, data: ImageData, protocol: ProxyProtocol) -> torch.Tensor:
    """The teacher's logits on the protocol's training subset, un-augmented, at the protocol
    resolution, in the stored order: ``(n_train_subset, num_classes)`` float32 on the CPU.
    Computed once and cached by the caller (see the module docstring for the choice)."""
    d = protocol_data(data, protocol)
    res = protocol.input_resolution(d.native_resolution)
    ex = _eval_execution(model, protocol)
    was_training = model.training
    with threads(protocol.resolved_threads()), ex.engine_flags():
        model.eval()
        ex.prepare_model(model)
        out = _predict(model, d.train_batches(protocol.eval_batch_size, res, shuffle=False), ex)
        ex.release_model(model)
    model.train(was_training)
    return out


def teacher_features(model: nn.Module, data: ImageData, protocol: ProxyProtocol,
                     stages: Sequence[str]) -> list[torch.Tensor]:
    """The teacher's named stage outputs on the protocol's training subset, un-augmented, at the
    protocol resolution, pooled to ``protocol.feature_distill_pool`` px, in the stored order: one
    ``(n_train_subset, channels, pool, pool)`` float32 CPU tensor per stage (block-wise
    distillation, :mod:`recommender.feature_distill`)."""
    d = protocol_data(data, protocol)
    res = protocol.input_resolution(d.native_resolution)
    ex = _eval_execution(model, protocol)
    with threads(protocol.resolved_threads()), ex.engine_flags():
        ex.prepare_model(model)
        it = ((ex.input(x), y) for x, y, *_ in d.train_batches(protocol.eval_batch_size, res, shuffle=False))
        with ex.autocast():
            out = stage_features(model, stages, it, protocol.feature_distill_pool)
        ex.release_model(model)
    return out


def batches(data: ImageData, protocol: ProxyProtocol, n: int
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` un-augmented training batches ``(x, y)`` (size ``calibration_batch_size``) at the
    protocol resolution, in a seeded order (cycling over epochs if needed): for quantization
    calibration and Taylor importance."""
    d = protocol_data(data, protocol)
    res = protocol.input_resolution(d.native_resolution)
    gen = torch.Generator().manual_seed(protocol.seed + 1)
    done = 0
    while done < n:
        for x, y in d.train_batches(protocol.calibration_batch_size, res, generator=gen):
            yield x, y
            done += 1
            if done >= n:
                return
        if d.n_train == 0:
            return


class TimeLimitReached(Exception):
    """A fine-tune passed its deadline (see :func:`finetune_fn`); ``result`` says where."""

    def __init__(self, result: TrainResult):
        super().__init__(result.reason)
        self.result = result


def finetune_fn(data: ImageData, protocol: ProxyProtocol,
                teacher_logits: torch.Tensor | np.ndarray | None = None, *,
                deadline: float | None = None, check_every: int = 25
                ) -> Callable[..., float]:
    """A callback ``finetune(model, steps, deadline=None) -> mean loss`` for recovery after
    pruning: ``steps`` SGD steps (constant ``protocol.finetune_lr``, the protocol's momentum and
    weight decay, with its augmentation) on training batches, continuing through a seeded stream
    across calls, with logit distillation from ``teacher_logits`` (see :func:`teacher_logits`)
    weighted ``protocol.recovery_distill_alpha``. Pruning masks (``torch.nn.utils.prune``) stay applied. A
    non-finite loss stops the fine-tune (the returned loss is then NaN; the loss is read every
    ``check_every`` steps). The model's training mode is restored; it is left on the CPU.

    ``deadline`` (a ``time.monotonic()`` value, here or per call; the call's wins): no step
    starts after it, and the callback raises :class:`TimeLimitReached` whose ``result`` is a
    :class:`TrainResult` with ``ok=False`` and reason "time limit reached at step k/n ..." (the
    callback's return value can only be a loss, and pruning code calls it as
    ``finetune(model, steps)``; the exception ends the trial through it).
    """
    d = protocol_data(data, protocol)
    res = protocol.input_resolution(d.native_resolution)
    gen = torch.Generator().manual_seed(protocol.seed + 2)
    state: dict = {"it": None}
    teacher = None
    if teacher_logits is not None and protocol.recovery_distill_alpha > 0:
        teacher = torch.as_tensor(np.asarray(teacher_logits), dtype=torch.float32)
    default_deadline = deadline

    def next_batch():
        while True:
            if state["it"] is None:
                state["it"] = d.train_batches(protocol.batch_size, res, augment=protocol.augment,
                                              generator=gen, drop_last=True, with_index=True)
            try:
                return next(state["it"])
            except StopIteration:
                state["it"] = None

    def finetune(model: nn.Module, steps: int, deadline: float | None = None) -> float:
        if steps <= 0:
            return 0.0
        limit = default_deadline if deadline is None else deadline
        ex = protocol.execution()
        dev = ex.torch_device
        was_training = model.training
        total = 0.0
        done = 0
        failed = False
        timed_out = None
        t0 = time.perf_counter()
        check = _NonFinite(check_every)
        with threads(protocol.resolved_threads()), ex.engine_flags():
            ex.prepare_model(model)
            opt = _make_optimizer(model, protocol, protocol.finetune_lr)
            scaler = torch.amp.GradScaler(ex.device) if ex.needs_scaler else None
            model.train()
            for i in range(steps):
                interrupts.check()
                if limit is not None and time.monotonic() >= limit:
                    timed_out = i
                    break
                x, y, idx = next_batch()
                y = y.to(dev)
                t = None if teacher is None else teacher[idx].to(dev)
                with ex.autocast():
                    logits = model(ex.input(x))
                    loss = _kd_loss(logits.float(), y, t, protocol, protocol.recovery_distill_alpha)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                done += 1
                check.add(loss, logits, int(y.shape[0]))
                if check.due() or i == steps - 1:
                    bad, window, _ = check.flush()
                    total += sum(window if bad is None else window[:bad])
                    if bad is not None:
                        failed = True
                        break
            if timed_out is not None and not failed:
                bad, window, _ = check.flush()
                total += sum(window if bad is None else window[:bad])
                failed = bad is not None
            ex.release_model(model)
        model.train(was_training)
        if failed:
            return float("nan")
        if timed_out is not None:
            seconds = time.perf_counter() - t0
            raise TimeLimitReached(TrainResult(
                ok=False, reason=f"time limit reached at step {timed_out}/{steps} of the "
                f"fine-tune after {seconds:.1f} s", seconds=seconds, epochs_run=0,
                final_loss=total / max(done, 1), images_per_s=0.0, steps=done))
        return total / steps

    return finetune
