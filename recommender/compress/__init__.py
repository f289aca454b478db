"""Compression: pruning (unstructured L1 as in the paper, structured channels with torch-pruning)
and quantization (int8 static/dynamic, fp16), and the prune-then-quantize pipeline."""

from .checkpoint import load_into, load_state, save_state
from .pipeline import CompressReport, compress
from .prune import PruneReport, apply_pruning
from .quantize import QuantBackend, QuantReport, apply_quantization, get_backend, list_backends, register_backend

__all__ = [
    "apply_pruning",
    "PruneReport",
    "apply_quantization",
    "QuantReport",
    "QuantBackend",
    "get_backend",
    "list_backends",
    "register_backend",
    "compress",
    "CompressReport",
    "save_state",
    "load_state",
    "load_into",
]
