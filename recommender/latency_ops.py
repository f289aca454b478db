"""Operators of a model at batch 1: recorded from a forward pass, rebuilt from their spec, timed.

This file imports nothing but ``torch`` and the standard library: ``recommend device-profile
--write-script`` copies it, with a plan appended, into a script that runs on a board where only
torch is installed. The same code times the plan under ``recommend device-profile``.

**Spec of an operator** (JSON): ``{"op": "aten.conv2d.default", "args": [...], "kw": {...}}``,
the dispatcher's overload and its arguments, each tensor as ``{"t": shape, "dt": dtype}`` (plus
``"st"``: strides when not contiguous, ``"q"``: ``[scale, zero_point]`` of a per-tensor quantized
tensor, ``"from": [i, j]``: output ``j`` of record ``i`` in a program), each packed int8 weight as
``{"packed": "conv2d" | "linear", ...}``. The pseudo-operator ``module.call`` is one call of an
``nn.Module`` (its Python overhead: every container and block adds it). Operators are recorded
where Python hands them to the dispatcher (``TorchDispatchMode``) under ``inference_mode``:
``aten.conv2d``, ``aten.batch_norm``, ``aten.add_``, ``quantized.conv2d_relu``, ...; float
models are traced on meta tensors (shapes only, no arithmetic), quantized ones for real.

**Kind** of an operator: its name without the overload, tagged with the dtype it runs in when
that is not float32 (``aten.conv2d[float16]``) and with the int8 engine when it touches quantized
tensors (``quantized.conv2d@x86``). A profile that has no timing of a kind cannot predict it.

**Program**: the records of one whole model in execution order; replaying it (each operator on
the outputs of the operators it read from) runs the model's kernels without the model's code.
Profiling replays programs and times every operator where it runs, in the sequence (an operator
timed alone, in a loop, ran 2-3x faster on the 2-core development VM than in a model: warm
caches and branch predictors), takes each operator's median over the programs it occurs in,
and fits a calibration (:func:`fit_calibration`) on a few programs timed whole: the sum of the
operators' times, corrected per dtype class, plus a constant.

Times are milliseconds, medians of timed samples, each sample the mean of ``number`` calls.
"""

from __future__ import annotations

import argparse
import base64  # noqa: F401  (a written script decodes its plan with it)
import bisect
import json
import math
import os
import platform
import statistics
import sys
import time
import zlib  # noqa: F401  (a written script decodes its plan with it)
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

#: Version of the profile format this file writes (a reader refuses any other major version).
FORMAT = "recommender-latency-profile"
FORMAT_VERSION = 1
MODULE_CALL = "module.call"
_NAMESPACES = ("aten", "quantized")
_QDTYPES = {"quint8": torch.quint8, "qint8": torch.qint8, "qint32": torch.qint32}


# --------------------------------------------------------------------------------------------
# specs


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


def _contiguous_strides(shape: list[int]) -> list[int]:
    out, acc = [], 1
    for n in reversed(shape):
        out.append(acc)
        acc *= max(1, n)
    return list(reversed(out))


def tensor_spec(t: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype, strides (when not contiguous) and per-tensor quantization of a tensor."""
    shape = list(t.shape)
    spec: dict[str, Any] = {"t": shape, "dt": _dtype_name(t.dtype)}
    if not t.is_quantized:
        st = list(t.stride())
        if st != _contiguous_strides(shape) and t.numel() > 1:
            spec["st"] = st
    elif t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        spec["q"] = [float(t.q_scale()), int(t.q_zero_point())]
    else:
        spec["q"] = "per_channel"
    return spec


def _packed_spec(obj: Any) -> dict[str, Any] | None:
    """Spec of a packed int8 weight (conv or linear), or None for another script object."""
    name = str(getattr(obj, "_type", lambda: "")()) if hasattr(obj, "_type") else type(obj).__name__
    try:
        if "Conv" in name or hasattr(obj, "groups"):
            w, b = obj.unpack()
            return {"packed": "conv2d", "w": tensor_spec(w), "b": b is not None,
                    "stride": list(obj.stride()), "padding": list(obj.padding()),
                    "dilation": list(obj.dilation()), "groups": int(obj.groups())}
        if "Linear" in name:
            w, b = torch.ops.quantized.linear_unpack(obj)
            return {"packed": "linear", "w": tensor_spec(w), "b": b is not None}
    except Exception:
        return None
    return None


class _Encoder:
    """Turns dispatcher arguments into JSON, noting where each tensor came from."""

    def __init__(self, origin: dict[int, list[int]] | None):
        self.origin = origin

    def __call__(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            spec = tensor_spec(v)
            if self.origin is not None and id(v) in self.origin:
                spec["from"] = self.origin[id(v)]
            return spec
        if isinstance(v, (list, tuple)):
            return [self(x) for x in v]
        if isinstance(v, dict):
            return {str(k): self(x) for k, x in v.items()}
        if isinstance(v, torch.dtype):
            return {"dtype": _dtype_name(v)}
        if isinstance(v, torch.device):
            return {"device": "cpu"}
        if isinstance(v, torch.memory_format):
            return {"memory_format": str(v).replace("torch.", "")}
        if isinstance(v, torch.layout):
            return {"layout": str(v).replace("torch.", "")}
        if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"float": repr(v)}
        packed = _packed_spec(v)
        if packed is not None:
            return packed
        return {"opaque": type(v).__name__}


def spec_key(spec: dict[str, Any]) -> str:
    """The table key of an operator: its canonical spec (:func:`canonical`) as JSON."""
    return json.dumps(canonical(spec), sort_keys=True, separators=(",", ":"))


# Quantization parameters of an activation change from layer to layer and model to model but
# not the kernel's time: the key and the timed operator use these instead.
_CANON_SCALE, _CANON_ZERO = 0.05, 64


def canonical(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec without provenance and engine, with every activation's scale and zero point
    (tensor ``q`` fields, scalar arguments of ``quantized.*`` operators) set to fixed values."""
    out = {k: _strip(v) for k, v in spec.items() if k not in ("from", "engine")}
    if isinstance(out.get("args"), list):
        out["args"] = _canon_scalars(out["op"], out["args"])
    return out


def _canon_scalars(op: str, args: list[Any]) -> list[Any]:
    """A ``quantized.*`` operator's output scale (a float) and zero point (the int after it)
    set to fixed values; other operators' arguments as they are."""
    if not op.startswith("quantized."):
        return args
    out, prev_float = [], False
    for a in args:
        if isinstance(a, float):
            a, prev_float = _CANON_SCALE, True
        elif isinstance(a, int) and not isinstance(a, bool) and prev_float:
            a, prev_float = _CANON_ZERO, False
        else:
            prev_float = False
        out.append(a)
    return out


def _strip(v: Any) -> Any:
    if isinstance(v, dict):
        d = {k: _strip(x) for k, x in v.items() if k not in ("from", "engine")}
        if isinstance(d.get("q"), list):
            d["q"] = [_CANON_SCALE, _CANON_ZERO if d.get("dt") == "quint8" else 0]
        return d
    if isinstance(v, list):
        return [_strip(x) for x in v]
    return v


def _walk(v: Any) -> Iterable[dict[str, Any]]:
    if isinstance(v, dict):
        yield v
        for x in v.values():
            yield from _walk(x)
    elif isinstance(v, list):
        for x in v:
            yield from _walk(x)


def is_int8(spec: dict[str, Any]) -> bool:
    """Whether an operator touches quantized tensors or packed int8 weights."""
    return _any_int8(spec.get("args", []))


def _any_int8(v: Any) -> bool:
    if isinstance(v, list):
        return any(_any_int8(x) for x in v)
    if isinstance(v, dict):
        return v.get("dt") in _QDTYPES or "packed" in v or (
            "t" not in v and any(_any_int8(x) for x in v.values()))
    return False


def kind_of(spec: dict[str, Any]) -> str:
    """``aten.conv2d``, ``aten.conv2d[float16]``, ``quantized.conv2d@x86``, ``module.call``."""
    op = spec["op"]
    base = op.rsplit(".", 1)[0] if op.count(".") >= 2 else op
    if is_int8(spec):
        return f"{base}@{spec.get('engine') or 'x86'}"
    for d in _walk(spec.get("args", [])):
        if "dt" in d and d["dt"] != "float32" and d["dt"].startswith(("float", "bfloat")):
            return f"{base}[{d['dt']}]"
    return base


def dtype_class(kind: str) -> str:
    """Calibration class of a kind: ``int8@ENGINE``, ``half`` (float16/bfloat16), ``call`` or
    ``float``."""
    if "@" in kind:
        return "int8@" + kind.rsplit("@", 1)[1]
    if "[" in kind:
        return "half"
    if kind == MODULE_CALL:
        return "call"
    return "float"


# --------------------------------------------------------------------------------------------
# tracing


# Element-wise operators (and batch norm in eval mode) whose output has their first input's shape.
_SAME_SHAPE = frozenset(f"aten.{op}.default" for op in (
    "batch_norm", "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "silu", "silu_", "sigmoid", "sigmoid_",
    "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "gelu", "tanh", "tanh_", "dropout",
    "leaky_relu", "leaky_relu_", "elu", "elu_"))


class _Recorder(TorchDispatchMode):
    def __init__(self, meta: bool, engine: Callable[[], str]):
        super().__init__()
        self.meta = meta
        self.engine = engine
        self.records: list[dict[str, Any]] = []
        self.origin: dict[int, list[int]] = {}
        self.keep: list[Any] = []  # outputs stay alive so that ids are not reused

    def call(self) -> None:
        self.records.append({"op": MODULE_CALL, "args": []})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        enc = _Encoder(self.origin)
        rec = {"op": str(func), "args": enc(list(args)), "kw": enc(kwargs)}
        if not self.meta and is_int8(rec):  # meta tensors are never quantized
            rec["engine"] = self.engine()
        index = len(self.records)
        self.records.append(rec)
        if self.meta and rec["op"] in _SAME_SHAPE and args and isinstance(args[0], torch.Tensor):
            # the output has the input's shape: no need for the (slow, Python) meta kernel
            out = args[0] if rec["op"].split(".")[1].endswith("_") else torch.empty_like(args[0])
            self.origin[id(out)] = [index, 0]
            self.keep.append(out)
            return out
        if self.meta:
            def to_meta(v: Any) -> Any:
                if isinstance(v, torch.Tensor) and not v.is_meta:
                    return v.to("meta")
                if isinstance(v, (list, tuple)):
                    return type(v)(to_meta(x) for x in v)
                return v
            args = to_meta(args)
            kwargs = {k: to_meta(v) for k, v in kwargs.items()}
        out = func(*args, **kwargs)
        flat = out if isinstance(out, (list, tuple)) else [out]
        for j, t in enumerate(flat):
            if isinstance(t, torch.Tensor):
                self.origin[id(t)] = [index, j]
                self.keep.append(t)
        return out


def _has_quantized(model: nn.Module) -> bool:
    for m in model.modules():
        if type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized",
                                          "torch.ao.nn.intrinsic.quantized")):
            return True
    return False


def trace(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32), *,
          meta: bool | None = None) -> list[dict[str, Any]]:
    """The records of one forward pass of ``model`` on a float32 input of ``input_size``.

    ``meta``: run on meta tensors (shapes only; None: for every model without quantized
    modules, whose kernels have no meta version). The model's mode, the quantized engine (which
    int8 models set before each forward) and its weights are left as they were."""
    if meta is None:
        meta = not _has_quantized(model)
    engine_before = torch.backends.quantized.engine
    rec = _Recorder(meta, lambda: torch.backends.quantized.engine)
    hooks = [m.register_forward_pre_hook(lambda mod, a: rec.call()) for m in model.modules()]
    was_training = model.training
    model.eval()
    x = torch.zeros(*input_size, device="meta") if meta else torch.randn(*input_size)
    try:
        with torch.inference_mode(), rec:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        if torch.backends.quantized.engine != engine_before:
            torch.backends.quantized.engine = engine_before
    return rec.records


# --------------------------------------------------------------------------------------------
# rebuilding and timing


def _resolve(op: str) -> Any:
    parts = op.split(".")
    if parts[0] not in _NAMESPACES or len(parts) not in (2, 3):
        raise ValueError(f"operator {op!r} is not one that a profile times")
    fn: Any = getattr(torch.ops, parts[0])
    for p in parts[1:]:
        fn = getattr(fn, p)
    return fn


def _make_tensor(spec: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    shape, dt = spec["t"], spec["dt"]
    if dt in _QDTYPES:
        x = torch.rand(shape, generator=gen) * 2 - 1
        if spec.get("q") == "per_channel" or dt == "qint8" and "q" not in spec:
            axis = 0
            n = shape[axis] if shape else 1
            return torch.quantize_per_channel(x, torch.full((n,), 0.02), torch.zeros(n, dtype=torch.long),
                                              axis, _QDTYPES[dt])
        scale, zp = spec.get("q", [0.05, 0])
        return torch.quantize_per_tensor(x, float(scale), int(zp), _QDTYPES[dt])
    dtype = _dtype(dt)
    if not shape:  # a 0-dim tensor is a scalar parameter (a scale, a zero point): keep it valid
        return torch.tensor(_CANON_SCALE if dtype.is_floating_point else 0, dtype=dtype)
    # vectors (biases, a batch norm's statistics) positive: a running variance must be, and
    # NaNs can run slower; weights of variance 1/fan-in, so that 16 layers without batch norm
    # do not overflow to inf (which a dynamic int8 quantizer refuses)
    if "st" in spec:
        size = 1 + sum((n - 1) * s for n, s in zip(shape, spec["st"]) if n > 0)
        base = (torch.rand(size, generator=gen) + 0.5).to(dtype)
        return base.as_strided(shape, spec["st"])
    if dtype.is_floating_point:
        if len(shape) >= 2:
            fan_in = max(1, _numel_of(shape[1:]))
            return ((torch.rand(shape, generator=gen) * 2 - 1) * math.sqrt(3.0 / fan_in)).to(dtype)
        return (torch.rand(shape, generator=gen) + 0.5).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    return torch.zeros(shape, dtype=dtype)


def _numel_of(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _make_packed(spec: dict[str, Any], gen: torch.Generator) -> Any:
    wspec = spec["w"]
    if torch.backends.quantized.engine == "qnnpack":  # its default weights are per tensor
        wspec = {**wspec, "q": [0.02, 0]}
    w = _make_tensor(wspec, gen)
    n = spec["w"]["t"][0]
    b = torch.randn(n, generator=gen) if spec.get("b") else None
    if spec["packed"] == "conv2d":
        return torch.ops.quantized.conv2d_prepack(w, b, spec["stride"], spec["padding"], spec["dilation"],
                                                  spec["groups"])
    return torch.ops.quantized.linear_prepack(w, b)


def _decode(v: Any, gen: torch.Generator, outputs: list[Any] | None) -> Any:
    if isinstance(v, list):
        return [_decode(x, gen, outputs) for x in v]
    if not isinstance(v, dict):
        return v
    if "t" in v:
        if outputs is not None and "from" in v:
            i, j = v["from"]
            src = outputs[i]
            src = src[j] if isinstance(src, (list, tuple)) else src
            if isinstance(src, torch.Tensor) and list(src.shape) == list(v["t"]):
                return src
        return _make_tensor(v, gen)
    if "packed" in v:
        return _make_packed(v, gen)
    if "dtype" in v:
        return _dtype(v["dtype"])
    if "device" in v:
        return torch.device("cpu")
    if "memory_format" in v:
        return getattr(torch, v["memory_format"])
    if "layout" in v:
        return getattr(torch, v["layout"])
    if "float" in v:
        return float(v["float"])
    if "opaque" in v:
        raise ValueError(f"an argument of type {v['opaque']} cannot be rebuilt")
    return {k: _decode(x, gen, outputs) for k, x in v.items()}


class _Call(nn.Module):
    def forward(self, x: Any) -> Any:
        return x


class _Program:
    """A whole model's records, replayable: ``prog()`` runs them; ``prog.timed(acc)`` also adds
    each record's seconds to ``acc[i]`` (timed where it runs: in the model's sequence, with the
    caches and allocator as the model leaves them)."""

    def __init__(self, records: list[dict[str, Any]], seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.call, self.one = _Call(), torch.zeros(1)
        self.steps: list[tuple[Any, Any, Any, list[list[int]] | None]] = []
        for rec in records:
            if rec["op"] == MODULE_CALL:
                self.steps.append((None, None, None, None))
                continue
            fn = _resolve(rec["op"])
            # constant inputs (weights) are made once; inputs produced by earlier records are
            # looked up at run time
            args = _decode(_canon_scalars(rec["op"], rec.get("args", [])), gen, None)
            kw = _decode(rec.get("kw", {}), gen, None)
            links = [[path_i, *d["from"]] for path_i, d in _tensor_args(rec.get("args", [])) if "from" in d]
            self.steps.append((fn, args, kw, links))

    def _step(self, outs: list[Any], i: int) -> None:
        fn, args, kw, links = self.steps[i]
        if fn is None:
            outs[i] = self.call(self.one)
            return
        if links:
            args = list(args)
            for path, src, j in links:
                o = outs[src]
                o = o[j] if isinstance(o, (list, tuple)) else o
                _set_path(args, path, o)
        outs[i] = fn(*args, **kw)

    def __call__(self) -> Any:
        outs: list[Any] = [None] * len(self.steps)
        for i in range(len(self.steps)):
            self._step(outs, i)
        return outs[-1]

    def timed(self, acc: list[float]) -> None:
        outs: list[Any] = [None] * len(self.steps)
        clock = time.perf_counter
        for i in range(len(self.steps)):
            t0 = clock()
            self._step(outs, i)
            acc[i] += clock() - t0


def build_program(records: list[dict[str, Any]], seed: int = 0) -> _Program:
    """A callable that replays a whole model's records in order, each operator on the outputs
    of the records it read from (fresh tensors where the model read a weight)."""
    return _Program(records, seed)


def time_in_program(records: list[dict[str, Any]], samples: int = 7, warmup: int = 2) -> list[float]:
    """Each record's median time (ms) over ``samples`` replays of the whole program, timed in
    the sequence (see :class:`_Program`)."""
    prog = build_program(records)
    with torch.inference_mode():
        for _ in range(max(1, warmup)):
            prog()
        runs = []
        for _ in range(max(1, samples)):
            acc = [0.0] * len(records)
            prog.timed(acc)
            runs.append(acc)
    return [statistics.median(r[i] for r in runs) * 1000.0 for i in range(len(records))]


def _tensor_args(args: list[Any]) -> Iterable[tuple[tuple[int, ...], dict[str, Any]]]:
    for i, a in enumerate(args):
        if isinstance(a, dict) and "t" in a:
            yield (i,), a
        elif isinstance(a, list):
            for j, b in enumerate(a):
                if isinstance(b, dict) and "t" in b:
                    yield (i, j), b


def _set_path(args: list[Any], path: tuple[int, ...] | list[int], value: Any) -> None:
    if len(path) == 1:
        args[path[0]] = value
    else:
        inner = list(args[path[0]])
        inner[path[1]] = value
        args[path[0]] = inner


def time_fn(fn: Callable[[], Any], *, samples: int = 7, min_sample_ms: float = 0.5,
            warmup: int = 2) -> tuple[float, float]:
    """(median, interquartile range) in ms of one call of ``fn``: ``warmup`` calls, then
    ``samples`` samples, each the mean of enough calls to last ``min_sample_ms``."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in range(max(1, warmup)):
            fn()
        first = (time.perf_counter() - t0) / max(1, warmup)
        number = max(1, int(math.ceil(min_sample_ms / 1000.0 / max(first, 1e-9))))
        out = []
        for _ in range(max(1, samples)):
            t0 = time.perf_counter()
            for _ in range(number):
                fn()
            out.append((time.perf_counter() - t0) / number * 1000.0)
    out.sort()
    q = statistics.quantiles(out, n=4) if len(out) >= 2 else [out[0]] * 3
    return statistics.median(out), q[2] - q[0]


class _Engine:
    """Sets the quantized engine (and restores it)."""

    def __init__(self, engine: str | None):
        self.engine, self.old = engine, None

    def __enter__(self) -> None:
        if self.engine:
            self.old = torch.backends.quantized.engine
            torch.backends.quantized.engine = self.engine

    def __exit__(self, *exc: Any) -> None:
        if self.old is not None:
            torch.backends.quantized.engine = self.old


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
    shape_free = _shape_free(canonical(spec))
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
# the index of a table of timed operators: what predicts


class Index:
    """A table of timed operators (``entries``: ``{"spec", "engine", "ms"}``) indexed for
    prediction: exact keys, groups (same operator but for channel counts and sizes) and kinds."""

    def __init__(self, entries: list[dict[str, Any]]):
        self.table: dict[str, float] = {}
        self.groups: dict[str, list[tuple[float, float, tuple[int, ...]]]] = {}
        self.kinds: dict[str, list[tuple[float, float, tuple[int, ...]]]] = {}
        for e in entries:
            spec = {**e["spec"], "engine": e.get("engine")}
            eng = e.get("engine") or ""
            self.table[spec_key(spec) + "@" + eng] = float(e["ms"])
            point = (work_of(spec), float(e["ms"]), _spatial(spec))
            self.groups.setdefault(group_of(spec) + "@" + eng, []).append(point)
            self.kinds.setdefault(kind_of(spec), []).append(point)
        for d in (self.groups, self.kinds):
            for pts in d.values():
                pts.sort()


def _interpolate(points: list[tuple[float, float, tuple[int, ...]]], work: float) -> float:
    """Time (ms) at ``work`` from timed (work, ms) points of one group: the median of timed
    points of exactly this work; else linear between the two bracketing points when their
    efficiencies (ms per unit of work) agree within 1.5x; else a robust line (Theil-Sen: the
    median of the pairwise slopes, never negative, and the median intercept) through the 4
    points nearest in log work, at least a quarter of the smallest of their times. A small
    operator's time is mostly fixed cost: scaling it in proportion to the work would
    overestimate a large one many times over."""
    works = [p[0] for p in points]
    i = bisect.bisect_left(works, work)
    if i < len(points) and works[i] == work:
        same = sorted(p[1] for p in points if p[0] == work)
        return same[len(same) // 2]
    if 0 < i < len(points):
        (w0, t0, _), (w1, t1, _) = points[i - 1], points[i]
        e0, e1 = t0 / max(w0, 1e-12), t1 / max(w1, 1e-12)
        if max(e0, e1) <= 1.5 * min(e0, e1):
            return t0 + (t1 - t0) * (work - w0) / (w1 - w0)
    lw = math.log(max(work, 1e-12))
    near = sorted(points, key=lambda p: abs(math.log(max(p[0], 1e-12)) - lw))[:4]
    slopes = sorted((b[1] - a[1]) / (b[0] - a[0]) for k, a in enumerate(near) for b in near[k + 1:]
                    if b[0] != a[0])
    slope = max(0.0, statistics.median(slopes)) if slopes else 0.0
    intercept = statistics.median(t - slope * w for w, t, _ in near)
    return max(intercept + slope * work, 0.25 * min(t for _, t, _ in near))


def lookup(idx: Index, rec: dict[str, Any], kind: str) -> tuple[float, str]:
    """(time in ms, how: exact / interpolated / approximate); KeyError(kind) when unknown."""
    eng = rec.get("engine") or ""
    key = spec_key(rec) + "@" + eng
    if key in idx.table:
        return idx.table[key], "exact"
    work = work_of(rec)
    pts = idx.groups.get(group_of(rec) + "@" + eng)
    if pts:
        sp = _spatial(rec)
        same = [p for p in pts if p[2] == sp]
        # the points of the same spatial size, when at least two of them bracket the work
        inside = len(same) >= 2 and same[0][0] <= work <= same[-1][0]
        return _interpolate(same if inside else pts, work), "interpolated"
    pts = idx.kinds.get(kind)
    if pts:
        return _interpolate(pts, work), "approximate"
    raise KeyError(kind)


def predict_sums(records: list[dict[str, Any]], idx: Index) -> tuple[dict[str, float], dict[str, int], list[str]]:
    """Per calibration class, the sum (ms) of the records' predicted times; how many were
    found ``exact``, ``interpolated`` or ``approximate``; the kinds not found at all."""
    counts = {"exact": 0, "interpolated": 0, "approximate": 0}
    sums: dict[str, float] = {}
    missing: list[str] = []
    for rec in records:
        kind = kind_of(rec)
        try:
            t, how = lookup(idx, rec, kind)
        except KeyError:
            if kind not in missing:
                missing.append(kind)
            continue
        counts[how] += 1
        c = dtype_class(kind)
        sums[c] = sums.get(c, 0.0) + t
    return sums, counts, missing


# --------------------------------------------------------------------------------------------
# calibration (pure Python least squares: the board may lack numpy)

CLASSES = ("float", "half", "call")  # and int8@ENGINE per engine


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        if abs(m[c][c]) < 1e-12:
            continue
        for r in range(n):
            if r != c:
                f = m[r][c] / m[c][c]
                m[r] = [x - f * y for x, y in zip(m[r], m[c])]
    return [m[i][n] / m[i][i] if abs(m[i][i]) > 1e-12 else 0.0 for i in range(n)]


def fit_calibration(rows: list[tuple[dict[str, float], float]], ridge: float = 0.01) -> dict[str, Any]:
    """Fit ``measured = overhead + sum_c scale_c * sum_c`` (ms) by least squares, each scale
    pulled towards 1 and the overhead towards 0 (``ridge``, relative to the data's scale), on
    ``rows`` of (per-class sums, measured ms); classes absent from every row keep scale 1.
    Errors are relative: each row is weighted by 1 / measured."""
    present = sorted({c for s, _ in rows for c, v in s.items() if v > 0})
    n = len(present) + 1
    ata = [[0.0] * n for _ in range(n)]
    atb = [0.0] * n
    for sums, measured in rows:
        w = 1.0 / max(measured, 1e-6)
        x = [sums.get(c, 0.0) * w for c in present] + [w]
        y = measured * w
        for i in range(n):
            atb[i] += x[i] * y
            for j in range(n):
                ata[i][j] += x[i] * x[j]
    lam = ridge * max(1, len(rows))
    for i in range(n - 1):  # scales towards 1
        ata[i][i] += lam
        atb[i] += lam * 1.0
    ata[n - 1][n - 1] += lam * 1e-2  # the overhead towards 0, loosely
    sol = _solve(ata, atb)
    scales = {c: 1.0 for c in CLASSES}
    for c, v in zip(present, sol):
        scales[c] = max(0.2, min(5.0, v))
    return {"scales": scales, "overhead_ms": sol[-1]}


def apply_calibration(sums: dict[str, float], calibration: dict[str, Any]) -> float:
    """Calibrated whole-model time (ms) from per-class sums."""
    s = calibration.get("scales", {})
    return float(calibration.get("overhead_ms", 0.0)) + sum(float(s.get(c, 1.0)) * v for c, v in sums.items())


def _percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    if not v:
        return float("nan")
    k = (len(v) - 1) * q / 100.0
    lo, hi = int(math.floor(k)), int(math.ceil(k))
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


# --------------------------------------------------------------------------------------------
# the profile


def device_info(threads: int) -> dict[str, Any]:
    """What the profile was measured on."""
    return {"name": platform.node(), "machine": platform.machine(), "processor": platform.processor(),
            "system": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": int(threads), "cpus": os.cpu_count(),
            "quantized_engines": list(torch.backends.quantized.supported_engines),
            "quantized_engine": torch.backends.quantized.engine}


def _retag(records: list[dict[str, Any]], engine: str | None) -> list[dict[str, Any]]:
    return [{**r, "engine": engine} if r.get("engine") else r for r in records]


def run_plan(plan: dict[str, Any], *, threads: int = 1, samples: int = 7, min_sample_ms: float = 0.5,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Time the operators of ``plan`` on this machine, fit the calibration and validate it: the
    profile (a dict; see the module docstring). ``threads``: CPU threads while timing
    (restored after).

    ``plan``: ``{"engines": [...], "programs": [{"name", "records", "role"}]}``. Every program
    but the ``validate`` ones is replayed ``samples`` times with each operator timed in the
    sequence (:func:`time_in_program`): an operator's entry is its median over the programs it
    occurs in. ``calibrate`` and ``validate`` programs are also timed whole; the calibration is
    fitted on the first, its error measured on the second, whose operators never entered the
    table (they are predicted as a candidate is: exact, interpolated or by kind). Programs with
    int8 operators run under each engine of ``engines`` that this torch supports (the others are
    listed as skipped)."""
    log = log or (lambda s: None)
    t_start = time.perf_counter()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    supported = set(torch.backends.quantized.supported_engines)
    engines = [e for e in plan.get("engines", []) if e in supported]
    skipped_engines = [e for e in plan.get("engines", []) if e not in supported]
    times: dict[str, list[float]] = {}
    specs: dict[str, tuple[dict[str, Any], str | None]] = {}
    failed: dict[str, str] = {}
    wholes: list[dict[str, Any]] = []
    try:
        progs = plan["programs"]
        for n, prog in enumerate(progs):
            int8 = any(r.get("engine") for r in prog["records"])
            for engine in (engines if int8 else [None]):
                records = _retag(prog["records"], engine)
                name = prog["name"] + (f" @{engine}" if engine else "")
                try:
                    with _Engine(engine):
                        if prog.get("role") != "validate":
                            per_op = time_in_program(records, samples=samples)
                            for rec, t in zip(records, per_op):
                                key = spec_key(rec) + "@" + (engine or "")
                                times.setdefault(key, []).append(t)
                                specs.setdefault(key, (canonical(rec), engine))
                        if prog.get("role") in ("calibrate", "validate"):
                            med, iqr = time_fn(build_program(records), samples=samples,
                                               min_sample_ms=min_sample_ms, warmup=1)
                            wholes.append({"name": name, "role": prog["role"], "records": records,
                                           "measured_ms": med, "iqr_ms": iqr})
                except Exception as exc:  # a program this device cannot run: its kinds may be missing
                    failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            if (n + 1) % 10 == 0:
                log(f"timed {n + 1}/{len(progs)} models ({time.perf_counter() - t_start:.0f} s)")
    finally:
        torch.set_num_threads(old_threads)
    entries = []
    for key, ts in times.items():
        spec, engine = specs[key]
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        entries.append({"spec": spec, "engine": engine, "ms": statistics.median(ts), "iqr_ms": q[2] - q[0],
                        "n": len(ts)})
    idx = Index(entries)
    rows, programs = [], []
    for w in wholes:
        sums, counts, missing = predict_sums(w["records"], idx)
        if missing:  # a held-out model with a kind nothing else runs: not predictable
            failed[w["name"]] = "kinds never timed: " + ", ".join(missing)
            continue
        programs.append({**{k: v for k, v in w.items() if k != "records"}, "sums": sums, **counts})
        if w["role"] == "calibrate":
            rows.append((sums, w["measured_ms"]))
    calibration = fit_calibration(rows) if rows else {"scales": {}, "overhead_ms": 0.0}
    calibration["models"] = [p["name"] for p in programs if p["role"] == "calibrate"]
    val = []
    for p in programs:
        pred = apply_calibration(p["sums"], calibration)
        val.append({"name": p["name"], "role": p["role"], "measured_ms": p["measured_ms"],
                    "predicted_ms": pred, "error_pct": 100.0 * (pred - p["measured_ms"]) / p["measured_ms"],
                    "interpolated": p["interpolated"] + p["approximate"],
                    "operators": p["exact"] + p["interpolated"] + p["approximate"]})
        log(f"{p['role']} {p['name']}: measured {p['measured_ms']:.2f} ms, predicted {pred:.2f} ms")
    held = [abs(v["error_pct"]) for v in val if v["role"] == "validate"]
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "device": device_info(threads),
        "threads": int(threads),
        "engines": engines,
        "skipped_engines": skipped_engines,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": time.perf_counter() - t_start,
        "input_sizes": plan.get("input_sizes", []),
        "entries": entries,
        "failed": failed,
        "calibration": calibration,
        "validation": {
            "models": val,
            "median_error_pct": statistics.median(held) if held else None,
            "p90_error_pct": _percentile(held, 90) if held else None,
            "max_error_pct": max(held) if held else None,
        },
    }


PLAN: dict[str, Any] | None = None  # a written script sets this to its plan


def main(argv: list[str] | None = None) -> int:
    """The standalone script: ``python profile_device.py --out board.json [--threads N]``."""
    ap = argparse.ArgumentParser(description="Measure a latency profile of this device for recommender "
                                             "(copy board.json back and search with --budget 12ms@board.json).")
    ap.add_argument("--out", required=True, help="profile file to write (JSON)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads while timing (default 1)")
    ap.add_argument("--plan", help="plan JSON (default: the one in this script)")
    a = ap.parse_args(argv)
    if a.plan:
        with open(a.plan) as f:
            plan = json.load(f)
    elif PLAN is not None:
        plan = PLAN
    else:
        print("error: no plan: give --plan PLAN.json", file=sys.stderr)
        return 2
    if a.threads < 1:
        print("error: --threads must be at least 1", file=sys.stderr)
        return 2
    prof = run_plan(plan, threads=a.threads, log=lambda s: print(s, file=sys.stderr))
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(prof, f)
    os.replace(tmp, a.out)
    v = prof["validation"]
    err = v["p90_error_pct"]
    print(f"wrote {a.out}: {len(prof['entries'])} operators in {prof['seconds']:.0f} s; "
          f"validation error {'n/a' if err is None else f'{err:.1f} %'} (90th percentile, held-out models)")
    return 0
