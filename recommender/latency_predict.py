"""A model's batch-1 latency on a profiled device, predicted from its operators.

:func:`predict_latency` traces the model once (:func:`recommender.latency_ops.trace`: on meta
tensors for float models, so nothing is computed; int8 models run once), looks every operator
up in the profile and adds the calibrated sum (:func:`recommender.latency_ops.apply_calibration`):

- an operator timed on the device with these shapes: its median time;
- one of a kind the profile timed, with other channel counts or spatial sizes: interpolated
  in its work (multiply-accumulates for convolutions and linear layers, elements otherwise)
  between the timed operators of the same group (same operator, kernel, stride, padding,
  dilation, depthwise/grouped/dense, dtype, engine), preferring those of the same spatial
  size; beyond the timed range, scaled in proportion from the nearest one (above) or held at
  the smallest one's time (below);
- one of a kind the profile never timed (``quantized.conv2d@qnnpack`` on a profile measured
  without that engine, ``aten.conv2d[float16]`` where fp16 failed on the device, an operator
  none of the plan's models runs): the prediction is **refused** with a one-line
  :class:`recommender.errors.ProfileError` naming the kinds (exit 2). It never falls back to a
  latency measured on this machine: that would mix two devices in one number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import latency_ops
from .errors import ProfileError
from .latency_profile import LatencyProfile

__all__ = ["Prediction", "predict_latency", "predict_records", "check_space"]


@dataclass
class Prediction:
    """A predicted latency in ms (``ms``: calibrated; ``raw_ms``: the plain sum of operators)
    with how it was obtained: operators found exactly (``exact``), interpolated within their
    group (``interpolated``) or only within their kind (``approximate``)."""

    ms: float
    raw_ms: float
    sums: dict[str, float] = field(default_factory=dict)
    exact: int = 0
    interpolated: int = 0
    approximate: int = 0
    profile: str = ""

    @property
    def operators(self) -> int:
        return self.exact + self.interpolated + self.approximate


_INDEX: dict[tuple[str, str], latency_ops.Index] = {}


def _index(prof: LatencyProfile) -> latency_ops.Index:
    key = (prof.path, prof.digest)
    if key not in _INDEX:
        _INDEX[key] = latency_ops.Index(prof.entries)
    return _INDEX[key]


def predict_records(records: list[dict[str, Any]], profile: LatencyProfile) -> Prediction:
    """The calibrated latency (ms) of a traced model's records on the profile's device."""
    sums, counts, missing = latency_ops.predict_sums(records, _index(profile))
    if missing:
        engines = ", ".join(profile.data.get("engines") or []) or "none"
        raise ProfileError(
            f"latency profile {profile.name} has no timing of {', '.join(sorted(missing))}, which this "
            f"candidate runs (the profile's int8 engines: {engines}): its latency on that device cannot "
            f"be predicted; profile the device with a plan that runs it, or leave such candidates out "
            f"of the search space")
    ms = latency_ops.apply_calibration(sums, profile.calibration)
    raw = sum(sums.values())
    return Prediction(ms=max(ms, 0.0) if math.isfinite(ms) else raw, raw_ms=raw, sums=sums,
                      profile=profile.name, **counts)


def predict_latency(model: nn.Module, profile: LatencyProfile,
                    input_size: tuple[int, ...] = (1, 3, 32, 32)) -> Prediction:
    """Predicted batch-1 latency (ms) of ``model`` at ``input_size`` on the device that measured
    ``profile`` (see the module docstring; the model is left as it was)."""
    return predict_records(latency_ops.trace(model, input_size), profile)


def check_space(profile: LatencyProfile, space: Any) -> None:
    """Refuse, before any training, a search space that offers recipes the profile cannot
    predict: int8 on an engine the profile has no timing for, fp16 where it timed none.

    ``space``: a :class:`recommender.search.space.SearchSpace`. One-line :class:`ProfileError`."""
    offered: dict[str, set[Any]] = {}
    for d in space.dimensions:
        if d.section == "quant" and d.name in ("scheme", "engine"):
            offered.setdefault(d.name, set()).update(d.choices if d.choices is not None else (d.value,))
    schemes = offered.get("scheme", set())
    engines = {e for e in offered.get("engine", set()) if e} or {"x86"}
    if schemes & {"int8-static", "int8-dynamic"}:
        timed = {k.rsplit("@", 1)[1] for k in profile.kinds if "@" in k}
        lacking = sorted(e for e in engines if e not in timed)
        if lacking:
            raise ProfileError(
                f"latency profile {profile.name} has no int8 timings on the {', '.join(lacking)} engine, which the "
                f"search space offers (quant.engine); the profile timed int8 on: {', '.join(sorted(timed)) or 'none'}: "
                f"search with a --space whose quant.engine is one of those, or without int8")
    if "fp16" in schemes and not any(k.endswith("[float16]") for k in profile.kinds):
        raise ProfileError(f"latency profile {profile.name} has no float16 timings, and the search space offers "
                           f"fp16: search with a --space without it")
