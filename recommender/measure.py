"""Costs of a model: parameters, non-zero parameters, FLOPs, size, sparse size, latency, memory.

Every function leaves the model as it found it (training mode, thread count, weights).

Units and definitions:

- **params** (count): trainable parameters of a float model (``numel`` summed over
  ``requires_grad`` parameters, the paper's count). For a quantized model, whose weights are packed
  and no longer ``nn.Parameter``, the elements of the quantized weight and bias tensors are counted
  instead (after conv-BN fusion the BN parameters are gone and the conv gains a bias, so the
  count differs slightly from the float model's).
- **nonzero params** (count): the same tensors, counting elements that are not zero. For a model
  that still carries pruning masks (``weight_orig`` + ``weight_mask``) the effective weight
  ``weight_orig * weight_mask`` is counted. Quantized weights count an element as zero when its
  integer value equals the zero point.
- **FLOPs** (count of multiply-accumulates, the paper's convention): ``fvcore`` FlopCountAnalysis
  ``.total()`` on a deep copy in eval mode with one random input of ``input_size``. int8 does not
  change the multiply-accumulate count, so for a quantized model the FLOPs are those of the float
  model it came from (pass it as ``float_model``); without it :func:`count_flops` returns ``None``.
  A half-precision model is counted on a float32 copy.
- **size_mb** (MB = bytes / 1024**2): length of ``torch.save(model.state_dict())`` in memory.
  Pruning masks still attached are serialised too; make them permanent before measuring.
- **sparse_size_mb** (MB): size of a *bitmap* sparse encoding of the state dict: each floating
  tensor is stored as the cheaper of (a) dense, ``numel * element_size`` bytes, and (b) one bit per
  element marking non-zeros plus the non-zero values, ``ceil(numel / 8) + nnz * element_size``
  bytes. Quantized tensors, integer tensors and packed parameters count at their dense size. No
  pickle overhead is included, so for a dense model it is slightly below ``size_mb``.
- **latency_ms** (milliseconds): median wall time of one forward pass at the given input size
  (batch 1 by default) on the CPU under ``torch.inference_mode`` with ``threads`` threads, timed
  with ``torch.utils.benchmark.Timer``: ``warmup`` passes first, then ``repeats`` samples, each
  the mean of ``number`` passes (``number`` chosen so that a sample lasts at least
  ``min_sample_ms``; 1 for any model slower than that). **latency_iqr_ms**: the interquartile
  range (75th - 25th percentile) of those samples: a budget limit within median +- IQR is inside
  the measurement noise (:func:`within_noise`).
- **latency_cuda_ms**, **latency_cuda_iqr_ms**: the same on a CUDA GPU (a copy of the model moved
  there; the Timer synchronises the device around each sample), measured when a GPU is present
  (``cuda_latency=None``) or asked for; None on a machine without one and for quantized (int8,
  CPU-only) models.
- **latency_ort_ms**, **latency_ort_iqr_ms**: the same in ONNX Runtime on this machine's CPU
  (:mod:`recommender.ort_latency`), when asked for (``ort_latency``); None for what it cannot
  time (int8 models, no ``export`` extra).
- **latency_predicted_ms**: the batch-1 latency *predicted* for the device of a latency profile
  (:mod:`recommender.latency_predict`), when one is given (``profile``); never mixed with the
  measured fields.
- **peak_memory_mb** (MB): estimated working set of one forward pass = bytes of the model's
  state-dict tensors (weights and buffers) + the peak of live intermediate tensors (input
  included) during the forward. The intermediate peak is tracked exactly at the ATen level with a
  ``TorchDispatchMode`` that adds each new output storage when it is created and subtracts it
  when it is freed; allocator caching and framework overhead are not included, so it is a lower
  bound of the process's real RSS increase, but deterministic and comparable between models.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import warnings
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "Costs",
    "count_params",
    "count_nonzero_params",
    "count_flops",
    "size_mb",
    "sparse_size_mb",
    "latency_ms",
    "latency_stats",
    "LatencyStats",
    "within_noise",
    "peak_memory_mb",
    "measure",
    "is_quantized",
    "model_input",
    "safe_deepcopy",
]

InputSize = tuple[int, ...]
_MB = 1024**2


# --------------------------------------------------------------------------------------------
# helpers


def is_quantized(model: nn.Module) -> bool:
    """True when the model contains quantized (int8) modules or quantized tensors."""
    for m in model.modules():
        mod = type(m).__module__
        if mod.startswith(("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
            return True
    for t in _state_tensors(model):
        if t.is_quantized:
            return True
    return False


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in list(model.parameters()) + list(model.buffers()):
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def model_input(model: nn.Module, input_size: InputSize = (1, 3, 32, 32), seed: int = 0) -> torch.Tensor:
    """A random float32 input of ``input_size`` (models made by this package take float32 input,
    including fp16 and int8 ones, which cast or quantize internally)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*input_size, generator=g)


def _flatten_state(value: Any) -> Iterator[Any]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _flatten_state(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten_state(v)
    else:
        yield value


def _state_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    try:
        sd = model.state_dict()
    except Exception:  # pragma: no cover - exotic modules
        return
    for v in sd.values():
        for t in _flatten_state(v):
            if isinstance(t, torch.Tensor):
                yield t


def _quantized_weights(model: nn.Module) -> Iterator[torch.Tensor]:
    """Weight and bias tensors of quantized modules (packed, not nn.Parameters)."""
    for m in model.modules():
        if not type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
            continue
        for attr in ("weight", "bias"):
            fn = getattr(m, attr, None)
            if not callable(fn) or isinstance(fn, nn.Module):
                continue
            try:
                t = fn()
            except Exception:
                continue
            if isinstance(t, torch.Tensor):
                yield t


def _effective_params(model: nn.Module) -> Iterator[tuple[torch.Tensor, bool]]:
    """(tensor, trainable) for each parameter, with pruning masks applied where attached."""
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if name.endswith("_orig") and hasattr(m, name[: -len("_orig")] + "_mask"):
                eff = getattr(m, name[: -len("_orig")], p)
                yield eff, p.requires_grad
            else:
                yield p, p.requires_grad


def _nonzero(t: torch.Tensor) -> int:
    if t.is_quantized:
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            return int((t.int_repr() != t.q_zero_point()).sum())
        zp = t.q_per_channel_zero_points()
        shape = [1] * t.dim()
        shape[t.q_per_channel_axis()] = -1
        return int((t.int_repr() != zp.view(shape)).sum())
    return int(torch.count_nonzero(t.detach()))


def safe_deepcopy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also works while pruning masks are attached.

    With ``torch.nn.utils.prune`` the pruned attribute (``weight``) is a non-leaf tensor that
    deepcopy refuses; it is recomputed from ``weight_orig * weight_mask`` before every forward,
    so it is swapped for a detached tensor during the copy and restored afterwards.
    """
    swapped: list[tuple[nn.Module, str, Any]] = []
    for m in model.modules():
        for name, _ in list(m.named_parameters(recurse=False)):
            if name.endswith("_orig"):
                base = name[: -len("_orig")]
                val = m.__dict__.get(base)
                if isinstance(val, torch.Tensor) and not val.is_leaf:
                    swapped.append((m, base, val))
                    m.__dict__[base] = val.detach()
    try:
        return copy.deepcopy(model)
    finally:
        for m, base, val in swapped:
            m.__dict__[base] = val


# --------------------------------------------------------------------------------------------
# counts


def count_params(model: nn.Module) -> int:
    """Trainable parameters (count). Quantized models: elements of quantized weights and biases."""
    n = sum(p.numel() for p, trainable in _effective_params(model) if trainable)
    n += sum(t.numel() for t in _quantized_weights(model))
    return int(n)


def count_nonzero_params(model: nn.Module) -> int:
    """Non-zero trainable parameters (count), pruning masks applied (see module docstring)."""
    n = sum(_nonzero(p) for p, trainable in _effective_params(model) if trainable)
    n += sum(_nonzero(t) for t in _quantized_weights(model))
    return int(n)


def count_flops(
    model: nn.Module,
    input_size: InputSize = (1, 3, 32, 32),
    *,
    float_model: nn.Module | None = None,
) -> int | None:
    """fvcore FLOPs (multiply-accumulates, count) of one forward pass in eval mode.

    Counted on a deep copy, so the model's mode and weights are untouched. A quantized model's
    FLOPs are those of ``float_model`` (the model before quantization); if it is not given,
    returns ``None``. Half-precision models are counted on a float32 copy.
    """
    if is_quantized(model):
        if float_model is None:
            return None
        model = float_model
    m = safe_deepcopy(model).float().eval()
    x = model_input(m, input_size)
    fv_logger = logging.getLogger("fvcore")
    old_level = fv_logger.level
    fv_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis

            fca = FlopCountAnalysis(m, x)
            fca.unsupported_ops_warnings(False)
            fca.uncalled_modules_warnings(False)
            fca.tracer_warnings("none")
            total = int(fca.total())
    finally:
        fv_logger.setLevel(old_level)
    return total


# --------------------------------------------------------------------------------------------
# sizes


def size_mb(model: nn.Module) -> float:
    """Serialised state dict size in MB (``torch.save`` to memory, bytes / 1024**2)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes / _MB


def _encoded_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        if value.is_quantized:
            return value.numel() * value.element_size()
        dense = value.numel() * value.element_size()
        if not value.is_floating_point() or value.numel() == 0:
            return dense
        nnz = int(torch.count_nonzero(value))
        bitmap = math.ceil(value.numel() / 8) + nnz * value.element_size()
        return min(dense, bitmap)
    if isinstance(value, (int, float, bool)) or value is None:
        return 8
    buf = io.BytesIO()
    try:
        torch.save(value, buf)
    except Exception:
        return 0
    return buf.getbuffer().nbytes


def sparse_size_mb(model: nn.Module) -> float:
    """Bitmap sparse encoding of the state dict in MB (see module docstring)."""
    total = 0
    for v in model.state_dict().values():
        for item in _flatten_state(v):
            total += _encoded_bytes(item)
    return total / _MB


# --------------------------------------------------------------------------------------------
# time and memory


def _benchmark_timer():
    """``torch.utils.benchmark.Timer``; its import pulls in ``torch.utils.cpp_extension``, which
    logs a warning about CUDA_HOME on machines without a CUDA runtime: silenced for the import
    (the logger's level is restored)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils.benchmark import Timer
    finally:
        log.setLevel(old)
    return Timer


@dataclass(frozen=True)
class LatencyStats:
    """Forward latency of one input, in milliseconds: ``median_ms``, ``iqr_ms`` (75th - 25th
    percentile), ``q1_ms``/``q3_ms``, over ``samples`` samples of ``number`` passes each, on
    ``device`` with ``threads`` CPU threads."""

    median_ms: float
    iqr_ms: float
    q1_ms: float
    q3_ms: float
    samples: int
    number: int
    device: str
    threads: int


def latency_stats(
    model: nn.Module,
    input_size: InputSize = (1, 3, 32, 32),
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    device: str = "cpu",
    min_sample_ms: float = 1.0,
) -> LatencyStats:
    """Median and IQR of the forward latency (ms) at ``input_size`` on ``device`` (``cpu`` or
    ``cuda``) with ``threads`` CPU threads (see the module docstring). The model is left as it
    was (mode, device, thread count; a quantized model's weights are packed again first, with
    identical outputs); on CUDA a copy runs."""
    Timer = _benchmark_timer()
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA latency asked for but no CUDA GPU is available")
    was_training = model.training
    net = model if device == "cpu" else safe_deepcopy(model).to(device)
    net.eval()
    x = model_input(net, input_size).to(device)
    if device == "cpu" and is_quantized(net):
        from .compress.quantize import repack_weights

        # an x86 int8 conv keeps what its first call at an input shape set up, the thread count
        # included: first called at batch 1 on 2 threads and timed on 1, a sensitivity-pruned
        # ResNet-101 ran 90-140 ms against 12-25 ms. Packed again (outputs identical), the
        # warm-up below is that first call, as in a freshly loaded model.
        repack_weights(net, getattr(net, "_quant_engine", None) or torch.backends.quantized.engine)
    try:
        with torch.inference_mode():
            timer = Timer(stmt="net(x)", globals={"net": net, "x": x},
                          num_threads=max(1, int(threads)))
            first = timer.timeit(max(1, warmup)).median  # warm-up (and a first estimate)
            number = max(1, math.ceil(min_sample_ms / 1000.0 / max(first, 1e-9)))
            samples = sorted(timer.timeit(number).median for _ in range(repeats))
    finally:
        model.train(was_training)
    q1, med, q3 = (float(v) * 1000.0 for v in np.percentile(samples, [25, 50, 75]))
    return LatencyStats(median_ms=med, iqr_ms=q3 - q1, q1_ms=q1, q3_ms=q3, samples=len(samples),
                        number=number, device=device, threads=max(1, int(threads)))


def latency_ms(
    model: nn.Module,
    input_size: InputSize = (1, 3, 32, 32),
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    device: str = "cpu",
) -> float:
    """Median forward latency in milliseconds (:func:`latency_stats`)."""
    return latency_stats(model, input_size, threads, repeats, warmup, device).median_ms


def within_noise(limit_ms: float, median_ms: float | None, iqr_ms: float | None) -> bool:
    """Whether a latency limit lies within median +- IQR of a measurement, i.e. whether meeting
    or missing it is inside the timing noise (False when nothing was measured)."""
    if median_ms is None or iqr_ms is None:
        return False
    return abs(float(limit_ms) - float(median_ms)) <= float(iqr_ms)


class _LiveTensorTracker(TorchDispatchMode):
    """Tracks bytes of storages created by ATen ops while they are alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        try:
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
        except Exception:  # quantized / opaque tensors without a plain storage
            try:
                ptr, nbytes = id(t), t.numel() * t.element_size()
            except Exception:
                return
        if ptr in self.live or nbytes == 0:
            return
        self.live[ptr] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(t, self._free, ptr)

    def _free(self, ptr: int) -> None:
        self.current -= self.live.pop(ptr, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def peak_memory_mb(model: nn.Module, input_size: InputSize = (1, 3, 32, 32)) -> float:
    """Estimated peak memory of one forward pass in MB: weights + peak live activations."""
    weights = sum(t.numel() * t.element_size() for t in _state_tensors(model))
    was_training = model.training
    model.eval()
    x = model_input(model, input_size)
    tracker = _LiveTensorTracker()
    try:
        with torch.inference_mode():
            tracker.add(x)
            with tracker:
                out = model(x)
            del out
    finally:
        model.train(was_training)
    return (weights + tracker.peak) / _MB


# --------------------------------------------------------------------------------------------
# all together


@dataclass
class Costs:
    """Costs of a model. Units: counts, MFLOPs (10**6 multiply-accumulates), MB (bytes / 1024**2),
    milliseconds. ``mflops`` is None for a quantized model measured without its float model;
    ``latency_ms`` (CPU median) and ``latency_iqr_ms`` (its interquartile range) are None when
    latency was not measured; ``latency_cuda_ms``/``latency_cuda_iqr_ms`` likewise on a CUDA GPU
    (None without one)."""

    params: int
    nonzero_params: int
    mflops: float | None
    size_mb: float
    sparse_size_mb: float
    latency_ms: float | None
    peak_memory_mb: float
    latency_iqr_ms: float | None = None
    latency_cuda_ms: float | None = None
    latency_cuda_iqr_ms: float | None = None
    latency_ort_ms: float | None = None
    latency_ort_iqr_ms: float | None = None
    latency_predicted_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure(
    model: nn.Module,
    input_size: InputSize = (1, 3, 32, 32),
    latency: bool = True,
    *,
    float_model: nn.Module | None = None,
    threads: int = 1,
    repeats: int = 20,
    warmup: int = 3,
    cuda_latency: bool | None = None,
    ort_latency: bool = False,
    profile: Any = None,
) -> Costs:
    """Measure every cost of ``model`` (see the module docstring for definitions and units).

    ``float_model``: for a quantized model, the float model whose FLOPs it inherits.
    ``cuda_latency``: also time the model on a CUDA GPU (None: when ``latency`` and a GPU is
    present; quantized models are never timed there).
    ``ort_latency``: also time it in ONNX Runtime (``latency_ort_ms``).
    ``profile``: a :class:`recommender.latency_profile.LatencyProfile`: also predict its latency
    on that device (``latency_predicted_ms``; a kind of operator the profile lacks is a
    :class:`recommender.errors.ProfileError`).
    """
    flops = count_flops(model, input_size, float_model=float_model)
    cpu = latency_stats(model, input_size, threads=threads, repeats=repeats, warmup=warmup) \
        if latency else None
    if cuda_latency is None:
        cuda_latency = latency and torch.cuda.is_available()
    gpu = None
    if cuda_latency and not is_quantized(model):
        gpu = latency_stats(model, input_size, threads=threads, repeats=repeats, warmup=warmup,
                            device="cuda")
    ort = None
    if ort_latency:
        from .ort_latency import ort_latency_stats

        ort = ort_latency_stats(model, input_size, threads=threads, repeats=repeats, warmup=warmup)
    predicted = None
    if profile is not None:
        from .latency_predict import predict_latency

        predicted = predict_latency(model, profile, input_size).ms
    return Costs(
        params=count_params(model),
        nonzero_params=count_nonzero_params(model),
        mflops=None if flops is None else flops / 1e6,
        size_mb=size_mb(model),
        sparse_size_mb=sparse_size_mb(model),
        latency_ms=cpu.median_ms if cpu else None,
        peak_memory_mb=peak_memory_mb(model, input_size),
        latency_iqr_ms=cpu.iqr_ms if cpu else None,
        latency_cuda_ms=gpu.median_ms if gpu else None,
        latency_cuda_iqr_ms=gpu.iqr_ms if gpu else None,
        latency_ort_ms=ort.median_ms if ort else None,
        latency_ort_iqr_ms=ort.iqr_ms if ort else None,
        latency_predicted_ms=predicted,
    )
