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

import bisect
import json
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import latency_ops
from .errors import ProfileError
from .latency_profile import LatencyProfile

__all__ = ["Prediction", "predict_latency", "predict_records", "work_of", "group_of"]


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


# --------------------------------------------------------------------------------------------
# features of an operator


def _tensors(v: Any) -> list[dict[str, Any]]:
    out = []
    if isinstance(v, dict):
        if "t" in v:
            return [v]
        if "packed" in v:
            return [v["w"]]
        for x in v.values():
            out += _tensors(x)
    elif isinstance(v, list):
        for x in v:
            out += _tensors(x)
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _conv_parts(spec: dict[str, Any]) -> tuple[list[int], list[int], int] | None:
    """(input shape, weight shape, groups) of a convolution, float or packed int8."""
    args = spec.get("args", [])
    if spec["op"].startswith("aten.conv") and len(args) >= 2 and isinstance(args[1], dict) and "t" in args[1]:
        groups = args[6] if len(args) > 6 and isinstance(args[6], int) else 1
        return args[0]["t"], args[1]["t"], groups
    if len(args) >= 2 and isinstance(args[1], dict) and args[1].get("packed") == "conv2d":
        return args[0]["t"], args[1]["w"]["t"], int(args[1].get("groups", 1))
    return None


def work_of(spec: dict[str, Any]) -> float:
    """The operator's amount of work: multiply-accumulates of a convolution (output elements x
    input channels per group x kernel area, at the input's spatial size) or of a linear layer,
    else the elements of its tensors."""
    conv = _conv_parts(spec)
    if conv is not None:
        x, w, _ = conv
        spatial = _numel(x[2:]) if len(x) > 2 else 1
        return float(w[0] * _numel(w[1:]) * spatial)
    args = spec.get("args", [])
    tens = _tensors(args)
    if ("linear" in spec["op"] or "addmm" in spec["op"]) and len(tens) >= 2:
        x, w = tens[0]["t"], tens[1]["t"]
        return float(_numel(x[:-1]) * _numel(w))
    return float(sum(_numel(t["t"]) for t in tens) or 1)


def _spatial(spec: dict[str, Any]) -> tuple[int, ...]:
    for t in _tensors(spec.get("args", [])):
        if len(t["t"]) == 4:
            return tuple(t["t"][2:])
    return ()


def group_of(spec: dict[str, Any]) -> str:
    """The operator with its channel counts and spatial sizes left out: its op, dtypes,
    ranks, non-tensor arguments, a convolution's kernel and whether it is depthwise, grouped
    or dense. Operators of one group differ in work only."""
    conv = _conv_parts(spec)
    shape_free = _shape_free(latency_ops.canonical(spec))
    if conv is not None:
        x, w, groups = conv
        cin = x[1] if len(x) > 1 else 1
        args = shape_free.get("args", [])
        if spec["op"].startswith("aten.conv") and len(args) > 6:
            args[6] = "groups"  # a depthwise conv's groups is its channel count
        shape_free["conv"] = {"kernel": list(w[2:]),
                              "groups": "depthwise" if groups > 1 and groups == cin else
                              ("grouped" if groups > 1 else "dense")}
    return json.dumps(shape_free, sort_keys=True, separators=(",", ":"))


def _shape_free(v: Any, key: str = "") -> Any:
    if isinstance(v, dict):
        if "t" in v:
            d = {k: x for k, x in v.items() if k not in ("t", "st")}
            d["rank"] = len(v["t"])
            d["strided"] = "st" in v
            return d
        if "packed" in v:
            return {"packed": v["packed"], "stride": v.get("stride"), "padding": v.get("padding"),
                    "dilation": v.get("dilation"), "b": v.get("b"), "w": _shape_free(v["w"])}
        return {k: _shape_free(x, k) for k, x in v.items()}
    if isinstance(v, list):
        # the size lists of view/reshape and the groups of a conv hold channel counts
        if v and all(isinstance(x, int) and not isinstance(x, bool) for x in v) and len(v) != 2:
            return ["n"] * len(v)
        return [_shape_free(x) for x in v]
    return v


# --------------------------------------------------------------------------------------------
# the index of a profile


class _Index:
    def __init__(self, prof: LatencyProfile):
        self.table = prof.table
        self.groups: dict[str, list[tuple[float, float, tuple[int, ...]]]] = {}
        self.kinds: dict[str, list[tuple[float, float, tuple[int, ...]]]] = {}
        for e in prof.entries:
            spec = {**e["spec"], "engine": e.get("engine")}
            eng = e.get("engine") or ""
            point = (work_of(spec), float(e["ms"]), _spatial(spec))
            self.groups.setdefault(group_of(spec) + "@" + eng, []).append(point)
            self.kinds.setdefault(latency_ops.kind_of(spec), []).append(point)
        for d in (self.groups, self.kinds):
            for pts in d.values():
                pts.sort()


_INDEX: dict[tuple[str, str], _Index] = {}


def _index(prof: LatencyProfile) -> _Index:
    key = (prof.path, prof.digest)
    if key not in _INDEX:
        _INDEX[key] = _Index(prof)
    return _INDEX[key]


def _interpolate(points: list[tuple[float, float, tuple[int, ...]]], work: float) -> float:
    """Piecewise linear in work between the timed points; proportional above the largest,
    the smallest's time below the smallest."""
    works = [p[0] for p in points]
    i = bisect.bisect_left(works, work)
    if i < len(points) and works[i] == work:
        same = [p[1] for p in points if p[0] == work]
        return sorted(same)[len(same) // 2]
    if i == 0:
        return points[0][1]
    if i == len(points):
        w, t = points[-1][0], points[-1][1]
        return t * work / w if w > 0 else t
    (w0, t0, _), (w1, t1, _) = points[i - 1], points[i]
    return t0 + (t1 - t0) * (work - w0) / (w1 - w0)


def _lookup(idx: _Index, rec: dict[str, Any], kind: str) -> tuple[float, str]:
    """(time in ms, how: exact / interpolated / approximate); KeyError(kind) when unknown."""
    eng = rec.get("engine") or ""
    key = latency_ops.spec_key(rec) + "@" + eng
    if key in idx.table:
        return idx.table[key], "exact"
    work = work_of(rec)
    pts = idx.groups.get(group_of(rec) + "@" + eng)
    if pts:
        sp = _spatial(rec)
        same = [p for p in pts if p[2] == sp]
        return _interpolate(same or pts, work), "interpolated"
    pts = idx.kinds.get(kind)
    if pts:
        return _interpolate(pts, work), "approximate"
    raise KeyError(kind)


def predict_records(records: list[dict[str, Any]], profile: LatencyProfile) -> Prediction:
    """The calibrated latency (ms) of a traced model's records on the profile's device."""
    idx = _index(profile)
    counts = {"exact": 0, "interpolated": 0, "approximate": 0}
    sums: dict[str, float] = {}
    missing: list[str] = []
    for rec in records:
        kind = latency_ops.kind_of(rec)
        try:
            t, how = _lookup(idx, rec, kind)
        except KeyError:
            if kind not in missing:
                missing.append(kind)
            continue
        counts[how] += 1
        c = latency_ops.dtype_class(kind)
        sums[c] = sums.get(c, 0.0) + t
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
