"""Save and load model state dicts safely.

``save_state(path, state_dict, meta=None)`` writes ``{"state_dict": ..., "meta": ...}`` with
``torch.save`` (atomically, with :func:`recommender.io.atomic_write`). ``load_state(path)`` reads it
back with ``torch.load(..., weights_only=True)`` (no arbitrary code runs) and returns
``(state_dict, meta)``. A missing, truncated, corrupt or foreign file raises
:class:`recommender.errors.CheckpointError` with a one-line message.

Quantized state dicts (int8 models) contain packed parameters that ``weights_only`` loading may
refuse; store the float state dict plus the recipe and re-apply the quantization instead.
"""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..io import atomic_write

__all__ = ["save_state", "load_state", "load_into", "load_checked", "load_matching", "file_digest", "check_file"]

_FORMAT = "recommender-state-v1"


def save_state(path: str | Path, state_dict: dict[str, Any] | nn.Module, meta: dict[str, Any] | None = None) -> Path:
    """Write a state dict (or a module's) and JSON-like ``meta`` to ``path``; returns the path."""
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    p = Path(path)
    payload = {"format": _FORMAT, "state_dict": dict(state_dict), "meta": dict(meta or {})}
    atomic_write(p, lambda fh: torch.save(payload, fh))
    return p


def load_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read ``(state_dict, meta)`` written by :func:`save_state` (or a bare state dict)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if not zipfile.is_zipfile(p):  # a plain pickle or another format: torch.load would not say so
        raise CheckpointError(f"checkpoint {p} is not a PyTorch weights file (torch.save's zip format); "
                              "save the state dict with torch.save")
    try:
        with warnings.catch_warnings():  # torch warns (with its own path) about legacy files first
            warnings.simplefilter("ignore")
            data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors, zip errors, EOF, weights_only refusals
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {p} is corrupt or not a weights file: {first[:160]}") from None
    if isinstance(data, dict) and data.get("format") == _FORMAT:
        sd, meta = data.get("state_dict"), data.get("meta") or {}
    elif isinstance(data, dict) and all(isinstance(k, str) for k in data):
        sd, meta = data, {}
    else:
        raise CheckpointError(f"checkpoint {p} does not contain a state dict")
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {p} does not contain a state dict of tensors")
    for k, v in sd.items():
        why = _unusable(v)
        if why:
            raise CheckpointError(f"checkpoint {p}: tensor {k} is {why}; weights must be dense CPU tensors of "
                                  "float32, float16, bfloat16 or float64 (integers for counters)")
    return sd, meta


#: Tensor dtypes a weights file may hold: floats a model computes with, integers and booleans for
#: counters and masks (float8 and complex tensors are not weights of these networks).
_DTYPES = {torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool}


def _unusable(t: torch.Tensor) -> str:
    """Why ``t`` cannot be a weight ('' when it can): no data (meta), sparse, another dtype."""
    if t.is_meta or t.device.type != "cpu":
        return f"on the {t.device.type} device (it holds no values)" if t.is_meta else f"on {t.device}"
    if t.layout != torch.strided:
        return f"sparse ({t.layout})"
    if t.is_quantized:
        return "quantized"
    if t.dtype not in _DTYPES:
        return f"of dtype {t.dtype}"
    return ""


def load_into(model: nn.Module, path: str | Path, strict: bool = True) -> dict[str, Any]:
    """Load a checkpoint into ``model``; mismatched keys or shapes -> CheckpointError. Returns meta."""
    sd, meta = load_state(path)
    try:
        model.load_state_dict(sd, strict=strict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(f"checkpoint {Path(path)} does not fit the model: {detail[:200]}") from None
    return meta


def file_digest(path: str | Path) -> str:
    """16 hex of the sha256 of a file's bytes (a checkpoint's identity in cache keys)."""
    p = Path(path)
    h = hashlib.sha256()
    try:
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {p}: {exc.strerror}") from None
    return h.hexdigest()[:16]


def _check_finite(sd: dict[str, Any], p: Path) -> None:
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {p} has non-finite (NaN/inf) values in {len(bad)} tensor(s), "
                              f"e.g. {bad[0]}: it is not a trained model")


def check_file(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint or weights file and check that its values are finite, without a model
    (a CLI checks ``--checkpoint``/``--weights`` before any work); returns its state dict."""
    p = Path(path)
    sd, _ = load_state(p)
    _check_finite(sd, p)
    return sd


def load_checked(model: nn.Module, path: str | Path, what: str = "the model") -> dict[str, Any]:
    """Load a trained checkpoint that must fit ``model`` exactly and hold finite values; any
    problem is a one-line :class:`CheckpointError` naming ``what`` it should fit. Returns meta."""
    p = Path(path)
    sd, meta = load_state(p)
    _check_finite(sd, p)
    try:
        model.load_state_dict(sd)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {p} does not fit {what}: {str(exc).strip().splitlines()[0][:200]}") from None
    return meta


def load_matching(model: nn.Module, path: str | Path) -> list[str]:
    """Load initial weights where names and shapes match (e.g. ImageNet weights into a model with
    another class count); returns the model's tensors left as initialised. No tensor in common is
    a :class:`CheckpointError`."""
    p = Path(path)
    sd, _ = load_state(p)
    _check_finite(sd, p)
    own = model.state_dict()
    take = {k: v for k, v in sd.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not take:
        raise CheckpointError(f"weights {p} share no tensor (name and shape) with the model")
    model.load_state_dict(take, strict=False)
    return [k for k in own if k not in take and not k.endswith("num_batches_tracked")]
