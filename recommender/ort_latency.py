"""Latency in ONNX Runtime on this machine's CPU (the ``12ms-ort`` budget).

The model is exported as :mod:`recommender.export` exports it (``torch.onnx.export(...,
dynamo=True)``), loaded into an ``onnxruntime.InferenceSession`` (CPU provider, all graph
optimisations, ``threads`` intra-op threads, one inter-op thread) and timed at batch 1:
``warmup`` runs, then ``repeats`` samples, each the mean of enough runs to last
``min_sample_ms``; the median and the interquartile range in ms, as
:func:`recommender.measure.latency_stats` reports PyTorch's.

Recipes it cannot time, said plainly (:func:`ort_unsupported`): int8 FX and dynamic models
(packed weights and ``quantized::`` kernels, which the ONNX exporter does not support), and
any model when the ``export`` extra (onnx, onnxscript, onnxruntime) is not installed. Their
``latency_ort_ms`` is None, so a ``12ms-ort`` budget counts them over the limit: never within
budget by default.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import statistics
import time
import warnings

import torch
from torch import nn

from .export import INT8_REASON, is_int8_model, onnx_available
from .measure import LatencyStats, model_input

__all__ = ["ort_unsupported", "ort_latency_stats"]


def ort_unsupported(model: nn.Module) -> str | None:
    """Why ONNX Runtime cannot time ``model`` here, or None when it can."""
    if not onnx_available():
        return "ONNX Runtime is not installed (pip install -e \".[export]\")"
    if is_int8_model(model):
        return INT8_REASON
    return None


@contextlib.contextmanager
def _quiet_export():
    """The exporter's progress prints and warnings, silenced for one export (restored)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def ort_latency_stats(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32), threads: int = 1,
                      repeats: int = 20, warmup: int = 3, min_sample_ms: float = 1.0) -> LatencyStats | None:
    """Median and IQR (ms) of one ONNX Runtime run of ``model`` at ``input_size``; None when
    :func:`ort_unsupported` gives a reason. The model is left as it was."""
    if ort_unsupported(model) is not None:
        return None
    import onnxruntime as ort

    was_training = model.training
    model.eval()
    x = model_input(model, input_size)
    try:
        with _quiet_export():
            program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
        proto = program.model_proto.SerializeToString()
    finally:
        model.train(was_training)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(proto, sess_options=opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        session.run(None, feed)
    first = (time.perf_counter() - t0) / max(1, warmup)
    number = max(1, math.ceil(min_sample_ms / 1000.0 / max(first, 1e-9)))
    samples = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        for _ in range(number):
            session.run(None, feed)
        samples.append((time.perf_counter() - t0) / number * 1000.0)
    q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
    return LatencyStats(median_ms=statistics.median(samples), iqr_ms=q[2] - q[0], q1_ms=q[0], q3_ms=q[2],
                        samples=len(samples), number=number, device="cpu/onnxruntime",
                        threads=max(1, int(threads)))
