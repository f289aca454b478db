"""Proxy training and evaluation with intervals.

- :func:`train_model` trains a model under a :class:`~recommender.protocol.ProxyProtocol` (SGD with
  OneCycle stepped every batch, optional logit distillation), seeded and deterministic on a CPU for
  a given thread count; a non-finite loss stops the run with ``ok=False``.
- :func:`evaluate` returns the per-image correctness on the validation subset, the accuracy and a
  95% Wilson interval.
- :func:`paired_drop` compares two models on the same validation images with a paired bootstrap.
- :func:`teacher_logits`, :func:`finetune_fn` and :func:`batches` serve distillation, pruning and
  quantization calibration.

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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import TensorData
from .protocol import ProxyProtocol
from .stats import DropEstimate, paired_drop, wilson_interval

__all__ = [
    "TrainResult", "EvalResult", "DropEstimate", "train_model", "evaluate", "paired_drop",
    "wilson_interval", "teacher_logits", "finetune_fn", "batches", "seed_everything",
    "protocol_data", "threads", "zero_init_residual",
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


def protocol_data(data: TensorData, protocol: ProxyProtocol) -> TensorData:
    """The subset of ``data`` a protocol trains and evaluates on."""
    return data.subset(protocol.train_size or None, protocol.val_size or None)


def _device(protocol: ProxyProtocol) -> torch.device:
    return torch.device(protocol.resolved_device())


def _make_optimizer(model: nn.Module, protocol: ProxyProtocol, lr: float) -> torch.optim.SGD:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=protocol.momentum,
                           weight_decay=protocol.weight_decay,
                           nesterov=protocol.nesterov and protocol.momentum > 0)


def _kd_loss(logits: torch.Tensor, y: torch.Tensor, teacher: torch.Tensor | None,
             protocol: ProxyProtocol) -> torch.Tensor:
    ce = F.cross_entropy(logits, y, label_smoothing=protocol.label_smoothing)
    if teacher is None or protocol.distill_alpha <= 0:
        return ce
    t = protocol.distill_temperature
    kd = F.kl_div(F.log_softmax(logits / t, dim=1), F.log_softmax(teacher / t, dim=1),
                  reduction="batchmean", log_target=True) * (t * t)
    a = protocol.distill_alpha
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

def train_model(model: nn.Module, data: TensorData, protocol: ProxyProtocol, *,
                teacher_logits: torch.Tensor | np.ndarray | None = None,
                progress: ProgressFn | None = None) -> TrainResult:
    """Train ``model`` in place under ``protocol`` on its subset of ``data``.

    Args:
        teacher_logits: ``(n_train_subset, num_classes)`` logits from :func:`teacher_logits`
            (same data and protocol); used when ``protocol.distill_alpha > 0``.
        progress: called after every step as ``progress(step, total_steps, loss)``.

    The run is deterministic for a given seed, thread count and device: shuffling and augmentation
    draw from a generator seeded with ``protocol.seed`` (weight init is the caller's: seed before
    building). A NaN/inf loss stops the run: ``ok=False`` with the step in ``reason``.
    With ``protocol.zero_init_residual`` the residual branches' last BN scales are zeroed
    first (see :func:`zero_init_residual`): pass a freshly built model.
    The model is left in eval mode on the CPU.
    """
    d = protocol_data(data, protocol)
    res = protocol.input_resolution(d.native_resolution)
    dev = _device(protocol)
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
    with threads(protocol.resolved_threads()):
        if protocol.zero_init_residual:
            zero_init_residual(model)
        model.to(dev)
        opt = _make_optimizer(model, protocol, protocol.lr)
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
        for epoch in range(protocol.epochs):
            epoch_loss, epoch_n = 0.0, 0
            for x, y, idx in d.train_batches(protocol.batch_size, res, augment=protocol.augment,
                                             generator=gen, with_index=True):
                x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                logits = model(x)
                loss = _kd_loss(logits, y, None if teacher is None else teacher[idx.to(dev)],
                                protocol)
                lv = float(loss.detach())
                if not math.isfinite(lv) or not bool(torch.isfinite(logits.detach()).all()):
                    ok = False
                    reason = (f"diverged: non-finite loss ({lv}) at step {step + 1}/{total} "
                              f"(epoch {epoch + 1}); lower the learning rate")
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if protocol.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), protocol.grad_clip)
                opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                images += int(y.shape[0])
                epoch_loss += lv * int(y.shape[0])
                epoch_n += int(y.shape[0])
                if progress is not None:
                    progress(step, total, lv)
            if not ok:
                break
            losses.append(epoch_loss / max(epoch_n, 1))
        model.eval()
        if dev.type != "cpu":
            model.to("cpu")
    seconds = time.perf_counter() - t0
    return TrainResult(ok=ok, reason=reason, seconds=seconds, epochs_run=len(losses),
                       final_loss=losses[-1] if losses else float("nan"),
                       images_per_s=images / seconds if seconds > 0 else 0.0, steps=step,
                       losses=losses)


@torch.no_grad()
def _predict(model: nn.Module, it: Iterator, dev: torch.device) -> torch.Tensor:
    outs = []
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for x, *_ in it:
        outs.append(model(x.to(dev, dtype=dtype)).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0)


def evaluate(model: nn.Module, data: TensorData, protocol: ProxyProtocol) -> EvalResult:
    """Top-1 accuracy on the protocol's validation subset (the same images for every model).

    The model runs in eval mode at the protocol resolution; its training mode is restored.
    Models that cannot run on the protocol device (quantized ones) are evaluated on the CPU.
    """
    d = protocol_data(data, protocol)
    res = protocol.input_resolution(d.native_resolution)
    dev = _device(protocol)
    if _is_quantized(model):
        dev = torch.device("cpu")
    was_training = model.training
    t0 = time.perf_counter()
    with threads(protocol.resolved_threads()):
        model.eval()
        if dev.type != "cpu":
            model.to(dev)
        logits = _predict(model, d.val_batches(protocol.eval_batch_size, res), dev)
        if dev.type != "cpu":
            model.to("cpu")
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

def teacher_logits(model: nn.Module, data: TensorData, protocol: ProxyProtocol) -> torch.Tensor:
    """The teacher's logits on the protocol's training subset, un-augmented, at the protocol
    resolution, in the stored order: ``(n_train_subset, num_classes)`` float32 on the CPU.
    Computed once and cached by the caller (see the module docstring for the choice)."""
    d = protocol_data(data, protocol)
    res = protocol.input_resolution(d.native_resolution)
    dev = _device(protocol)
    was_training = model.training
    with threads(protocol.resolved_threads()):
        model.eval()
        if dev.type != "cpu":
            model.to(dev)
        out = _predict(model, d.train_batches(protocol.eval_batch_size, res, shuffle=False), dev)
        if dev.type != "cpu":
            model.to("cpu")
    model.train(was_training)
    return out


def batches(data: TensorData, protocol: ProxyProtocol, n: int
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


def finetune_fn(data: TensorData, protocol: ProxyProtocol,
                teacher_logits: torch.Tensor | np.ndarray | None = None) -> Callable[[nn.Module, int], float]:
    """A callback ``finetune(model, steps) -> mean loss`` for recovery after pruning: ``steps``
    SGD steps (constant ``protocol.finetune_lr``, the protocol's momentum and weight decay, with
    its augmentation) on training batches, continuing through a seeded stream across calls, with
    logit distillation from ``teacher_logits`` (see :func:`teacher_logits`) when the protocol
    asks for it. Pruning masks (``torch.nn.utils.prune``) stay applied. A non-finite loss stops
    the fine-tune (the returned loss is then NaN). The model's training mode is restored."""
    d = protocol_data(data, protocol)
    res = protocol.input_resolution(d.native_resolution)
    gen = torch.Generator().manual_seed(protocol.seed + 2)
    state: dict = {"it": None}
    teacher = None
    if teacher_logits is not None and protocol.distill_alpha > 0:
        teacher = torch.as_tensor(np.asarray(teacher_logits), dtype=torch.float32)

    def next_batch():
        while True:
            if state["it"] is None:
                state["it"] = d.train_batches(protocol.batch_size, res, augment=protocol.augment,
                                              generator=gen, drop_last=True, with_index=True)
            try:
                return next(state["it"])
            except StopIteration:
                state["it"] = None

    def finetune(model: nn.Module, steps: int) -> float:
        if steps <= 0:
            return 0.0
        dev = _device(protocol)
        was_training = model.training
        total = 0.0
        with threads(protocol.resolved_threads()):
            model.to(dev)
            opt = _make_optimizer(model, protocol, protocol.finetune_lr)
            model.train()
            for _ in range(steps):
                x, y, idx = next_batch()
                y = y.to(dev)
                t = None if teacher is None else teacher[idx].to(dev)
                loss = _kd_loss(model(x.to(dev)), y, t, protocol)
                lv = float(loss.detach())
                if not math.isfinite(lv):
                    total = float("nan")
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += lv
            if dev.type != "cpu":
                model.to("cpu")
        model.train(was_training)
        return total / steps

    return finetune
