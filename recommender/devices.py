"""Where and how tensors run: device, CPU threads, mixed precision, memory format.

- :func:`available_cpus`: the CPUs this process may use: ``OMP_NUM_THREADS`` when set (the
  convention torch itself follows), else the CPU affinity mask (``os.sched_getaffinity``: a
  container or ``taskset`` limit), never ``os.cpu_count()`` (the whole machine).
- :func:`resolve_device`: ``auto`` is ``cuda`` when a GPU is present, else ``cpu``; asking for
  ``cuda`` without one is a one-line :class:`~recommender.errors.RecommenderError`.
- :class:`Execution`: the execution choices of one training or evaluation (device, autocast
  dtype, channels_last, torch.compile), resolved from a protocol; none of them changes what a
  protocol converges to, so none is part of a protocol's cache key.

Measured choices (``benchmarks/proxy_cost.py``, 2-core Zen 3 CPU, no AVX-512/bf16 hardware):
mixed precision and channels_last are used on CUDA only (``auto``): on this CPU bf16 autocast ran
at 0.02-0.32x the float32 speed, and channels_last at 0.8-1.5x depending on the model; it also
changes the float rounding, so a per-model timing probe would make a run's numbers depend on the
machine's load. ``torch.compile`` took 291 s for paper-resnet101-11 and gave no faster step.

On an H100 at the rungs' input sizes (8-32 px, batch 64) a training step is bound by kernel
launches, not arithmetic: bf16 autocast ran at 0.64-0.97x the float32 speed, channels_last at
0.74-1.08x and both together at 0.69-1.00x (ResNet-101, presets 11 and 13, ``proxy_cost.py
--device cuda``). So ``auto`` keeps float32, contiguous, for inputs of at most
:data:`SMALL_INPUT_PX` and uses mixed precision and channels_last (tensor cores) above it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import RecommenderError

__all__ = ["available_cpus", "resolve_device", "Execution", "DEVICES", "PRECISIONS", "SMALL_INPUT_PX", "synchronize"]

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TOGGLES = ("auto", "on", "off")
#: Inputs of at most this many px run float32, contiguous on CUDA under ``auto`` (see above).
SMALL_INPUT_PX = 32


def available_cpus() -> int:
    """CPU threads this process should use: ``OMP_NUM_THREADS`` if set to a positive integer,
    else the size of the affinity mask, else ``os.cpu_count()`` (platforms without affinity)."""
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return int(omp)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS, Windows
        return os.cpu_count() or 1


def synchronize(device: str) -> None:
    """Wait for the device's queued work (a no-op on a CPU): timings read around it are real."""
    if device == "cuda":
        torch.cuda.synchronize()


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is present else ``cpu``; ``cuda`` without a GPU raises."""
    if name not in DEVICES:
        raise RecommenderError(f"unknown device {name!r}; valid: {', '.join(DEVICES)}")
    if name == "auto":
        return "cuda" if cuda_available() else "cpu"
    if name == "cuda" and not cuda_available():
        raise RecommenderError("--device cuda was asked for but no CUDA GPU is available "
                               "(torch.cuda.is_available() is False); use --device cpu or auto")
    return name


@dataclass(frozen=True)
class Execution:
    """How a training or evaluation runs.

    Args:
        device: ``cpu`` or ``cuda`` (resolved).
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) or None (float32).
        channels_last: convert model and inputs to ``torch.channels_last``.
        compile: wrap the model with ``torch.compile`` for training.
    """

    device: str = "cpu"
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    compile: bool = False

    @classmethod
    def resolve(cls, device: str = "auto", precision: str = "auto", channels_last: str = "auto",
                compile: bool = False, max_input_px: int | None = None) -> Execution:
        """Resolve protocol settings. On a CUDA GPU, for inputs larger than
        :data:`SMALL_INPUT_PX` (or of unknown size: ``max_input_px`` None), ``auto`` precision is
        bf16 where supported (else fp16 with loss scaling) and ``auto`` channels_last is on; for
        inputs of at most that size, and on a CPU, both stay float32, contiguous (see the module
        docstring for the measurements)."""
        dev = resolve_device(device)
        fast = dev == "cuda" and (max_input_px is None or max_input_px > SMALL_INPUT_PX)
        if precision not in PRECISIONS:
            raise RecommenderError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        if channels_last not in TOGGLES:
            raise RecommenderError(f"channels_last must be one of {', '.join(TOGGLES)}")
        if precision == "auto":
            if fast:
                precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
            else:
                precision = "fp32"
        amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        cl = fast if channels_last == "auto" else channels_last == "on"
        return cls(device=dev, amp_dtype=amp, channels_last=cl, compile=bool(compile))

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def needs_scaler(self) -> bool:
        """fp16 on CUDA needs loss scaling (bf16 has float32's range and does not)."""
        return self.device == "cuda" and self.amp_dtype == torch.float16

    def autocast(self):
        """Autocast context for forward passes (a no-op for float32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.amp_dtype)

    def engine_flags(self):
        """cuDNN settings for the block, restored afterwards: deterministic algorithms, no
        benchmarking (its algorithm choice depends on timing, hence on load). A no-op on a CPU."""
        if self.device != "cuda":
            return contextlib.nullcontext()
        cudnn = torch.backends.cudnn
        return cudnn.flags(enabled=cudnn.enabled, benchmark=False, deterministic=True,
                           allow_tf32=cudnn.allow_tf32)

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """Move ``model`` to the device (and memory format) in place; returns it."""
        model.to(self.torch_device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def release_model(self, model: nn.Module) -> nn.Module:
        """Back to the CPU in the default memory format (pruning, quantization and saving
        expect it)."""
        if self.channels_last:
            model.to(memory_format=torch.contiguous_format)
        if self.device != "cpu":
            model.to("cpu")
        _refresh_pruned_weights(model)
        return model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """A batch on the device, in the memory format."""
        x = x.to(self.torch_device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def _refresh_pruned_weights(model: nn.Module) -> None:
    """Recompute ``weight = weight_orig * weight_mask`` on modules that ``torch.nn.utils.prune``
    reparametrised. The hook sets that attribute only in ``forward``, so after training it is one
    optimizer step stale and still on the training device in its memory format (a channels_last
    CUDA tensor broke the next global pruning round)."""
    from torch.nn.utils import prune as tprune

    for m in model.modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, tprune.BasePruningMethod):
                setattr(m, hook._tensor_name, hook.apply_mask(m))
