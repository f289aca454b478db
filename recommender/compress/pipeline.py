"""Prune, then quantize: ``compress(model, recipe, *, example_input, batches, finetune=None)``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from .methods import CompressContext, MethodConfig, get_method
from .prune import Finetune, PruneReport
from .quantize import QuantReport, repack_weights

__all__ = ["CompressReport", "compress"]


@dataclass
class CompressReport:
    """Both steps' reports. ``float_model`` is the pruned model before quantization: measure its
    FLOPs for a quantized model (int8 changes size and latency, not the MAC count)."""

    prune: PruneReport
    quant: QuantReport
    seconds: float = 0.0
    float_model: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"prune": self.prune.to_dict(), "quant": self.quant.to_dict(), "seconds": self.seconds}


def compress(
    model: nn.Module,
    recipe: Any,
    *,
    example_input: torch.Tensor,
    batches: Iterable[Any] | None,
    finetune: Finetune | None = None,
    finetune_steps: int = 0,
    sensitivity: Any = None,
    steps_per_epoch: int = 0,
    quant_ranking: tuple[str, ...] | None = None,
    bn_images: Iterable[torch.Tensor] | None = None,
) -> tuple[nn.Module, CompressReport]:
    """Apply the recipe's pruning then its quantization (registered methods) to a copy of
    ``model``; ``recipe`` is a Recipe or a (prune config, quant config) pair.

    ``batches``: (x, y) training batches; used for Taylor importance and, as x, for calibration.
    It is materialised once, so a one-shot iterator works. ``finetune(model, steps)``: recovery
    training for pruning, ``finetune_steps`` its budget (unless the method's config sets one).
    ``sensitivity``: the trained model's pruning sensitivity, for a sensitivity allocation.
    ``steps_per_epoch``: optimiser steps per epoch (for ``qat_epochs``); ``quant_ranking``: layer
    names most int8-sensitive first (for ``keep_float``; see :class:`CompressContext`).
    ``bn_images``: input batches whose statistics re-estimate every BatchNorm of the pruned model
    after its recovery training, before quantization (adaptive BN; unused when nothing is pruned).
    """
    t0 = time.perf_counter()
    pcfg, qcfg = (recipe.prune, recipe.quant) if hasattr(recipe, "prune") else recipe
    ctx = CompressContext(example_input, list(batches) if batches is not None else None, finetune, finetune_steps,
                          sensitivity, steps_per_epoch, quant_ranking)
    pruned, prep = _apply(model, pcfg, ctx)
    if bn_images is not None and pcfg.active:
        from .prune_sensitivity import recalibrate_bn

        with torch.no_grad():
            recalibrate_bn(pruned, bn_images)
    pruned.eval()
    quantized, qrep = _apply(pruned, qcfg, ctx)
    engine = getattr(quantized, "_quant_engine", None) or getattr(qcfg, "engine", None)
    if engine:  # packed again: the calls made while converting set the kernels up (repack_weights)
        repack_weights(quantized, engine)
    report = CompressReport(prune=prep, quant=qrep, seconds=time.perf_counter() - t0, float_model=pruned)
    return quantized, report


def _apply(model: nn.Module, cfg: MethodConfig, ctx: CompressContext) -> tuple[nn.Module, Any]:
    return get_method(cfg.stage, cfg.method).apply(model, cfg, ctx)
