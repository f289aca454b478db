"""Prune, then quantize: ``compress(model, recipe, *, example_input, batches, finetune=None)``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from ..recipe import PruneConfig, QuantConfig, Recipe
from .prune import Finetune, PruneReport, apply_pruning
from .quantize import QuantReport, apply_quantization

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
    recipe: Recipe | tuple[PruneConfig, QuantConfig],
    *,
    example_input: torch.Tensor,
    batches: Iterable[Any] | None,
    finetune: Finetune | None = None,
) -> tuple[nn.Module, CompressReport]:
    """Apply ``recipe.prune`` then ``recipe.quant`` to a copy of ``model``.

    ``batches``: (x, y) training batches; used for Taylor importance and, as x, for calibration
    (at most ``quant.calibration_batches``). It is materialised once, so a one-shot iterator works.
    ``finetune(model, steps)``: fine-tuning callback for pruning.
    """
    t0 = time.perf_counter()
    if isinstance(recipe, Recipe):
        pcfg, qcfg = recipe.prune, recipe.quant
    else:
        pcfg, qcfg = recipe
    data = list(batches) if batches is not None else []
    pruned, prep = apply_pruning(model, pcfg, example_input=example_input, batches=data or None, finetune=finetune)
    pruned.eval()
    quantized, qrep = apply_quantization(pruned, qcfg, calibration=data, example_input=example_input)
    report = CompressReport(prune=prep, quant=qrep, seconds=time.perf_counter() - t0, float_model=pruned)
    return quantized, report
