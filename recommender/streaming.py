"""Streamed datasets: images decoded on demand by ``torch.utils.data.DataLoader`` workers.

:class:`StreamingData` implements :class:`recommender.data.ImageData` over one or two
``torch.utils.data.Dataset`` objects whose item ``i`` is a uint8 ``(3, S, S)`` image tensor:
``recommender.imagefolder.FolderImages`` (an image folder too large for memory) or the adapter
that :func:`from_datasets` puts around a user's ``(train, val)`` pair. Only the labels and the
index arrays live in memory; each batch is decoded by the workers (``num_workers``; 0 = in this
process), in the order the caller's generator drew, and augmented in this process, so it equals
the in-memory storage's batch for the same images. Batches at a proxy resolution that fit
``prepared_cache_mb`` are decoded once (:meth:`ImageData.prepared`), not once per epoch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import (DEFAULT_IMAGE_SIZE, MAX_NATIVE_SIZE, STATS_IMAGES, ImageData, _identity,
                   _stats_of, default_workers, stratified_order)
from . import limits
from .errors import DatasetError

__all__ = ["StreamingData", "from_datasets", "loader_batches"]


def loader_batches(source: Dataset, batches: list[list[int]], num_workers: int
                   ) -> Iterator[torch.Tensor]:
    """uint8 batches ``source[b]`` stacked, for each list of item indices ``b``, in order,
    decoded by ``num_workers`` DataLoader worker processes (0: in this process). A
    :class:`DatasetError` raised in a worker comes back as one line."""
    if not batches:
        return
    workers = max(0, int(num_workers))
    loader = DataLoader(source, batch_sampler=batches, num_workers=workers,
                        collate_fn=torch.stack, prefetch_factor=2 if workers else None)
    try:
        yield from loader
    except DatasetError as exc:  # re-raised from a worker with its traceback in the message
        msg = str(exc).strip().splitlines()
        last = msg[-1] if msg else ""
        raise DatasetError(last.split("DatasetError: ", 1)[-1]) from None
    except (TypeError, ValueError, IndexError, KeyError, RuntimeError) as exc:  # the user's items
        msg = str(exc).strip().splitlines()
        last = msg[-1] if msg else type(exc).__name__
        raise DatasetError(f"cannot read the dataset's items: {last[:200]}") from None


@dataclass(frozen=True, eq=False)
class StreamingData(ImageData):
    """A dataset split whose images are decoded on demand (see the module docstring).

    Attributes (besides :class:`~recommender.data.ImageData`'s):
        train_source, val_source: datasets whose item i is a uint8 ``(3, S, S)`` tensor (the
            same object for an image folder).
        train_index, val_index: int64 positions in the sources, in the stored (stratified)
            order: ``train_y[k]`` is the label of ``train_source[train_index[k]]``.
        source_digest: content hash of the source (see ``ImageData.identity``).
        num_workers: decoding worker processes (0 = in this process).
    """

    name: str
    train_source: Dataset
    train_index: torch.Tensor
    train_y: torch.Tensor
    val_source: Dataset
    val_index: torch.Tensor
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
    num_workers: int = 0
    prepared_cache_mb: float = 512.0
    storage = "stream"

    def __post_init__(self) -> None:
        if not self.source_digest:
            raise ValueError("StreamingData needs a source_digest (its content identity)")
        if not self.identity:
            object.__setattr__(self, "identity", _identity(self))

    def _subset(self, train_size: int, val_size: int) -> StreamingData:
        split = dict(self.split, train_size=train_size, val_size=val_size)
        return replace(self, train_index=self.train_index[:train_size],
                       train_y=self.train_y[:train_size], val_index=self.val_index[:val_size],
                       val_y=self.val_y[:val_size], split=split, identity="")

    def _uint8_batches(self, split: str, index_batches: list[torch.Tensor]
                       ) -> Iterator[torch.Tensor]:
        source, index = ((self.train_source, self.train_index) if split == "train"
                         else (self.val_source, self.val_index))
        return loader_batches(source, [index[b].tolist() for b in index_batches],
                              self.num_workers)


class _AsImages(Dataset):
    """A user's dataset seen as uint8 ``(3, size, size)`` images (labels dropped): PIL images,
    HWC uint8 arrays and CHW tensors (uint8, or float in [0, 1]) are accepted; grey is repeated
    to three channels, an alpha channel dropped; another size is resized (shorter side,
    antialiased) and centre-cropped with ``torchvision.transforms.v2``."""

    def __init__(self, dataset: Dataset, size: int):
        from torchvision.transforms import v2

        self.dataset = dataset
        self.size = int(size)
        self.resize = v2.Compose([v2.Resize(self.size, antialias=True), v2.CenterCrop(self.size)])

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.dataset[i]
        img = item[0] if isinstance(item, (tuple, list)) else item
        x = _to_uint8(img)
        if x.dim() != 3 or x.shape[0] not in (1, 3, 4):
            raise DatasetError(f"item {i} of the dataset is not an image (shape "
                               f"{tuple(x.shape)}); expected (C, H, W) with 1, 3 or 4 channels")
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        elif x.shape[0] == 4:
            x = x[:3]
        if tuple(x.shape[1:]) != (self.size, self.size):
            x = self.resize(x)
        return x.contiguous()


class _Labels(Dataset):
    """Item i -> the label of a user's dataset item (for datasets without ``targets``)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self.dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DatasetError("dataset items must be (image, label) pairs")
        return _as_labels(item[1]).reshape(())


def _as_labels(values: Any) -> torch.Tensor:
    """Class labels as int64; a label that is not a whole number (0.9, "cat") is an error, not
    truncated."""
    try:
        t = torch.as_tensor(values)
    except Exception:
        raise DatasetError(f"dataset labels must be whole numbers (class indices), got {str(values)[:40]!r}") from None
    if t.is_floating_point() or t.is_complex():
        bad = t[t != t.round()] if not t.is_complex() else t.reshape(-1)
        if bad.numel():
            raise DatasetError(f"dataset labels must be whole numbers (class indices), got {bad.reshape(-1)[0].item()!r}")
    elif t.dtype == torch.bool:
        raise DatasetError("dataset labels must be whole numbers (class indices), got booleans")
    return t.to(torch.int64)


def _labels(dataset: Dataset, num_workers: int) -> np.ndarray:
    targets = getattr(dataset, "targets", None)
    if targets is not None and len(targets) == len(dataset):  # type: ignore[arg-type]
        return _as_labels(targets).numpy().reshape(-1)
    n = len(dataset)  # type: ignore[arg-type]
    batches = [list(range(s, min(s + 256, n))) for s in range(0, n, 256)]
    out = [b for b in loader_batches(_Labels(dataset), batches, num_workers)]
    return torch.cat([b.reshape(-1) for b in out]).numpy().astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def from_datasets(train: Dataset, val: Dataset, num_classes: int | None = None, *,
                  name: str = "datasets", image_size: int | None = None, seed: int = 0,
                  num_workers: int | None = None, max_native_size: int = MAX_NATIVE_SIZE,
                  default_image_size: int = DEFAULT_IMAGE_SIZE,
                  stats_images: int = STATS_IMAGES, crop_padding: int | None = None,
                  hflip: bool = True, prepared_cache_mb: float = 512.0) -> StreamingData:
    """Stream a ``(train, val)`` pair of ``torch.utils.data.Dataset`` whose items are
    ``(image, label)``; ``val`` is the validation split as given (like CIFAR's test split).

    Args:
        num_classes: class count (default: ``len(train.classes)`` when the dataset has it).
        name: the dataset's name in reports and in its identity.
        image_size: square side (px) images are converted to (default: the first training
            image's side when it is square and at most ``max_native_size``, else
            ``default_image_size``).
        seed: seed of the stratified orders that subsets are prefixes of.
        num_workers: DataLoader decoding workers (default: available CPUs, at most 4).
        stats_images: mean/std from the first this-many training images (stored order).
        crop_padding: random-crop padding in px (default: 4 px per 32 px of image size).
        hflip: whether horizontal flips are a valid augmentation.
        prepared_cache_mb: bound of the prepared float tensors (MB).

    Labels come from ``.targets`` when the dataset has it, else from one pass over the items.
    The identity hashes the name, the labels and the first ``stats_images`` training and 256
    validation images (decoded), not every image.

    Raises:
        DatasetError: an empty split, labels out of range, items that are not images.
    """
    if num_classes is None:
        classes = getattr(train, "classes", None)
        if not classes:
            raise DatasetError("give num_classes for a (train, val) dataset pair "
                               "(recommender.data.from_datasets(train, val, num_classes))")
        num_classes = len(classes)
    limits.check("num_classes", num_classes, "num_classes of a dataset pair", error=DatasetError)
    classes = tuple(str(c) for c in getattr(train, "classes", None) or range(num_classes))
    if len(classes) != num_classes:
        classes = tuple(str(c) for c in range(num_classes))
    workers = default_workers() if num_workers is None else int(num_workers)
    if len(train) == 0 or len(val) == 0:  # type: ignore[arg-type]
        raise DatasetError(f"dataset pair {name!r}: the {'training' if len(train) == 0 else 'validation'} "  # type: ignore[arg-type]
                           f"dataset is empty")
    ytr, yva = _labels(train, workers), _labels(val, workers)
    for y, what in ((ytr, "training"), (yva, "validation")):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DatasetError(f"dataset pair {name!r}: {what} labels must be in [0, "
                               f"{num_classes - 1}], got {int(y.min())}..{int(y.max())}")
    if image_size is None:
        first = _to_uint8(_first_image(train))
        h, w = int(first.shape[-2]), int(first.shape[-1])
        image_size = h if h == w and h <= max_native_size else default_image_size
    size = int(image_size)
    tr = stratified_order(ytr, seed + 1)
    va = stratified_order(yva, seed + 2)
    split = {"seed": seed, "val": "given", "image_size": size}
    base = StreamingData(
        name=name, train_source=_AsImages(train, size), train_index=torch.as_tensor(tr),
        train_y=torch.as_tensor(ytr[tr]), val_source=_AsImages(val, size),
        val_index=torch.as_tensor(va), val_y=torch.as_tensor(yva[va]), num_classes=num_classes,
        classes=classes, native_resolution=size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
        crop_padding=max(1, round(4 * size / 32)) if crop_padding is None else crop_padding,
        hflip=hflip, split=split, source_digest="pending", num_workers=workers,
        prepared_cache_mb=prepared_cache_mb)
    # One pass over the first training images gives the statistics and, with the labels and
    # the first validation images, the content digest.
    h = hashlib.sha256(ytr.tobytes() + b"|" + yva.tobytes())
    n = min(stats_images, base.n_train)
    chunks = [torch.arange(s, min(s + 256, n)) for s in range(0, n, 256)]

    def hashed(it):
        for x in it:
            h.update(x.numpy().tobytes())
            yield x

    mean, std = _stats_of(hashed(base._uint8_batches("train", chunks)))
    nv = min(256, base.n_val)
    for x in base._uint8_batches("val", [torch.arange(0, nv)]):
        h.update(x.numpy().tobytes())
    return replace(base, mean=mean, std=std, source_digest=h.hexdigest()[:16], identity="")


def _to_uint8(img) -> torch.Tensor:
    """PIL image, HWC array or CHW tensor -> uint8 CHW tensor (floats scaled from [0, 1])."""
    from torchvision.transforms import v2

    if not isinstance(img, (torch.Tensor, np.ndarray)) and not hasattr(img, "getbands"):  # PIL images have it
        raise DatasetError(f"dataset items must be images (a PIL image, an HWC array or a CHW tensor), "
                           f"got {type(img).__name__}")
    x = v2.functional.to_image(img)
    return v2.functional.to_dtype(x, torch.uint8, scale=True).as_subclass(torch.Tensor)


def _first_image(dataset: Dataset):
    item = dataset[0]
    return item[0] if isinstance(item, (tuple, list)) else item
