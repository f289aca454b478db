"""Datasets: one interface (:class:`ImageData`), two storages, a registry of specs.

``load_dataset(spec)`` returns an :class:`ImageData`: int64 labels, a seeded stratified
train/validation split, per-channel normalisation constants, an ``identity`` hash used in cache
keys, and batches (``train_batches``, ``val_batches``, ``subset``) of normalised float images.
The rest of the code never needs to know which storage holds the images:

- :class:`TensorData` (in memory): uint8 ``(N, 3, H, W)`` tensors at the native resolution.
  Small data (digits, CIFAR, image folders whose decoded size fits ``memory_limit_mb``).
- :class:`~recommender.streaming.StreamingData` (streamed): images decoded on demand by
  ``torch.utils.data.DataLoader`` worker processes (image folders too large for memory, and
  ``(train, val)`` pairs of ``torch.utils.data.Dataset``, see :func:`from_datasets`).

Both give the same batches for the same images: the epoch order, the augmentation (random crop
and flip at native resolution, drawn from the caller's generator in the main process) and the
normalise + resize are the same code. Un-augmented batches at a resolution come from a tensor
prepared once per (dataset, split, resolution) (:meth:`ImageData.prepared`), so a proxy
training neither re-normalises nor re-resizes (nor, streamed, re-decodes) every epoch.

Registered specs:

- ``digits`` (default, offline): scikit-learn's 1,797 handwritten digits, 8x8 grey, replicated to
  three channels; values 0..16 scaled to 0..255. Split: ``val_fraction`` of each class.
- ``cifar10`` / ``cifar100``: torchvision's datasets under ``data_dir``; the official test split is
  the validation split (as in the paper); ``val_fraction`` is ignored. Downloaded only when
  ``download=True``.
- ``imagefolder:PATH``: any torchvision ``ImageFolder`` tree (``PATH/<class>/<image>``), scanned
  safely (symbolic-link loops skipped, files reached twice kept once: see
  :mod:`recommender.imagefolder`), images decoded straight to a square ``image_size`` (default:
  their own size when they are all the same square size of at most ``max_native_size`` = 64 px,
  else ``default_image_size`` = 32). Split as for ``digits``; a split without validation images is
  an error. Held in memory when ``N * 3 * image_size**2`` bytes fit ``memory_limit_mb``, else
  streamed (``in_memory`` forces either). Its identity hashes the files (relative paths, sizes,
  first and last 4 KiB), the image size and the split, the same for both storages.
- ``python:NAME@ID``: a dataset object registered with :func:`register_dataset` (what the API
  does with a :class:`ImageData` or a ``(train, val)`` pair passed as ``dataset``).

Subsets (``ImageData.subset``) are stratified prefixes of a seeded order, so a smaller subset is
contained in a larger one and does not depend on the training seed: the baseline and every
candidate of a study are evaluated on the same validation images.
"""

from __future__ import annotations

import abc
import functools
import hashlib
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DatasetError, UnknownNameError

__all__ = [
    "ImageData",
    "TensorData",
    "from_datasets",
    "register_dataset",
    "load_dataset",
    "list_datasets",
    "stratified_split",
    "stratified_order",
    "random_crop_flip",
    "to_input",
    "DATASETS",
]

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagefolder:PATH")

# Defaults of the image-folder loader (named parameters of load_dataset).
MEMORY_LIMIT_MB = 2048.0   # decoded uint8 images held in memory up to this size, else streamed
MAX_NATIVE_SIZE = 64       # a common square native size up to this is kept ...
DEFAULT_IMAGE_SIZE = 32    # ... else images are resized to this
STATS_IMAGES = 10_000      # mean/std from the first this-many training images

# Known normalisation constants (the paper's continuation, section 5 of paper/variants.md).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


class ImageData(abc.ABC):
    """The interface every dataset offers, whether held in memory or streamed from disk.

    Attributes (all implementations): ``name``; ``train_y``, ``val_y`` (int64 label tensors in
    the stored order, always in memory); ``num_classes``; ``classes``; ``native_resolution`` (px
    side of the stored or decoded images); ``mean``, ``std`` (per-channel constants for images
    scaled to [0, 1]); ``crop_padding`` (px at native resolution); ``hflip``; ``identity`` (hex
    hash, part of every cache key); ``split`` (how the split was made); ``notes`` (what the
    loader skipped or chose, for the user); ``prepared_cache_mb`` (see :meth:`prepared`).

    Implementations provide :meth:`_subset` and :meth:`_uint8_batches`; batching, normalisation,
    resizing, augmentation and the prepared-tensor cache are shared, so both storages give the
    same batches for the same images and generator.
    """

    name: str
    train_y: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    classes: tuple[str, ...]
    native_resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_padding: int
    hflip: bool
    identity: str
    split: dict
    notes: tuple[str, ...]
    prepared_cache_mb: float
    storage: str = "memory"

    # --- to implement --------------------------------------------------------------------
    @abc.abstractmethod
    def _subset(self, train_size: int, val_size: int) -> ImageData:
        """A new dataset holding the first ``train_size`` / ``val_size`` images."""

    @abc.abstractmethod
    def _uint8_batches(self, split: str, index_batches: list[torch.Tensor]
                       ) -> Iterator[torch.Tensor]:
        """For each tensor of positions (in the stored order of ``split``: ``train`` or
        ``val``), the uint8 images ``(B, 3, H, W)`` at the native resolution, in order."""

    # --- shared ----------------------------------------------------------------------------
    @property
    def n_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def n_val(self) -> int:
        return int(self.val_y.shape[0])

    def describe(self) -> str:
        notes = f"; {'; '.join(self.notes)}" if self.notes else ""
        return (f"{self.name}: {self.n_train} train / {self.n_val} val images, "
                f"{self.num_classes} classes, {self.native_resolution}px, "
                f"{'in memory' if self.storage == 'memory' else 'streamed'}{notes}")

    def _memo(self) -> dict:
        memo = self.__dict__.get("_memo_dict")
        if memo is None:
            memo = {"subsets": {}, "prepared": _PreparedCache(self.prepared_cache_mb)}
            object.__setattr__(self, "_memo_dict", memo)
        return memo

    def subset(self, train_size: int | None = None, val_size: int | None = None) -> ImageData:
        """Stratified prefixes: the first ``train_size`` / ``val_size`` images (None or 0 = all).

        The stored order is already a seeded stratified interleaving (see ``stratified_order``),
        so a prefix keeps the class proportions and a smaller subset is part of a larger one.
        The same sizes give the same object (and its prepared tensors) on every call.
        """
        ts = min(int(train_size), self.n_train) if train_size else self.n_train
        vs = min(int(val_size), self.n_val) if val_size else self.n_val
        if (ts, vs) == (self.n_train, self.n_val):
            return self
        memo = self._memo()
        sub = memo["subsets"].get((ts, vs))
        if sub is None:
            sub = self._subset(ts, vs)
            # subsets share the parent's prepared-tensor cache (and its memory bound)
            object.__setattr__(sub, "_memo_dict", {"subsets": {}, "prepared": memo["prepared"]})
            memo["subsets"][(ts, vs)] = sub
        return sub

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 255] float) images -> float32 normalised with this dataset's mean/std."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        # one new tensor, normalised in place (large batches: no float temporaries)
        return x.to(torch.float32, copy=True).sub_(mean).div_(std)

    def prepared(self, split: str, resolution: int | None = None) -> torch.Tensor | None:
        """The whole ``split`` (``train`` or ``val``) normalised and resized to ``resolution``
        as one float32 tensor, built once (one pass over the images) and kept while the
        prepared tensors of this dataset and its subsets stay under ``prepared_cache_mb``
        (least recently used dropped first); None when it would not fit. Un-augmented batches
        are then slices of it instead of a normalise + resize per batch."""
        n = self.n_train if split == "train" else self.n_val
        res = int(resolution or self.native_resolution)
        cache: _PreparedCache = self._memo()["prepared"]
        key = (self.identity, split, res)
        hit = cache.get(key)
        if hit is not None or not cache.fits(n * 3 * res * res * 4):
            return hit
        out = torch.empty((n, 3, res, res), dtype=torch.float32)
        chunks = [torch.arange(s, min(s + _PREPARE_CHUNK, n)) for s in range(0, n, _PREPARE_CHUNK)]
        for idx, x in zip(chunks, self._uint8_batches(split, chunks)):
            out[idx[0]:idx[-1] + 1] = to_input(self, x, res)
        cache.put(key, out)
        return out

    def train_batches(self, batch_size: int, resolution: int | None = None, *,
                      augment: bool = False, shuffle: bool = True,
                      generator: torch.Generator | None = None, drop_last: bool = False,
                      with_index: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """One epoch of ``(x, y)`` (or ``(x, y, idx)``) normalised float batches.

        Augmentation (random crop with zero padding ``crop_padding`` and, where ``hflip``, a
        horizontal flip) is applied at the native resolution, before the resize to ``resolution``.
        Without augmentation the batches are slices of :meth:`prepared` when it fits.
        """
        n = self.n_train
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - (n % batch_size) if drop_last and n >= batch_size else n
        idxs = [order[start:start + batch_size] for start in range(0, stop, batch_size)]
        ready = None if augment else self.prepared("train", resolution)
        if ready is not None:
            for idx in idxs:
                yield (ready[idx], self.train_y[idx], idx) if with_index else \
                    (ready[idx], self.train_y[idx])
            return
        for idx, x in zip(idxs, self._uint8_batches("train", idxs)):
            if augment:
                x = random_crop_flip(x, self.crop_padding, self.hflip, generator)
            x = to_input(self, x, resolution)
            yield (x, self.train_y[idx], idx) if with_index else (x, self.train_y[idx])

    def val_batches(self, batch_size: int, resolution: int | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The validation split in its stored order, normalised, at ``resolution``."""
        ready = self.prepared("val", resolution)
        if ready is not None:
            for start in range(0, self.n_val, batch_size):
                yield ready[start:start + batch_size], self.val_y[start:start + batch_size]
            return
        idxs = [torch.arange(s, min(s + batch_size, self.n_val))
                for s in range(0, self.n_val, batch_size)]
        for idx, x in zip(idxs, self._uint8_batches("val", idxs)):
            yield to_input(self, x, resolution), self.val_y[idx]

    def channel_stats(self, images: int = 10_000) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std (images scaled to [0, 1], rounded to 6 decimals) of the
        first ``images`` training images in the stored order, in float64 sums: the same numbers
        whichever storage holds the images."""
        n = min(images, self.n_train)
        chunks = [torch.arange(s, min(s + _PREPARE_CHUNK, n)) for s in range(0, n, _PREPARE_CHUNK)]
        return _stats_of(self._uint8_batches("train", chunks))


_PREPARE_CHUNK = 64  # images per chunk when preparing or measuring (bounds transient memory)


class _PreparedCache:
    """Prepared tensors by (identity, split, resolution), least recently used dropped first so
    that they stay under ``limit_mb`` together."""

    def __init__(self, limit_mb: float):
        self.limit = float(limit_mb) * 2**20
        self.items: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.limit

    def get(self, key: tuple) -> torch.Tensor | None:
        t = self.items.get(key)
        if t is not None:
            self.items.move_to_end(key)
        return t

    def put(self, key: tuple, t: torch.Tensor) -> None:
        self.items[key] = t
        while sum(v.numel() * v.element_size() for v in self.items.values()) > self.limit:
            self.items.popitem(last=False)


def _stats_of(batches: Iterable[torch.Tensor], chunk: int = 8
              ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 batches (scaled to [0, 1]) from exact integer sums of
    values and squares, ``chunk`` images at a time (a float64 copy of a batch of large images
    would cost 8 bytes per pixel): independent of how the images are grouped."""
    s = torch.zeros(3, dtype=torch.int64)
    ss = torch.zeros(3, dtype=torch.int64)
    count = 0
    for x in batches:
        for part in x.split(chunk):
            wide = part.to(torch.int32)
            s += wide.sum(dim=(0, 2, 3), dtype=torch.int64)
            ss += (wide * wide).sum(dim=(0, 2, 3), dtype=torch.int64)
            count += part.shape[0] * part.shape[2] * part.shape[3]
    if count < 2:
        return (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    sf, ssf = s.double() / 255.0, ss.double() / (255.0 * 255.0)
    mean = sf / count
    var = ((ssf - sf * sf / count) / (count - 1)).clamp_min(1e-6)
    std = var.sqrt().clamp_min(1e-3)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


@dataclass(frozen=True, eq=False)
class TensorData(ImageData):
    """A dataset split held in memory as uint8 tensors (small data: digits, CIFAR, image folders
    that fit under ``load_dataset``'s ``memory_limit_mb`` at their decoded size).

    Attributes:
        name: the spec it was loaded from (``digits``, ``cifar10``, ``imagefolder:/path``).
        train_x, val_x: uint8 tensors ``(N, 3, H, W)`` at the native resolution.
        train_y, val_y: int64 label tensors.
        num_classes: number of classes; ``classes`` their names.
        native_resolution: H (= W) of the stored images.
        mean, std: per-channel normalisation constants for images scaled to [0, 1].
        crop_padding: zero padding (px at native resolution) of the random-crop augmentation.
        hflip: whether horizontal flips are a valid augmentation (False for digits).
        identity: hex hash of name, split parameters and content; part of every cache key.
        split: how the split was made (for reports and the identity).
        source_digest: content hash of the source files (image folders): when set, the identity
            hashes it instead of the tensors, so the in-memory and the streamed storage of one
            folder share an identity (and cached weights).
        notes: what the loader skipped or chose, for the user.
        prepared_cache_mb: bound of the prepared float tensors (see :meth:`prepared`), MB.
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    classes: tuple[str, ...]
    native_resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_padding: int
    hflip: bool
    identity: str = ""
    split: dict = field(default_factory=dict)
    source_digest: str = ""
    notes: tuple[str, ...] = ()
    prepared_cache_mb: float = 512.0

    def __post_init__(self) -> None:
        if not self.identity:
            object.__setattr__(self, "identity", _identity(self))

    def _subset(self, train_size: int, val_size: int) -> TensorData:
        split = dict(self.split, train_size=train_size, val_size=val_size)
        return replace(self, train_x=self.train_x[:train_size], train_y=self.train_y[:train_size],
                       val_x=self.val_x[:val_size], val_y=self.val_y[:val_size], split=split,
                       identity="")

    def _uint8_batches(self, split: str, index_batches: list[torch.Tensor]
                       ) -> Iterator[torch.Tensor]:
        x = self.train_x if split == "train" else self.val_x
        for idx in index_batches:
            yield x[idx]


def to_input(data: ImageData, x: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
    """Normalise uint8 images and resize them (bilinear, antialiased when shrinking)."""
    x = data.normalize(x)
    if resolution and resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=resolution < x.shape[-1])
    return x


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop of the zero-padded image (torchvision ``RandomCrop(pad)``) and
    optional horizontal flip (p 0.5); works on uint8 or float. The offsets of the whole batch are
    drawn first (then the flip mask), so the result depends only on the generator."""
    n, _, h, w = x.shape
    if padding > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).tolist()
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).tolist()
        # slices, not a gather with broadcast index tensors (8 bytes per pixel on large images)
        x = torch.stack([xp[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(n)]) if n \
            else x
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        if bool(mask.any()):
            x = x.clone()
            x[mask] = x[mask].flip(-1)
    return x


# --- splitting ------------------------------------------------------------------------------

def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A seeded permutation whose every prefix is (nearly) class-proportional.

    Each class is shuffled; its j-th image gets the key (j + 0.5) / n_class; images are sorted by
    key (ties broken by a seeded random number), interleaving the classes evenly.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keys = np.empty(len(labels), dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keys[rng.permutation(idx)] = (np.arange(len(idx)) + 0.5) / len(idx)
    tie = rng.random(len(labels))
    return np.lexsort((tie, keys))


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: ``round(val_fraction * n_c)`` images of each class c go to the
    validation split. Returns (train_idx, val_idx), each in stratified-prefix order."""
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(val_fraction * len(idx)))
        k = min(max(k, 1), len(idx) - 1) if len(idx) > 1 else 0
        val.append(idx[:k])
        train.append(idx[k:])
    train_idx, val_idx = np.concatenate(train), np.concatenate(val)
    train_idx = train_idx[stratified_order(labels[train_idx], seed + 1)]
    val_idx = val_idx[stratified_order(labels[val_idx], seed + 2)]
    return train_idx, val_idx


def _identity(d: ImageData) -> str:
    """sha256 of the name, the split parameters and the content: the source files' digest when
    the data came from files (either storage), else the tensors themselves."""
    h = hashlib.sha256()
    h.update(d.name.encode())
    h.update(repr(sorted(d.split.items())).encode())
    digest = getattr(d, "source_digest", "")
    if digest:
        h.update(digest.encode())
        return h.hexdigest()[:16]
    for t in (d.train_x, d.train_y, d.val_x, d.val_y):
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.double() / 255.0
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


# --- loaders --------------------------------------------------------------------------------

def find_cifar10_mini() -> Path | None:
    """The offline CIFAR-10 sample (3,805 images, ImageFolder): ``$RECOMMENDER_CIFAR10_MINI``, or
    ``shared/datasets/cifar10-mini/train`` beside the checkout; None when absent."""
    env = os.environ.get("RECOMMENDER_CIFAR10_MINI")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared/datasets/cifar10-mini/train")
    return next((c for c in candidates if c.is_dir()), None)


def list_datasets() -> list[str]:
    return list(DATASETS)


def load_dataset(spec: str | ImageData | tuple = "digits", *,
                 data_dir: str | os.PathLike | None = None, seed: int = 0,
                 val_fraction: float = 0.25, download: bool = False,
                 image_size: int | None = None, in_memory: bool | None = None,
                 memory_limit_mb: float = MEMORY_LIMIT_MB, num_workers: int | None = None,
                 num_classes: int | None = None, max_native_size: int = MAX_NATIVE_SIZE,
                 default_image_size: int = DEFAULT_IMAGE_SIZE,
                 stats_images: int = STATS_IMAGES) -> ImageData:
    """Load a dataset by spec (``digits``, ``cifar10``, ``cifar100``, ``imagefolder:PATH``,
    ``python:NAME@ID``), or wrap a ``(train_dataset, val_dataset)`` pair (see
    :func:`from_datasets`); an :class:`ImageData` is returned as it is.

    Args:
        data_dir: root of torchvision's CIFAR files (default ``$RECOMMENDER_DATA_DIR`` or
            ``~/.cache/recommender/data``).
        seed: seed of the stratified split and of the subset order.
        val_fraction: share of each class held out for validation (digits, imagefolder).
        download: allow torchvision to download CIFAR (never done implicitly).
        image_size: imagefolder and dataset pairs: square side (px) the images are decoded to.
        in_memory: imagefolder: True = decode everything into memory, False = stream, None
            (default) = in memory when the decoded images fit ``memory_limit_mb``.
        memory_limit_mb: imagefolder: bound (MB) of the decoded uint8 images held in memory.
        num_workers: DataLoader worker processes that decode images (default: the CPUs this
            process may use, at most 4).
        num_classes: class count of a ``(train, val)`` pair (else read from ``.classes``).
        max_native_size, default_image_size: the default ``image_size`` rule (module docstring).
        stats_images: mean/std are measured on the first this-many training images.

    Raises:
        UnknownNameError: unknown spec. DatasetError: missing, unreadable or malformed data.
    """
    if isinstance(spec, ImageData):
        return spec
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise DatasetError("a dataset pair is (train_dataset, val_dataset)")
        from .streaming import from_datasets

        return from_datasets(spec[0], spec[1], num_classes, image_size=image_size, seed=seed,
                             num_workers=num_workers, max_native_size=max_native_size,
                             default_image_size=default_image_size, stats_images=stats_images)
    spec = (spec or "digits").strip()
    key = spec.lower()
    if key == "digits":
        return _load_digits(seed, val_fraction)
    if key in ("cifar10", "cifar100"):
        return _load_cifar(key, data_dir, seed, download)
    if key.startswith("imagefolder:"):
        return _load_imagefolder(spec.split(":", 1)[1], seed=seed, val_fraction=val_fraction,
                                 image_size=image_size, in_memory=in_memory,
                                 memory_limit_mb=memory_limit_mb, num_workers=num_workers,
                                 max_native_size=max_native_size,
                                 default_image_size=default_image_size, stats_images=stats_images)
    if key.startswith("python:"):
        if spec not in _REGISTERED:
            raise DatasetError(f"no dataset registered as {spec!r} in this process; pass the "
                               f"dataset object itself (recommender.data.register_dataset)")
        return _REGISTERED[spec]
    raise UnknownNameError("dataset", spec, DATASETS)


_REGISTERED: dict[str, ImageData] = {}


def register_dataset(data: ImageData | tuple, *, num_classes: int | None = None,
                     name: str | None = None) -> str:
    """Register a dataset object for this process and return its spec, ``python:NAME@ID``
    (``ID``: the first 8 hex digits of its identity), which :func:`load_dataset` (hence a study,
    by name) accepts. A ``(train, val)`` pair is wrapped with :func:`from_datasets` first."""
    if not isinstance(data, ImageData):
        data = load_dataset(data, num_classes=num_classes)
    base = (name or data.name).replace(":", "-").replace("/", "-").replace("@", "-")
    spec = f"python:{base}@{data.identity[:8]}"
    _REGISTERED[spec] = data
    return spec


def from_datasets(train, val, num_classes: int | None = None, **options) -> ImageData:
    """A streamed dataset over a ``(train, val)`` pair of ``torch.utils.data.Dataset`` (see
    :func:`recommender.streaming.from_datasets` for the options)."""
    from .streaming import from_datasets as _from

    return _from(train, val, num_classes, **options)


def default_workers() -> int:
    """DataLoader decoding workers: the CPUs this process may use, at most 4."""
    from .devices import available_cpus

    return min(4, available_cpus())


def _finish(name: str, x: torch.Tensor, y: np.ndarray, classes, native: int, seed: int,
            val_fraction: float, mean=None, std=None, crop_padding: int = 4,
            hflip: bool = True) -> TensorData:
    tr, va = stratified_split(y, val_fraction, seed)
    yt = torch.as_tensor(y, dtype=torch.int64)
    tr_t, va_t = torch.as_tensor(tr), torch.as_tensor(va)
    train_x, val_x = x[tr_t].contiguous(), x[va_t].contiguous()
    if mean is None:
        mean, std = _channel_stats(train_x)
    return TensorData(name=name, train_x=train_x, train_y=yt[tr_t].contiguous(), val_x=val_x,
                      val_y=yt[va_t].contiguous(), num_classes=len(classes),
                      classes=tuple(str(c) for c in classes), native_resolution=native,
                      mean=tuple(mean), std=tuple(std), crop_padding=crop_padding, hflip=hflip,
                      split={"seed": seed, "val_fraction": val_fraction})


@functools.lru_cache(maxsize=4)
def _load_digits(seed: int, val_fraction: float) -> TensorData:
    from sklearn.datasets import load_digits

    d = load_digits()
    img = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    x = torch.from_numpy(img)[:, None].expand(-1, 3, -1, -1).contiguous()
    return _finish("digits", x, d.target.astype(np.int64), [str(i) for i in range(10)], 8, seed,
                   val_fraction, crop_padding=1, hflip=False)


def _default_data_dir() -> Path:
    env = os.environ.get("RECOMMENDER_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "recommender" / "data"


def _load_cifar(name: str, data_dir, seed: int, download: bool) -> TensorData:
    import torchvision

    root = Path(data_dir) if data_dir else _default_data_dir()
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except Exception as exc:  # torchvision raises RuntimeError; a failed download raises URLError
        # the command never downloads (runs are offline by design): say where the files go
        how = (f"put torchvision's {name} files (cifar-{name[5:]}-python) under {root}, or point --data-dir "
               f"at their folder; in Python, load_dataset('{name}', download=True) fetches them")
        raise DatasetError(f"{name} not found or unreadable in {root} ({type(exc).__name__}); "
                           f"{how}") from None
    xt = torch.from_numpy(np.asarray(train.data)).permute(0, 3, 1, 2).contiguous()
    xv = torch.from_numpy(np.asarray(test.data)).permute(0, 3, 1, 2).contiguous()
    yt = np.asarray(train.targets, dtype=np.int64)
    yv = np.asarray(test.targets, dtype=np.int64)
    ot, ov = stratified_order(yt, seed + 1), stratified_order(yv, seed + 2)
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    return TensorData(name=name, train_x=xt[torch.as_tensor(ot)].contiguous(),
                      train_y=torch.as_tensor(yt[ot]), val_x=xv[torch.as_tensor(ov)].contiguous(),
                      val_y=torch.as_tensor(yv[ov]), num_classes=len(train.classes),
                      classes=tuple(train.classes), native_resolution=32, mean=mean, std=std,
                      crop_padding=4, hflip=True, split={"seed": seed, "val": "official-test"})


def _load_imagefolder(path: str, *, seed: int, val_fraction: float, image_size: int | None,
                      in_memory: bool | None, memory_limit_mb: float, num_workers: int | None,
                      max_native_size: int, default_image_size: int,
                      stats_images: int) -> ImageData:
    from .imagefolder import DECODE_VERSION, FolderImages, scan_image_folder

    p = Path(path).expanduser()
    if not p.is_dir():
        raise DatasetError(f"image folder {path!r} does not exist; give "
                           f"--dataset imagefolder:DIR with DIR/<class>/<image> files")
    if image_size is not None and not 4 <= int(image_size) <= 1024:
        raise DatasetError(f"image size must be in [4, 1024] px, got {image_size}")
    scan = scan_image_folder(p)
    if len(scan.classes) < 2:
        raise DatasetError(f"image folder {path} has {len(scan.classes)} class folder(s); need >= 2")
    for note in scan.notes:
        warnings.warn(f"image folder {path}: {note}", stacklevel=3)
    key = (scan.root, scan.digest, image_size, seed, val_fraction, in_memory, memory_limit_mb,
           max_native_size, default_image_size, stats_images, num_workers)
    if key in _FOLDER_CACHE:
        return _FOLDER_CACHE[key]
    if image_size is None:
        native = scan.common_square_size()
        size = native if native is not None and native <= max_native_size else default_image_size
    else:
        size = int(image_size)
    tr, va = stratified_split(scan.labels, val_fraction, seed)
    if len(va) == 0:
        raise DatasetError(f"image folder {path}: the validation split is empty (val_fraction "
                           f"{val_fraction} of classes with {np.bincount(scan.labels).min()} "
                           f"image(s)); each class needs at least 2 images")
    nbytes = len(scan.paths) * 3 * size * size
    if in_memory is None:
        in_memory = nbytes <= memory_limit_mb * 2**20
    name = f"imagefolder:{scan.root}"
    workers = default_workers() if num_workers is None else int(num_workers)
    images = FolderImages(scan.paths, size)
    split = {"seed": seed, "val_fraction": val_fraction, "image_size": size}
    digest = f"{scan.digest}:{DECODE_VERSION}"
    common = dict(num_classes=len(scan.classes), classes=scan.classes, native_resolution=size,
                  crop_padding=max(1, round(4 * size / 32)), hflip=True, split=split,
                  source_digest=digest, notes=scan.notes)
    ytr = torch.as_tensor(scan.labels[tr])
    yva = torch.as_tensor(scan.labels[va])
    if in_memory:
        train_x = _decode_all(images, tr, workers)
        val_x = _decode_all(images, va, workers)
        d = TensorData(name=name, train_x=train_x, train_y=ytr, val_x=val_x, val_y=yva,
                       mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), **common)
    else:
        from .streaming import StreamingData

        d = StreamingData(name=name, train_source=images, train_index=torch.as_tensor(tr),
                          train_y=ytr, val_source=images, val_index=torch.as_tensor(va),
                          val_y=yva, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                          num_workers=workers, **common)
    mean, std = d.channel_stats(stats_images)
    d = replace(d, mean=mean, std=std, identity=d.identity)
    _FOLDER_CACHE[key] = d
    while len(_FOLDER_CACHE) > 2:  # decoding is the slow part of a load; keep the last two
        _FOLDER_CACHE.pop(next(iter(_FOLDER_CACHE)))
    return d


_FOLDER_CACHE: dict[tuple, ImageData] = {}


def _decode_all(images, order: np.ndarray, workers: int) -> torch.Tensor:
    """Decode ``images[order]`` into one preallocated uint8 tensor (workers decode batches)."""
    from .streaming import loader_batches

    size = images.decode.size
    out = torch.empty((len(order), 3, size, size), dtype=torch.uint8)
    batches = [order[s:s + 64].tolist() for s in range(0, len(order), 64)]
    start = 0
    for x in loader_batches(images, batches, workers):
        out[start:start + x.shape[0]] = x
        start += x.shape[0]
    return out
