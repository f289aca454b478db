"""The compression-method registry: pruning and quantization methods as registered entries.

A recipe applies one method per *stage*, in order: ``prune`` then ``quant``. A method registers
itself (in the module that implements it) with

- its **config dataclass** (frozen; its fields are the method's search-space keys, e.g.
  ``prune.sparsity``; the stage's discriminator key ``prune.method`` / ``quant.scheme`` names it),
- what it **can lower** (``params``, ``nonzero-params``, ``flops``, ``size``, ``latency``: the
  budget metrics of :mod:`recommender.constraints`),
- ``apply(model, cfg, ctx) -> (model, report)``,
- optionally ``estimate(model, cfg, costs, ctx) -> (model, costs)``: the best case it can reach
  from the *structure* alone (an untrained build), in milliseconds to seconds, so a candidate
  whose structure breaks a budget that its methods cannot bring down is never trained,
- optionally ``bound(model, cfg, costs, ctx) -> (model, costs)``: a lower bound of that best
  case that needs no weights (the model may live on the meta device) and takes milliseconds;
  the estimate itself when it needs none. A method without one is judged by its estimate only.

Adding a method (low-rank factorisation, quantization-aware training) means one module that
registers it (imported in :func:`_ensure_builtin`) and its keys in a search-space YAML.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Callable, ClassVar

import torch
from torch import nn

from ..errors import RecommenderError, UnknownNameError

__all__ = ["Stage", "STAGES", "MethodConfig", "CompressionMethod", "CompressContext", "StructureCosts",
           "register_method", "get_method", "list_methods", "make_config", "stage_fields"]


@dataclass(frozen=True)
class Stage:
    """A step of the compression pipeline: ``key`` names the method in JSON and search spaces."""

    name: str
    key: str
    default: str


STAGES: dict[str, Stage] = {
    "prune": Stage("prune", "method", "none"),
    "quant": Stage("quant", "scheme", "fp32"),
}


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config. Subclasses are frozen dataclasses with defaults for every
    field and set ``method`` / ``stage`` (class attributes filled in by :func:`register_method`)."""

    method: ClassVar[str] = ""
    stage: ClassVar[str] = ""
    #: Fields added after recipes were stored and studies cached: left out of :meth:`to_dict` while
    #: at their dataclass default, so a recipe that does not use them keeps its old dict (and every
    #: key, memo and stored trial attribute built from it).
    keyed_if_set: ClassVar[tuple[str, ...]] = ()

    @property
    def active(self) -> bool:
        """False for the stage's no-op method (``none``, ``fp32``)."""
        return self.method != STAGES[self.stage].default

    @property
    def scheme(self) -> str:  # the quant stage's name for its method
        return self.method

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for f in fields(self):
            if f.name in self.keyed_if_set and f.default is not MISSING and data[f.name] == f.default:
                del data[f.name]
        return {STAGES[self.stage].key: self.method, **data}

    def describe(self) -> str:
        """Short text for tables (``structured-channel 30%``, ``int8-static/x86``)."""
        return self.method

    def batches_needed(self) -> int:
        """Training batches the method reads (calibration, Taylor importance)."""
        return 0


@dataclass
class CompressContext:
    """What a method may use besides the model.

    example_input: one input batch for graph tracing (float32, the deploy input size).
    batches: ``(x, y)`` training batches (Taylor importance, int8 calibration).
    finetune: ``finetune(model, steps) -> loss`` recovery training (with distillation from the
        baseline when the protocol asks for it), or None.
    finetune_steps: the recovery budget in optimiser steps for the whole stage.
    sensitivity: the trained model's per-group pruning sensitivity
        (:class:`~.prune_sensitivity.PruneSensitivity`), for a sensitivity allocation; None: the
        method measures it from ``batches`` if it needs it.
    steps_per_epoch: optimiser steps in one epoch of the training data (0: unknown); methods whose
        budget is in epochs (``qat_epochs``) convert with it.
    quant_ranking: quantizable layer names, most sensitive to int8 first (from
        :mod:`recommender.compress.quant_sensitivity`, computed once per study on the trained
        baseline); None: a method that needs it computes it on the model it is given.
    """

    example_input: torch.Tensor
    batches: list[Any] | None = None
    finetune: Callable[[nn.Module, int], Any] | None = None
    finetune_steps: int = 0
    sensitivity: Any = None
    steps_per_epoch: int = 0
    quant_ranking: tuple[str, ...] | None = None


@dataclass
class StructureCosts:
    """Best-case costs of a candidate known before training (counts, MFLOPs, MB)."""

    params: float
    nonzero_params: float
    mflops: float | None
    size_mb: float
    notes: list[str] = field(default_factory=list)

    def as_costs(self) -> dict[str, Any]:
        return {"params": self.params, "nonzero_params": self.nonzero_params, "mflops": self.mflops,
                "size_mb": self.size_mb}


Apply = Callable[[nn.Module, MethodConfig, CompressContext], tuple[nn.Module, Any]]
Estimate = Callable[[nn.Module, MethodConfig, StructureCosts, CompressContext], tuple[nn.Module, StructureCosts]]


@dataclass(frozen=True)
class CompressionMethod:
    """A registered method (see the module docstring)."""

    name: str
    stage: str
    config: type[MethodConfig]
    lowers: frozenset[str]
    apply: Apply
    estimate: Estimate | None = None
    description: str = ""
    bound: Estimate | None = None


_METHODS: dict[str, dict[str, CompressionMethod]] = {s: {} for s in STAGES}


def register_method(name: str, stage: str, config: type[MethodConfig], *, lowers: set[str] | frozenset[str],
                    apply: Apply, estimate: Estimate | None = None, description: str = "",
                    bound: Estimate | None = None) -> CompressionMethod:
    """Register a method (idempotent for the same name and config class); see the module
    docstring for ``estimate`` and ``bound``."""
    from ..constraints import METRICS

    if stage not in STAGES:
        raise RecommenderError(f"unknown compression stage {stage!r}; valid: {', '.join(STAGES)}")
    bad = set(lowers) - set(METRICS)
    if bad:
        raise RecommenderError(f"method {name!r} declares unknown metrics {sorted(bad)}; valid: {', '.join(METRICS)}")
    config.method, config.stage = name, stage
    m = CompressionMethod(name, stage, config, frozenset(lowers), apply, estimate, description, bound)
    _METHODS[stage][name] = m
    return m


def _ensure_builtin() -> None:
    from . import prune, quantize  # noqa: F401  (they register themselves)


def list_methods(stage: str | None = None) -> list[str]:
    """Registered method names (of one stage)."""
    _ensure_builtin()
    stages = [stage] if stage else list(STAGES)
    return [n for s in stages for n in _METHODS[s]]


def get_method(stage: str, name: str) -> CompressionMethod:
    _ensure_builtin()
    if stage not in _METHODS:
        raise UnknownNameError("compression stage", stage, list(STAGES))
    if name not in _METHODS[stage]:
        kind = "prune method" if stage == "prune" else "quantization scheme"
        raise UnknownNameError(kind, name, list(_METHODS[stage]))
    return _METHODS[stage][name]


def stage_fields(stage: str) -> set[str]:
    """Every config field of every method of ``stage`` (the stage's search-space keys), plus
    the discriminator key."""
    _ensure_builtin()
    out = {STAGES[stage].key}
    for m in _METHODS[stage].values():
        out |= {f.name for f in fields(m.config)}
    return out


def make_config(stage: str, data: dict[str, Any] | MethodConfig | None) -> MethodConfig:
    """The config of ``stage`` from its dict form (``{"method": "structured-channel",
    "sparsity": 0.3}``); absent fields take the method's defaults. A key the chosen method does
    not have is an error, unless it only restates another method's default (older recipe files
    list every option of the stage: ``{"method": "none", "sparsity": 0.0, "importance": "l1"}``)."""
    if isinstance(data, MethodConfig):
        return data
    data = dict(data or {})
    st = STAGES[stage]
    name = data.pop(st.key, st.default)
    if not isinstance(name, str):
        raise RecommenderError(f"{stage}.{st.key} must be a method name, got {name!r}")
    method = get_method(stage, name)
    own = {f.name for f in fields(method.config)}
    unknown = sorted(k for k in data if k not in own and not _restates_default(stage, k, data[k]))
    if unknown:
        raise RecommenderError(f"unknown {stage} option(s) {', '.join(unknown)}; options of {name!r}: "
                               f"{', '.join(sorted(own)) or 'none'}")
    try:
        return method.config(**{k: v for k, v in data.items() if k in own})
    except TypeError as exc:
        raise RecommenderError(f"invalid {stage} options for {name!r}: {exc}") from None


def _restates_default(stage: str, key: str, value: Any) -> bool:
    for m in _METHODS[stage].values():
        for f in fields(m.config):
            if f.name == key and f.default is not MISSING and f.default == value:
                return True
    return False


def check_fraction(name: str, value: Any, lo: float = 0.0, hi: float = 1.0, *, lo_open: bool = False,
                   hi_open: bool = True) -> float:
    """``value`` as a float in the interval, else a one-line RecommenderError (configs use it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecommenderError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if (v < lo or (lo_open and v == lo)) or (v > hi or (hi_open and v == hi)):
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise RecommenderError(f"{name} must be in {lb}{lo:g}, {hi:g}{rb}, got {value!r}")
    return v


def check_int(name: str, value: Any, lo: int = 0) -> int:
    """``value`` as an integer >= ``lo`` and within the limit called ``name`` where
    :mod:`recommender.limits` has one, else a one-line RecommenderError (configs use it)."""
    from .. import limits

    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise RecommenderError(f"{name} must be an integer >= {lo}, got {value!r}")
    if name in limits.LIMITS:
        limits.check(name, value, name)
    return value
