"""Costs of an untrained structure from its tensor shapes alone, in milliseconds.

A candidate's params, MFLOPs and dense size do not depend on its weights. Built on PyTorch's
``meta`` device (tensors with a shape and no data: no memory, no initialisation) and run once on
a meta input, a network yields them without the seconds that a real build, fvcore's JIT trace
and ``torch.save`` take for a ResNet-101 (measured in ``benchmarks/structure_check.py``):

- **params**: ``numel`` of the trainable parameters (as :func:`recommender.measure.count_params`).
- **MFLOPs**: fvcore's count (multiply-accumulates), reproduced op by op on the shapes seen in
  one forward pass: each call that fvcore's default handles count (convolutions, linear layers
  and matrix products, normalisation, adaptive average pooling, nearest/bilinear upsampling,
  grid sampling) is counted with fvcore's formula; tests/test_shape_costs.py checks equality
  with fvcore on every built-in model, every preset and random points of the search spaces. A
  call fvcore counts that is not reproduced here (``einsum``) makes the count unknown (None).
- **size_mb**: ``torch.save``'s length (:func:`recommender.measure.size_mb`) less its zip
  records: the tensors' bytes and the pickle of the state dict (saved without data), a lower
  bound by 100-250 bytes per tensor (0.1 % of a ResNet-101's 163 MB, 15 % of a 0.2 MB network);
  ``size_mb_max`` adds :data:`ZIP_RECORD_MAX` bytes per tensor, an upper bound.

A family whose builder needs real data (torchvision's RegNet computes its widths with tensor
ops) cannot be built on the meta device: :func:`build_meta` returns None and the caller builds
it for real.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import RecommenderError

__all__ = ["ShapeCosts", "build_meta", "shape_costs", "count_flops_shapes"]

_MB = 1024**2
#: Most bytes ``torch.save`` spends on one tensor's zip record besides its data and pickle: the
#: local and central headers, the record's name twice, 64-byte alignment padding and its extra
#: field (222-324 bytes measured on the built-in models); with the archive's own records (version,
#: byte order, the pickle's record) in ``ZIP_FIXED_MAX``. Checked in tests/test_shape_costs.py.
ZIP_RECORD_MAX = 400
ZIP_FIXED_MAX = 2048


@dataclass
class ShapeCosts:
    """params (count), mflops (fvcore's, None when unknown), size_mb and size_mb_max (lower and
    upper bounds of the serialised state dict, MB)."""

    params: int
    mflops: float | None
    size_mb: float
    size_mb_max: float


def build_meta(build: Callable[[], nn.Module]) -> nn.Module | None:
    """``build()`` on the meta device, or None when the builder needs real data. An error of the
    recommender (an architecture that cannot be built) is raised as it is."""
    try:
        with torch.device("meta"):
            return build()
    except RecommenderError:
        raise
    except Exception:  # a builder computing with tensor data: build it for real instead
        return None


def _prod(shape: Any) -> int:
    return math.prod(int(s) for s in shape)


def _shape(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: Any = None) -> Any:
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _conv(args: tuple, kwargs: dict, out: Any) -> int:
    x, w = _shape(args[0]), _shape(_arg(args, kwargs, 1, "weight"))
    return x[0] * _prod(w) * _prod(out.shape[2:])


def _conv_transpose(args: tuple, kwargs: dict, out: Any) -> int:
    x, w = _shape(args[0]), _shape(_arg(args, kwargs, 1, "weight"))
    return x[0] * _prod(w) * _prod(x[2:])


def _linear(args: tuple, kwargs: dict, out: Any) -> int:
    return _prod(_shape(args[0])) * _shape(_arg(args, kwargs, 1, "weight"))[0]


def _addmm(args: tuple, kwargs: dict, out: Any) -> int:
    a, b = _shape(_arg(args, kwargs, 1, "mat1")), _shape(_arg(args, kwargs, 2, "mat2"))
    return a[0] * a[1] * b[1]


def _matmul(args: tuple, kwargs: dict, out: Any) -> int:
    a, b = _shape(args[0]), _shape(_arg(args, kwargs, 1, "other", kwargs.get("mat2")))
    return _prod(a) * b[-1]


def _bmm(args: tuple, kwargs: dict, out: Any) -> int:
    a, b = _shape(args[0]), _shape(_arg(args, kwargs, 1, "mat2"))
    return a[0] * a[1] * a[2] * b[-1]


def _batch_norm(args: tuple, kwargs: dict, out: Any) -> int:
    n = _prod(_shape(args[0]))
    affine = _arg(args, kwargs, 3, "weight") is not None
    if _arg(args, kwargs, 5, "training", False):
        return n * (5 if affine else 4)
    return n * (2 if affine else 1)


def _norm(weight_index: int) -> Callable[[tuple, dict, Any], int]:
    def count(args: tuple, kwargs: dict, out: Any) -> int:
        affine = _arg(args, kwargs, weight_index, "weight") is not None
        return _prod(_shape(args[0])) * (5 if affine else 4)

    return count


def _adaptive_avg_pool2d(args: tuple, kwargs: dict, out: Any) -> int:
    return _prod(_shape(args[0]))


def _interpolate(args: tuple, kwargs: dict, out: Any) -> int:
    mode = _arg(args, kwargs, 3, "mode", "nearest")
    if out.dim() != 4:  # fvcore counts the 2-d kernels only
        return 0
    return {"nearest": 1, "bilinear": 4}.get(mode, 0) * out.numel()


def _grid_sample(args: tuple, kwargs: dict, out: Any) -> int:
    return 4 * out.numel()


def _unknown(args: tuple, kwargs: dict, out: Any) -> int:
    raise _Unknown


class _Unknown(Exception):
    pass


# The Python-level functions are what a forward pass calls (and what fvcore's JIT trace records
# one aten op for); what they call inside is not seen again (the mode is off within a handler).
_HANDLERS: dict[Any, Callable[[tuple, dict, Any], int]] = {
    torch.conv1d: _conv, torch.conv2d: _conv, torch.conv3d: _conv,
    torch.conv_transpose1d: _conv_transpose, torch.conv_transpose2d: _conv_transpose,
    torch.conv_transpose3d: _conv_transpose,
    F.linear: _linear, torch.addmm: _addmm, torch.Tensor.addmm: _addmm,
    torch.matmul: _matmul, torch.Tensor.matmul: _matmul, torch.Tensor.__matmul__: _matmul,
    torch.mm: _matmul, torch.Tensor.mm: _matmul, torch.bmm: _bmm, torch.Tensor.bmm: _bmm,
    F.batch_norm: _batch_norm, F.group_norm: _norm(2), F.layer_norm: _norm(2), F.instance_norm: _norm(3),
    F.adaptive_avg_pool2d: _adaptive_avg_pool2d, F.interpolate: _interpolate, F.grid_sample: _grid_sample,
    torch.einsum: _unknown,
}


class _FlopCounter(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        handler = _HANDLERS.get(func)
        if handler is not None:
            self.total += int(handler(args, kwargs, out))
        return out


def count_flops_shapes(model: nn.Module, input_size: tuple[int, ...]) -> int | None:
    """fvcore's FLOP count (multiply-accumulates) of one eval-mode forward pass of ``model`` at
    ``input_size``, from the shapes alone; None when the forward calls an op fvcore counts that
    is not reproduced here. The model is run as it is (on its device: meta costs nothing); its
    training mode is restored."""
    device = next((t.device for t in model.parameters()), torch.device("cpu"))
    was_training = model.training
    counter = _FlopCounter()
    try:
        model.eval()
        x = torch.zeros(input_size, device=device)
        with torch.no_grad(), counter:
            model(x)
    except _Unknown:
        return None
    finally:
        model.train(was_training)
    return counter.total


def _state_bytes(model: nn.Module) -> tuple[int, int]:
    """(lower, upper) bound of ``torch.save(model.state_dict())``'s length in bytes."""
    import io

    state = model.state_dict()
    tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
    data = sum(v.numel() * v.element_size() for v in tensors)
    buf = io.BytesIO()
    torch.save({k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in state.items()}, buf)
    pickled = buf.getbuffer().nbytes  # the pickle and fixed records; meta storages hold no data
    return data + pickled - len(tensors), data + pickled + ZIP_RECORD_MAX * len(tensors) + ZIP_FIXED_MAX


def shape_costs(model: nn.Module, input_size: tuple[int, ...], flops: bool = True) -> ShapeCosts:
    """Params (count), MFLOPs (None without ``flops`` or when unknown) and tensor bytes (MB) of
    ``model``, built on any device (see the module docstring)."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    f = count_flops_shapes(model, input_size) if flops else None
    low, high = _state_bytes(model)
    return ShapeCosts(int(params), None if f is None else f / 1e6, low / _MB, high / _MB)
