"""A content-addressed cache of trained weights and their evaluation results.

An entry is a directory ``<root>/<key[:2]>/<key>/`` holding

- ``weights.pt``: ``torch.save({"key": key, "state_dict": ...})``, loaded with
  ``torch.load(weights_only=True)`` (no pickled code is ever executed);
- ``meta.json``: JSON metadata (accuracy, train result...) plus the key and the SHA-256 of
  ``weights.pt``; it is written last and marks the entry complete;
- ``<name>.npy`` / ``<name>.json``: numpy arrays (teacher logits, per-image correct vectors) and
  small JSON documents stored under the same key; each array's ``<name>.npy.json`` records its
  SHA-256, shape and dtype, checked when it is read (with the shape the reader expects).

Every file is written with :func:`recommender.io.atomic_write` (a temporary file in the same
directory moved into place with ``os.replace``), so a concurrent reader sees either the old or the new file, and
two processes training the same key simply both write a valid entry. A corrupt or partial entry
(unreadable file, checksum or key mismatch) is discarded and reported as a miss, so the caller
retrains.

The key is the SHA-256 of the canonical JSON of (base model, ArchConfig dict, protocol key, seed,
dataset identity, cache format version).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .io import atomic_write

__all__ = ["WeightsCache", "CacheResult", "cache_key", "CACHE_VERSION"]

log = logging.getLogger(__name__)
CACHE_VERSION = 1
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _arch_dict(arch: Any) -> Any:
    if arch is None:
        return None
    if hasattr(arch, "to_dict"):
        return arch.to_dict()
    return arch  # a dict or a preset name


def cache_key(model: str, arch: Any, protocol: Any, seed: int, dataset: Any) -> str:
    """SHA-256 hex of the canonical JSON of the entry's identity.

    Args:
        model: base model name (``resnet101``).
        arch: an ArchConfig (``to_dict()`` is used), a dict, a preset name or None (baseline).
        protocol: a ProxyProtocol (its ``key()`` is used) or a key string.
        seed: training seed.
        dataset: a TensorData (its ``identity``) or an identity string.
    """
    pkey = protocol.key() if hasattr(protocol, "key") else str(protocol)
    ident = getattr(dataset, "identity", dataset)
    payload = {"v": CACHE_VERSION, "model": model, "arch": _arch_dict(arch), "protocol": pkey,
               "seed": int(seed), "dataset": str(ident)}
    return hashlib.sha256(_canonical(payload).encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class CacheResult:
    """What :meth:`WeightsCache.get_or_train` returns: the model (trained or loaded), its
    metadata, whether it came from the cache, and the seconds spent."""

    model: nn.Module
    meta: dict
    hit: bool
    seconds: float


class WeightsCache:
    """Trained weights, metadata and arrays keyed by :func:`cache_key`.

    ``hits``, ``misses`` and ``discarded`` count lookups in this process.
    """

    def __init__(self, root: str | os.PathLike = "studies/cache"):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0
        self.discarded = 0

    # --- keys and paths -------------------------------------------------------------------
    @staticmethod
    def key(model: str, arch: Any, protocol: Any, seed: int, dataset: Any) -> str:
        return cache_key(model, arch, protocol, seed, dataset)

    def entry_dir(self, key: str) -> Path:
        if len(key) < 8 or not set(key) <= _NAME_OK:
            raise ValueError(f"invalid cache key {key!r}")
        return self.root / key[:2] / key

    def _file(self, key: str, name: str, suffix: str) -> Path:
        if not name or not set(name) <= _NAME_OK:
            raise ValueError(f"invalid cache entry name {name!r}")
        return self.entry_dir(key) / f"{name}{suffix}"

    # --- weights ----------------------------------------------------------------------------
    def save(self, key: str, state_dict: Mapping[str, torch.Tensor], meta: dict | None = None
             ) -> Path:
        """Store a state dict and its metadata (JSON-serialisable) under ``key``."""
        sd = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
              for k, v in state_dict.items()}
        wpath = self._file(key, "weights", ".pt")
        atomic_write(wpath, lambda f: torch.save({"key": key, "state_dict": sd}, f))
        full = dict(meta or {})
        full["_cache"] = {"key": key, "weights_sha256": _sha256_file(wpath),
                          "version": CACHE_VERSION, "saved_at": time.time()}
        self.save_json(key, "meta", full)
        return wpath

    def load(self, key: str) -> dict | None:
        """``{"state_dict": ..., "meta": ...}`` or None on a miss. A corrupt or partial entry is
        discarded (deleted) and counted as a miss."""
        d = self.entry_dir(key)
        wpath, mpath = d / "weights.pt", d / "meta.json"
        if not wpath.exists() and not mpath.exists():
            self.misses += 1
            return None
        try:
            meta = json.loads(mpath.read_text())
            info = meta.get("_cache", {})
            if info.get("key") != key:
                raise ValueError("key mismatch in meta.json")
            if info.get("weights_sha256") != _sha256_file(wpath):
                raise ValueError("checksum mismatch of weights.pt")
            blob = torch.load(wpath, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict) or blob.get("key") != key:
                raise ValueError("weights.pt is not this entry")
            sd = blob["state_dict"]
        except Exception as exc:  # unreadable, truncated, tampered, partial
            log.warning("discarding corrupt cache entry %s: %s", key[:12], exc)
            self.discard(key)
            self.misses += 1
            return None
        self.hits += 1
        return {"state_dict": sd, "meta": meta}

    def load_meta(self, key: str) -> dict | None:
        """The metadata of a complete entry without loading its weights (no checksum check)."""
        return self.load_json(key, "meta")

    def contains(self, key: str) -> bool:
        return (self.entry_dir(key) / "meta.json").exists()

    def discard(self, key: str) -> None:
        self.discarded += 1
        shutil.rmtree(self.entry_dir(key), ignore_errors=True)

    # --- side data ---------------------------------------------------------------------------
    def save_json(self, key: str, name: str, obj: Any) -> None:
        text = json.dumps(obj, sort_keys=True, indent=1, default=_json_default)
        atomic_write(self._file(key, name, ".json"), text)

    @contextlib.contextmanager
    def side_lock(self, key: str, name: str) -> Any:
        """Hold an exclusive lock on side data ``name`` of entry ``key`` (a lock file beside it),
        so that work measured once and cached (a sensitivity) is measured by one of several
        workers sharing this cache while the others wait and then read it."""
        from filelock import FileLock

        path = self._file(key, name, ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path)):
            yield

    def json_once(self, key: str, name: str, measure: Callable[[], Any], *, parse: Callable[[Any], Any],
                  dump: Callable[[Any], Any]) -> Any:
        """Side data ``name`` of entry ``key``, measured once: read back with ``parse`` when it is
        stored, else ``measure()`` and store ``dump`` of it. Under :meth:`side_lock`, so that of
        several workers sharing this cache one measures and the others wait and read; an entry
        ``parse`` rejects (damaged, an older layout) is measured again and overwritten."""
        with self.side_lock(key, name):
            stored = self.load_json(key, name)
            if stored is not None:
                try:
                    return parse(stored)
                except (KeyError, TypeError, ValueError):
                    pass
            value = measure()
            self.save_json(key, name, dump(value))
            return value

    def load_json(self, key: str, name: str) -> Any | None:
        path = self._file(key, name, ".json")
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except Exception as exc:
            log.warning("discarding corrupt cache file %s: %s", path, exc)
            with contextlib.suppress(OSError):
                path.unlink()
            return None

    def save_array(self, key: str, name: str, arr: np.ndarray | torch.Tensor) -> None:
        """Store an array under ``key`` with its checksum, shape and dtype (read back by
        :meth:`load_array`)."""
        a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
        path = atomic_write(self._file(key, name, ".npy"), lambda f: np.save(f, a, allow_pickle=False))
        atomic_write(self._file(key, name, ".npy.json"), json.dumps(
            {"sha256": _sha256_file(path), "shape": list(a.shape), "dtype": str(a.dtype)}))

    def load_array(self, key: str, name: str, shape: tuple[int | None, ...] | None = None) -> np.ndarray | None:
        """The array stored as ``name`` under ``key``, or None. An array whose checksum, shape
        or dtype differs from what was recorded, or whose shape is not ``shape`` (None: any
        length on that axis), is discarded (both files) and reported as a miss, so the caller
        computes it again."""
        path = self._file(key, name, ".npy")
        side = self._file(key, name, ".npy.json")
        if not path.exists():
            return None
        try:
            info = json.loads(side.read_text())
            if info.get("sha256") != _sha256_file(path):
                raise ValueError("checksum mismatch")
            a = np.load(path, allow_pickle=False)
            if list(a.shape) != info.get("shape") or str(a.dtype) != info.get("dtype"):
                raise ValueError("shape or dtype differs from the recorded one")
            if shape is not None and (a.ndim != len(shape)
                                      or any(w is not None and w != n for w, n in zip(shape, a.shape))):
                raise ValueError(f"shape {a.shape}, expected {tuple('*' if w is None else w for w in shape)}")
        except Exception as exc:  # unreadable, no record of it (an older cache), tampered, stale
            log.warning("discarding cache file %s: %s", path, exc)
            for f in (path, side):
                with contextlib.suppress(OSError):
                    f.unlink()
            return None
        return a

    # --- convenience ---------------------------------------------------------------------------
    def get_or_train(self, key: str, build_fn: Callable[[], nn.Module],
                     train_fn: Callable[[nn.Module], Any], *, seed: int | None = None
                     ) -> CacheResult:
        """Load the weights under ``key`` into ``build_fn()``'s model, or train and store them.

        ``train_fn(model)`` trains in place and returns the metadata to store: a dict, a
        dataclass (e.g. a TrainResult) or an object with ``to_dict()``. When ``seed`` is given,
        torch is seeded before ``build_fn`` so a miss builds the same initial weights.
        A cached state dict that does not fit the built model is discarded and retrained.
        """
        t0 = time.perf_counter()
        if seed is not None:
            torch.manual_seed(seed)
        model = build_fn()
        entry = self.load(key)
        if entry is not None:
            try:
                model.load_state_dict(entry["state_dict"])
                model.eval()
                return CacheResult(model, entry["meta"], True, time.perf_counter() - t0)
            except Exception as exc:
                log.warning("cache entry %s does not fit the model, retraining: %s", key[:12],
                            str(exc).splitlines()[0])
                self.discard(key)
                self.hits -= 1
                self.misses += 1
                if seed is not None:
                    torch.manual_seed(seed)
                model = build_fn()
        out = train_fn(model)
        meta = _to_meta(out)
        self.save(key, model.state_dict(), meta)
        return CacheResult(model, meta, False, time.perf_counter() - t0)


def _to_meta(out: Any) -> dict:
    if out is None:
        return {}
    if isinstance(out, dict):
        return json.loads(json.dumps(out, default=_json_default))
    if hasattr(out, "to_dict"):
        return _to_meta(out.to_dict())
    from dataclasses import asdict, is_dataclass

    if is_dataclass(out):
        return _to_meta(asdict(out))
    return {"result": str(out)}


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.bool_,)):
        return bool(o)
    if isinstance(o, Path):
        return str(o)
    return str(o)

