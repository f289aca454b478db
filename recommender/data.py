"""Dataset registry: small image datasets held in memory as tensors.

``load_dataset(spec)`` returns a :class:`TensorData`: uint8 images ``(N, 3, H, W)`` at their native
resolution, int64 labels, a seeded stratified train/validation split, per-channel normalisation
constants and an ``identity`` hash used in cache keys. Batching (normalise, augment, resize) is done
on tensors, so data loading is never the bottleneck of a proxy training on a CPU.

Registered specs:

- ``digits`` (default, offline): scikit-learn's 1,797 handwritten digits, 8x8 grey, replicated to
  three channels; values 0..16 scaled to 0..255. Split: ``val_fraction`` of each class.
- ``cifar10`` / ``cifar100``: torchvision's datasets under ``data_dir``; the official test split is
  the validation split (as in the paper); ``val_fraction`` is ignored. Downloaded only when
  ``download=True``.
- ``imagefolder:PATH``: any torchvision ``ImageFolder`` tree (``PATH/<class>/<image>``), images
  resized to a square ``image_size`` (default: their own size when they are all the same square size
  of at most 64 px, else 32). Split as for ``digits``.

Subsets (``TensorData.subset``) are stratified prefixes of a seeded order, so a smaller subset is
contained in a larger one and does not depend on the training seed: the baseline and every
candidate of a study are evaluated on the same validation images.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DatasetError, UnknownNameError

__all__ = [
    "TensorData",
    "load_dataset",
    "list_datasets",
    "stratified_split",
    "stratified_order",
    "random_crop_flip",
    "to_input",
    "DATASETS",
]

DATASETS: tuple[str, ...] = ("digits", "cifar10", "cifar100", "imagefolder:PATH")

# Known normalisation constants (the paper's continuation, section 5 of paper/variants.md).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


@dataclass(frozen=True, eq=False)
class TensorData:
    """A dataset split held in memory.

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

    def __post_init__(self) -> None:
        if not self.identity:
            object.__setattr__(self, "identity", _identity(self))

    @property
    def n_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def n_val(self) -> int:
        return int(self.val_y.shape[0])

    def describe(self) -> str:
        return (f"{self.name}: {self.n_train} train / {self.n_val} val images, "
                f"{self.num_classes} classes, {self.native_resolution}px")

    def subset(self, train_size: int | None = None, val_size: int | None = None) -> TensorData:
        """Stratified prefixes: the first ``train_size`` / ``val_size`` images (None or 0 = all).

        The stored order is already a seeded stratified interleaving (see ``stratified_order``),
        so a prefix keeps the class proportions and a smaller subset is part of a larger one.
        """
        tx, ty, vx, vy = self.train_x, self.train_y, self.val_x, self.val_y
        changed = False
        if train_size and train_size < self.n_train:
            tx, ty, changed = tx[:train_size], ty[:train_size], True
        if val_size and val_size < self.n_val:
            vx, vy, changed = vx[:val_size], vy[:val_size], True
        if not changed:
            return self
        split = dict(self.split, train_size=int(ty.shape[0]), val_size=int(vy.shape[0]))
        return replace(self, train_x=tx, train_y=ty, val_x=vx, val_y=vy, split=split, identity="")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 255] float) images -> float32 normalised with this dataset's mean/std."""
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return (x.float() - mean) / std

    def train_batches(self, batch_size: int, resolution: int | None = None, *,
                      augment: bool = False, shuffle: bool = True,
                      generator: torch.Generator | None = None, drop_last: bool = False,
                      with_index: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
        """One epoch of ``(x, y)`` (or ``(x, y, idx)``) normalised float batches.

        Augmentation (random crop with zero padding ``crop_padding`` and, where ``hflip``, a
        horizontal flip) is applied at the native resolution, before the resize to ``resolution``.
        """
        n = self.n_train
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - (n % batch_size) if drop_last and n >= batch_size else n
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            x = self.train_x[idx]
            if augment:
                x = random_crop_flip(x, self.crop_padding, self.hflip, generator)
            x = to_input(self, x, resolution)
            yield (x, self.train_y[idx], idx) if with_index else (x, self.train_y[idx])

    def val_batches(self, batch_size: int, resolution: int | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The validation split in its stored order, normalised, at ``resolution``."""
        for start in range(0, self.n_val, batch_size):
            x = to_input(self, self.val_x[start:start + batch_size], resolution)
            yield x, self.val_y[start:start + batch_size]


def to_input(data: TensorData, x: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
    """Normalise uint8 images and resize them (bilinear, antialiased when shrinking)."""
    x = data.normalize(x)
    if resolution and resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=resolution < x.shape[-1])
    return x


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-image random crop of the zero-padded image (torchvision ``RandomCrop(pad)``) and
    optional horizontal flip (p 0.5), vectorised over the batch; works on uint8 or float."""
    n, _, h, w = x.shape
    if padding > 0:
        xp = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]  # n,1,h,1
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]  # n,1,1,w
        batch = torch.arange(n)[:, None, None, None]
        chan = torch.arange(x.shape[1])[None, :, None, None]
        x = xp[batch, chan, rows, cols]
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


def _identity(d: TensorData) -> str:
    h = hashlib.sha256()
    h.update(d.name.encode())
    h.update(repr(sorted(d.split.items())).encode())
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


def load_dataset(spec: str = "digits", *, data_dir: str | os.PathLike | None = None, seed: int = 0,
                 val_fraction: float = 0.25, download: bool = False,
                 image_size: int | None = None) -> TensorData:
    """Load a dataset by spec (``digits``, ``cifar10``, ``cifar100``, ``imagefolder:PATH``).

    Args:
        data_dir: root of torchvision's CIFAR files (default ``$RECOMMENDER_DATA_DIR`` or
            ``~/.cache/recommender/data``).
        seed: seed of the stratified split and of the subset order.
        val_fraction: share of each class held out for validation (digits, imagefolder).
        download: allow torchvision to download CIFAR (never done implicitly).
        image_size: imagefolder only: square side the images are resized to.

    Raises:
        UnknownNameError: unknown spec. DatasetError: missing or unreadable data.
    """
    spec = (spec or "digits").strip()
    key = spec.lower()
    if key == "digits":
        return _load_digits(seed, val_fraction)
    if key in ("cifar10", "cifar100"):
        return _load_cifar(key, data_dir, seed, download)
    if key.startswith("imagefolder:"):
        return _load_imagefolder(spec.split(":", 1)[1], seed, val_fraction, image_size)
    raise UnknownNameError("dataset", spec, DATASETS)


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
        how = (f"download it with `--data-dir DIR --download` (needs network access) or put "
               f"torchvision's {name} files under {root}")
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


@functools.lru_cache(maxsize=4)
def _read_imagefolder(path: str, mtime: float, image_size: int | None):
    import torchvision
    from PIL import Image

    try:
        ds = torchvision.datasets.ImageFolder(path)
    except Exception as exc:
        raise DatasetError(f"cannot read image folder {path}: {exc}".splitlines()[0]) from None
    if not ds.samples:
        raise DatasetError(f"image folder {path} has no images")
    sizes = set()
    imgs = []
    for p, _ in ds.samples:
        try:
            with Image.open(p) as im:
                imgs.append(im.convert("RGB"))
        except Exception as exc:
            raise DatasetError(f"cannot read image {p}: {exc}".splitlines()[0]) from None
        sizes.add(imgs[-1].size)
    if image_size is None:
        (w, h), = sizes if len(sizes) == 1 else ((0, 1),)
        image_size = w if (w == h and 0 < w <= 64) else 32
    arr = np.empty((len(imgs), image_size, image_size, 3), dtype=np.uint8)
    for i, im in enumerate(imgs):
        if im.size != (image_size, image_size):
            s = min(im.size)
            left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
            im = im.crop((left, top, left + s, top + s)).resize((image_size, image_size),
                                                                 Image.BILINEAR)
        arr[i] = np.asarray(im)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
    y = np.asarray(ds.targets, dtype=np.int64)
    return x, y, tuple(ds.classes), image_size


def _load_imagefolder(path: str, seed: int, val_fraction: float,
                      image_size: int | None) -> TensorData:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DatasetError(f"image folder {path!r} does not exist; give "
                           f"--dataset imagefolder:DIR with DIR/<class>/<image> files")
    x, y, classes, size = _read_imagefolder(str(p.resolve()), p.stat().st_mtime, image_size)
    if len(classes) < 2:
        raise DatasetError(f"image folder {path} has {len(classes)} class folder(s); need >= 2")
    return _finish(f"imagefolder:{p.resolve()}", x, y, classes, size, seed, val_fraction,
                   crop_padding=max(1, round(4 * size / 32)), hflip=True)
