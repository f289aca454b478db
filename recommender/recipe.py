"""The recipe: what the recommender recommends.

A :class:`Recipe` is an :class:`~recommender.models.arch.ArchConfig` (architecture techniques),
a :class:`PruneConfig` and a :class:`QuantConfig`. Applied to a base model name and a class count
it builds a model deterministically. Recipes round-trip through JSON.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .errors import CheckpointError, RecommenderError
from .models.arch import ArchConfig

PruneMethod = Literal["none", "unstructured-l1", "structured-channel"]
PRUNE_METHODS: tuple[str, ...] = ("none", "unstructured-l1", "structured-channel")
Importance = Literal["l1", "taylor"]
IMPORTANCES: tuple[str, ...] = ("l1", "taylor")
QuantScheme = Literal["fp32", "fp16", "int8-dynamic", "int8-static"]
QUANT_SCHEMES: tuple[str, ...] = ("fp32", "fp16", "int8-dynamic", "int8-static")
QUANT_ENGINES: tuple[str, ...] = ("x86", "qnnpack")
QUANT_OBSERVERS: tuple[str, ...] = ("histogram", "minmax")


def _check_choice(kind: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise RecommenderError(f"unknown {kind} {value!r}; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class PruneConfig:
    """How to prune a trained model.

    Args:
        method: ``none``; ``unstructured-l1`` (the paper: iterative global L1 magnitude pruning of
            conv weights, zeros stay in dense tensors); ``structured-channel`` (torch-pruning
            removes whole channels, so params, FLOPs and latency fall).
        sparsity: target fraction in [0, 1): of conv weights zeroed (unstructured) or of channels
            removed per prunable layer (structured).
        importance: channel importance for structured pruning: ``l1`` magnitude or ``taylor``
            (first-order gradient x weight, needs a few batches).
        step: fraction of the remaining weights removed per unstructured round (paper: 0.2).
        finetune_steps: optimiser steps of fine-tuning after each pruning round (0 = none).
    """

    method: PruneMethod = "none"
    sparsity: float = 0.0
    importance: Importance = "l1"
    step: float = 0.2
    finetune_steps: int = 0

    def __post_init__(self) -> None:
        _check_choice("prune method", self.method, PRUNE_METHODS)
        _check_choice("pruning importance", self.importance, IMPORTANCES)
        if not 0.0 <= float(self.sparsity) < 1.0:
            raise RecommenderError(f"pruning sparsity must be in [0, 1), got {self.sparsity}")
        if not 0.0 < float(self.step) < 1.0:
            raise RecommenderError(f"pruning step must be in (0, 1), got {self.step}")
        if self.finetune_steps < 0:
            raise RecommenderError("finetune_steps must be >= 0")

    @property
    def active(self) -> bool:
        return self.method != "none" and self.sparsity > 0.0


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a (pruned) model for deployment on a CPU.

    Args:
        scheme: ``fp32`` (none), ``fp16`` (half-precision weights), ``int8-dynamic`` (weights
            int8, activations quantized on the fly: Linear layers only), ``int8-static``
            (post-training static int8 with calibration; conv, linear, activations).
        engine: int8 kernel backend: ``x86`` (servers, laptops) or ``qnnpack`` (ARM phones/boards).
        calibration_batches: training batches observed to calibrate ``int8-static``.
        observer: activation range observer of ``int8-static``: ``histogram`` (PyTorch's
            default, searches the clipping range; slow to convert with hundreds of layers) or
            ``minmax`` (fast, plain min/max range).
    """

    scheme: QuantScheme = "fp32"
    engine: str = "x86"
    calibration_batches: int = 8
    observer: str = "histogram"

    def __post_init__(self) -> None:
        _check_choice("quantization scheme", self.scheme, QUANT_SCHEMES)
        _check_choice("quantization engine", self.engine, QUANT_ENGINES)
        _check_choice("activation observer", self.observer, QUANT_OBSERVERS)
        if self.calibration_batches < 1:
            raise RecommenderError("calibration_batches must be >= 1")

    @property
    def active(self) -> bool:
        return self.scheme != "fp32"


@dataclass(frozen=True)
class Recipe:
    """Architecture + pruning + quantization, applied in that order to a base model."""

    arch: ArchConfig = field(default_factory=ArchConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch.to_dict(), "prune": asdict(self.prune), "quant": asdict(self.quant)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        if not isinstance(data, dict):
            raise CheckpointError("a recipe must be a JSON object with arch, prune and quant")
        try:
            return cls(
                arch=ArchConfig.from_dict(data.get("arch") or {}),
                prune=PruneConfig(**_known(PruneConfig, data.get("prune") or {})),
                quant=QuantConfig(**_known(QuantConfig, data.get("quant") or {})),
            )
        except (TypeError, ValueError, RecommenderError) as exc:
            raise CheckpointError(f"invalid recipe: {exc}") from None

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"recipe is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    def describe(self) -> str:
        """One line for tables: ``arch | prune | quant``."""
        parts = [self.arch.describe() if hasattr(self.arch, "describe") else "arch"]
        parts.append(
            f"{self.prune.method} {self.prune.sparsity:.0%}" if self.prune.active else "no pruning"
        )
        parts.append(
            f"{self.quant.scheme}/{self.quant.engine}" if self.quant.scheme.startswith("int8")
            else self.quant.scheme
        )
        return " | ".join(parts)


def _known(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise TypeError(f"unknown {cls.__name__} keys {sorted(unknown)}")
    return dict(data)


def load_recipe(path: str | Path) -> tuple[str | None, int | None, Recipe]:
    """Read a recipe file written by the recommender.

    The file is JSON: either a bare recipe or ``{"model": ..., "num_classes": ..., "recipe": {...}}``.
    Returns (model name or None, class count or None, recipe).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise CheckpointError(f"cannot read recipe {p}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"recipe {p} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and "recipe" in data:
        return data.get("model"), data.get("num_classes"), Recipe.from_dict(data["recipe"])
    return None, None, Recipe.from_dict(data)
