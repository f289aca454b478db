"""Block-wise (stage-wise) feature distillation from the trained baseline.

An architecture rewrite cannot inherit the baseline's weights, but where its stage boundaries
line up with the baseline's (the same named stages, e.g. ``layer1..layer4`` of every CIFAR
ResNet variant) each of its stages can be taught to reproduce what the baseline's stage outputs
(FitNets, Romero et al. 2015; stage-wise as in block-wise NAS distillation, Li et al. 2020):

- the teacher's stage outputs are computed once, on the un-augmented training images at the
  protocol resolution (as :func:`recommender.train.teacher_logits` is), average-pooled to
  ``pool`` x ``pool`` so they fit in memory (digits at pool 2: 15k floats per image);
- the student's stage outputs, pooled the same way, go through a 1x1 adapter per stage
  (student channels -> teacher channels; trained with the student, thrown away after) and are
  matched to the teacher's by the mean squared distance of the per-image L2-normalised vectors
  (a scale-free target: stage activations of the two networks differ in scale).

The term is added to the training loss with weight ``protocol.feature_distill_alpha``. A model
family declares its stages in the registry (``ModelFamily.stages``); a family without them, or a
student lacking one of the named modules, trains without the term.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["has_stages", "stage_features", "StageMatcher"]


def _modules(model: nn.Module, names: Sequence[str]) -> list[nn.Module] | None:
    named = dict(model.named_modules())
    mods = [named.get(n) for n in names]
    return None if not names or any(m is None for m in mods) else mods  # type: ignore[return-value]


def has_stages(model: nn.Module, names: Sequence[str]) -> bool:
    """Whether ``model`` has every named stage module (its boundaries line up with the names)."""
    return _modules(model, names) is not None


class _Recorder:
    """Forward hooks that keep the latest output of each stage module."""

    def __init__(self, modules: list[nn.Module]):
        self.outputs: list[torch.Tensor | None] = [None] * len(modules)
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int):
        def hook(_m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            self.outputs[i] = out
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _pool(x: torch.Tensor, pool: int) -> torch.Tensor:
    return F.adaptive_avg_pool2d(x.float(), pool) if x.dim() == 4 else x.float().reshape(x.shape[0], -1, 1, 1)


@torch.no_grad()
def stage_features(model: nn.Module, names: Sequence[str], batches: object, pool: int
                   ) -> list[torch.Tensor]:
    """The pooled outputs of the named stages of ``model`` (in eval mode) over ``batches``
    (an iterable of ``(x, y)`` or ``(x, y, idx)`` in the stored order): one
    ``(n_images, channels, pool, pool)`` float32 CPU tensor per stage."""
    mods = _modules(model, names)
    if mods is None:
        raise ValueError(f"{type(model).__name__} lacks one of the stages {list(names)}")
    rec = _Recorder(mods)
    out: list[list[torch.Tensor]] = [[] for _ in mods]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:  # type: ignore[attr-defined]
            model(batch[0])
            for i, o in enumerate(rec.outputs):
                out[i].append(_pool(o, pool).cpu())
    finally:
        rec.remove()
        model.train(was_training)
    return [torch.cat(chunks) for chunks in out]


class StageMatcher(nn.Module):
    """The stage-matching term of one student: hooks on its stages and a 1x1 adapter per stage.

    Args:
        student: the model being trained (its stage modules are hooked until :meth:`remove`).
        names: stage module names, shared with the teacher.
        teacher_channels: channels of each teacher stage (from :func:`stage_features`).
        pool: the pooled side (px) both sides are compared at.
        probe: an input batch the adapters' student channels are read from (one forward pass
            in eval mode, no gradient, BN statistics untouched).
    """

    def __init__(self, student: nn.Module, names: Sequence[str], teacher_channels: Sequence[int], pool: int,
                 probe: torch.Tensor):
        super().__init__()
        mods = _modules(student, names)
        if mods is None:
            raise ValueError(f"{type(student).__name__} lacks one of the stages {list(names)}")
        self.pool = int(pool)
        self._rec = _Recorder(mods)
        was_training = student.training
        student.eval()
        with torch.no_grad():
            student(probe)
        student.train(was_training)
        channels = [int(o.shape[1]) for o in self._rec.outputs]  # type: ignore[union-attr]
        self.adapters = nn.ModuleList(nn.Conv2d(c, int(t), 1, bias=False) for c, t in zip(channels, teacher_channels))

    def loss(self, teacher: Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean over stages of the squared distance between the L2-normalised adapted student
        stage and the teacher's, for the batch just run through the student."""
        terms = []
        for adapter, out, t in zip(self.adapters, self._rec.outputs, teacher):
            s = adapter(_pool(out, self.pool)).flatten(1)  # type: ignore[arg-type]
            terms.append((F.normalize(s, dim=1) - F.normalize(t.flatten(1).to(s.device), dim=1)).pow(2).sum(1).mean())
        return torch.stack(terms).mean()

    def remove(self) -> None:
        """Detach the hooks from the student (the adapters are discarded with the matcher)."""
        self._rec.remove()
