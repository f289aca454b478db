"""Compression: registered pruning and quantization methods, and the prune-then-quantize pipeline.

Methods (see :mod:`recommender.compress.methods`): ``none``, ``unstructured-l1`` (the paper),
``structured-channel`` (torch-pruning); ``fp32``, ``fp16``, ``int8-dynamic``, ``int8-static``.
Names are imported lazily so that ``recommender.recipe`` can use the method registry without a
cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "apply_pruning": "prune", "PruneReport": "prune", "NoPruning": "prune",
    "UnstructuredL1Config": "prune", "StructuredChannelConfig": "prune",
    "apply_quantization": "quantize", "QuantReport": "quantize", "QuantBackend": "quantize",
    "get_backend": "quantize", "list_backends": "quantize", "register_backend": "quantize",
    "Fp32Config": "quantize", "Fp16Config": "quantize", "Int8DynamicConfig": "quantize",
    "Int8StaticConfig": "quantize",
    "compress": "pipeline", "CompressReport": "pipeline",
    "save_state": "checkpoint", "load_state": "checkpoint", "load_into": "checkpoint",
    "register_method": "methods", "get_method": "methods", "list_methods": "methods",
    "make_config": "methods", "MethodConfig": "methods", "CompressionMethod": "methods",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
