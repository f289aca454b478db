"""Export a compressed model for deployment, each file checked against the PyTorch output.

Formats (``recommend apply --format``):

- ``pt2``: ``torch.export.export`` + ``torch.export.save`` (load with ``torch.export.load(path)
  .module()``); float recipes (fp32, fp16).
- ``onnx``: ``torch.onnx.export(model, (x,), dynamo=True)``, run in onnxruntime for the check;
  float recipes; needs the ``export`` extra (``pip install "recommender[export]"``: onnx,
  onnxscript, onnxruntime).
- ``torchscript``: ``torch.jit.trace`` (``torch.jit.load``; runs with torch alone); every recipe.

int8 recipes (FX graph mode static int8, dynamic int8) export to TorchScript only: their
quantized modules (packed weights, ``quantized::`` kernels) are not supported by ``torch.export``
nor by the ONNX exporter. The batch dimension of ``pt2`` and ``onnx`` files is dynamic.

Every exported file is loaded back and run on the same random input as the PyTorch model; the
largest absolute difference of the outputs is reported and must stay within a tolerance
(float16 gets a looser one).
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .errors import RecommenderError, UnknownNameError
from .io import atomic_write

__all__ = ["FORMATS", "ExportResult", "ExportError", "onnx_available", "default_formats", "parse_formats",
           "check_formats", "is_int8_model", "export_model"]

FORMATS = ("pt2", "onnx", "torchscript")
FILE_NAMES = {"pt2": "model.pt2", "onnx": "model.onnx", "torchscript": "model.ts"}
FLOAT_ONLY = ("pt2", "onnx")
INT8_REASON = ("int8 models export to TorchScript only: their quantized modules (packed weights, "
               "quantized:: kernels) are not supported by torch.export nor by the ONNX exporter")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
#: (absolute, relative) tolerance of the check: |exported - pytorch| <= atol + rtol * max|pytorch|
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2)}


class ExportError(RecommenderError):
    """A requested export format that cannot be produced here (missing extra, int8 recipe)."""


@dataclass
class ExportResult:
    """One exported file: ``max_abs_diff`` is the largest absolute difference of its outputs from
    the PyTorch model's on the same input; ``ok`` says whether it is within the tolerance
    (``checked_with``: what ran the file for the check)."""

    format: str
    path: str | None
    ok: bool
    max_abs_diff: float | None = None
    tolerance: float | None = None
    checked_with: str = ""
    seconds: float = 0.0
    note: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def describe(self) -> str:
        if self.path is None:
            return f"{self.format}: not exported ({self.note})"
        check = (f"max abs diff {self.max_abs_diff:.2e} vs PyTorch, run with {self.checked_with}"
                 if self.max_abs_diff is not None else "not checked")
        state = "" if self.ok else f" — CHECK FAILED (tolerance {self.tolerance:.1e})" if self.tolerance else ""
        note = f"; {self.note}" if self.note else ""
        return f"{self.format}: {self.path} ({check}{state}{note})"


def onnx_available() -> bool:
    """Whether the ``export`` extra (onnx, onnxscript, onnxruntime) is installed."""
    return all(importlib.util.find_spec(m) is not None for m in ONNX_PACKAGES)


def default_formats(int8: bool) -> list[str]:
    """What ``apply`` exports unless told: TorchScript for int8; pt2 and TorchScript for float
    recipes, plus ONNX when the ``export`` extra is installed."""
    if int8:
        return ["torchscript"]
    return ["pt2", *(["onnx"] if onnx_available() else []), "torchscript"]


def parse_formats(text: str | Sequence[str] | None) -> list[str] | None:
    """``"onnx,pt2"`` -> ``["onnx", "pt2"]``; None or ``auto`` -> None (the defaults)."""
    if text is None:
        return None
    items = [s.strip().lower() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    if not items or items == ["auto"]:
        return None
    for f in items:
        if f not in FORMATS:
            raise UnknownNameError("export format", f, FORMATS)
    return list(dict.fromkeys(items))


def check_formats(formats: Sequence[str], int8: bool) -> None:
    """Fail before any training when a requested format cannot be produced: ONNX without the
    ``export`` extra, or ``pt2``/``onnx`` for an int8 recipe."""
    if int8:
        bad = [f for f in formats if f in FLOAT_ONLY]
        if bad:
            raise ExportError(f"cannot export an int8 recipe as {', '.join(bad)}: {INT8_REASON}; "
                              "use --format torchscript")
    if "onnx" in formats and not onnx_available():
        raise ExportError(f"ONNX export needs {', '.join(ONNX_PACKAGES)} (not all installed): "
                          "pip install \"recommender[export]\"")


def is_int8_model(model: nn.Module) -> bool:
    """Whether ``model`` holds quantized (int8) modules or tensors."""
    for m in model.modules():
        if type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized",
                                          "torch.ao.nn.intrinsic.quantized")):
            return True
    return any(t.is_quantized for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def _check(result: ExportResult, ref: torch.Tensor, out: torch.Tensor, dtype: torch.dtype, with_: str) -> None:
    atol, rtol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    result.tolerance = atol + rtol * float(ref.detach().float().abs().max())
    result.max_abs_diff = _diff(ref, out)
    result.checked_with = with_
    result.ok = result.max_abs_diff <= result.tolerance


def _export_pt2(model: nn.Module, x: torch.Tensor, path: Path, ref: torch.Tensor, res: ExportResult) -> None:
    batch = ({0: torch.export.Dim.AUTO},)
    ep = torch.export.export(model, (x,), dynamic_shapes=batch)
    atomic_write(path, lambda f: torch.export.save(ep, f))
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        _check(res, ref, loaded(x), _dtype(model), "torch.export.load")


def _export_onnx(model: nn.Module, x: torch.Tensor, path: Path, ref: torch.Tensor, res: ExportResult) -> None:
    import onnxruntime as ort

    batch = ({0: torch.export.Dim.AUTO},)
    program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=batch, verbose=False)
    # The serialised proto (not onnx.save_model on a file object, which reads the file's name
    # for external data): our models are far below protobuf's 2 GB limit.
    atomic_write(path, program.model_proto.SerializeToString())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    _check(res, ref, out, _dtype(model), f"onnxruntime {ort.__version__}")


def _export_torchscript(model: nn.Module, x: torch.Tensor, path: Path, ref: torch.Tensor, res: ExportResult) -> None:
    with torch.no_grad():
        scripted = torch.jit.trace(model, x, check_trace=False)
    atomic_write(path, lambda f: torch.jit.save(scripted, f))
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        _check(res, ref, loaded(x), _dtype(model), "torch.jit.load")


_EXPORTERS = {"pt2": _export_pt2, "onnx": _export_onnx, "torchscript": _export_torchscript}


def export_model(model: nn.Module, input_size: Sequence[int], out_dir: str | Path,
                 formats: Sequence[str] | None = None, *, log: Callable[[str], None] | None = None,
                 seed: int = 0) -> list[ExportResult]:
    """Export ``model`` (in eval mode) to ``out_dir`` in ``formats`` and check each file.

    Args:
        model: the compressed model (float32, fp16-wrapped or int8).
        input_size: ``(batch, 3, H, W)`` at which the model was trained and evaluated; the export
            traces a batch of two (so the batch dimension stays dynamic) at that resolution.
        out_dir: the folder of ``model.pt2``, ``model.onnx``, ``model.ts``.
        formats: subset of :data:`FORMATS` (None: :func:`default_formats`).
        log: receives one line per format as it starts.
        seed: seeds the random check input.

    Returns:
        One :class:`ExportResult` per format, in order. A format that fails to export is reported
        with ``ok=False`` and the reason in ``note`` (the others still run); a request that cannot
        be met at all (ONNX without the extra, pt2/ONNX of an int8 model) raises
        :class:`ExportError` before anything is written.
    """
    model = model.eval()
    int8 = is_int8_model(model)
    formats = list(formats) if formats is not None else default_formats(int8)
    check_formats(formats, int8)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, c, h, w = (int(v) for v in input_size)
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(x)
    results = []
    for fmt in formats:
        path = out / FILE_NAMES[fmt]
        res = ExportResult(fmt, str(path), ok=False)
        if log:
            log(f"exporting {fmt} -> {path}")
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated in favour of torch.export (it still is what runs int8
                # FX models with torch alone), and the exporters warn about internals: the check
                # below is what tells whether the file is right.
                warnings.simplefilter("ignore")
                _EXPORTERS[fmt](model, x, path, ref, res)
        except Exception as exc:  # an exporter limitation for this model: reported, not fatal
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            res.path, res.ok = None, False
            res.note = f"{type(exc).__name__}: {first[:200]}"
            path.unlink(missing_ok=True)
        res.seconds = round(time.perf_counter() - t0, 2)
        results.append(res)
    return results
