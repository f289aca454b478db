"""Image folders (``PATH/<class>/<image>``): a safe scan and decoding at the target size.

- :func:`scan_image_folder` lists the images like torchvision's ``ImageFolder`` (class folders
  sorted by name, files sorted within each folder, the same extensions), so an ordinary folder
  gets the same samples in the same order, but it follows symbolic links *safely*: a directory
  link that points back to one of its ancestors (a loop) is skipped, and a file reached twice
  (through linked directories or file links) is kept once, at its first path in that order
  (deduplicated by resolved path). Both are said in :attr:`FolderScan.notes`, so no image can
  appear many times, or in both the training and the validation split.
- :class:`DecodeResized` decodes one image straight to the target size: JPEG DCT scaling
  (``PIL.Image.draft``) decodes at 1/2..1/8 of the stored size when that is still at least the
  target, then torchvision's ``transforms.v2`` resizes the shorter side (bilinear, antialiased)
  and centre-crops a square. At most one full-size image per worker is ever held in memory.
- :class:`FolderImages` is the ``torch.utils.data.Dataset`` of those decoded uint8 images.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DatasetError

__all__ = ["IMG_EXTENSIONS", "FolderScan", "scan_image_folder", "DecodeResized", "FolderImages",
           "DECODE_VERSION"]

# torchvision.datasets.folder.IMG_EXTENSIONS
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Changes whenever the decoded pixels would change (part of a folder dataset's identity).
DECODE_VERSION = "pil-draft+v2-resize-centercrop/1"
_DIGEST_BYTES = 4096


@dataclass(frozen=True)
class FolderScan:
    """What a folder holds.

    Attributes:
        root: the folder (resolved).
        classes: class folder names, sorted.
        paths: image paths in ``ImageFolder`` order, each file once.
        labels: int64 class index per path.
        sizes: (width, height) per path, read from the image headers (no decoding).
        notes: what was skipped (symlink loops, duplicate files), for the user.
        digest: hex hash of relative paths, labels, file sizes and the first and last 4 KiB of
            every file: the folder's content identity without reading every byte of every file.
    """

    root: str
    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray
    sizes: tuple[tuple[int, int], ...]
    notes: tuple[str, ...]
    digest: str

    def common_square_size(self) -> int | None:
        """The side of the images when they all share one square size, else None."""
        distinct = set(self.sizes)
        if len(distinct) == 1:
            (w, h), = distinct
            if w == h:
                return int(w)
        return None


def scan_image_folder(root: str | os.PathLike) -> FolderScan:
    """Scan ``root/<class>/**/<image>`` (see the module docstring).

    Raises:
        DatasetError: no class folders, a class without images (after deduplication), or an
            image whose header cannot be read.
    """

    top = Path(root).resolve()
    try:
        classes = sorted(e.name for e in os.scandir(top) if _is_dir(e))
    except OSError as exc:
        raise DatasetError(f"cannot read image folder {root}: {exc}") from None
    if not classes:
        raise DatasetError(f"image folder {root} has no class folders; expected "
                           f"{root}/<class>/<image> files")
    top_key = _dir_key(top)
    seen: dict[str, str] = {}  # resolved file path -> first path
    loops = 0
    duplicates = 0
    paths: list[str] = []
    labels: list[int] = []
    sizes: list[tuple[int, int]] = []
    h = hashlib.sha256()
    for label, cls in enumerate(classes):
        class_dir = top / cls
        if _dir_key(class_dir) == top_key:
            raise DatasetError(f"class folder {cls!r} of {root} links to the image folder itself")
        walked: list[tuple[str, list[str]]] = []
        loops += _walk(str(class_dir), frozenset({top_key, _dir_key(class_dir)}), walked)
        walked.sort(key=lambda t: t[0])  # ImageFolder: sorted(os.walk(...)), then sorted names
        n_class = 0
        for folder, names in walked:
            for name in names:
                path = os.path.join(folder, name)
                real = os.path.realpath(path)
                if real in seen:
                    duplicates += 1
                    continue
                seen[real] = path
                size, head_tail, wh = _read_header(path)
                h.update(f"{os.path.relpath(path, top)}\0{label}\0{size}\0".encode())
                h.update(head_tail)
                paths.append(path)
                labels.append(label)
                sizes.append(wh)
                n_class += 1
        if n_class == 0:
            why = " (all its files are duplicates of files in other classes)" if duplicates else ""
            raise DatasetError(f"class folder {cls!r} of {root} has no images{why}; extensions: "
                               f"{', '.join(IMG_EXTENSIONS)}")
    notes = []
    if loops:
        notes.append(f"skipped {loops} symbolic link(s) that loop back to a parent folder")
    if duplicates:
        notes.append(f"{duplicates} file(s) reached twice through symbolic links were kept once "
                     f"(deduplicated by resolved path)")
    return FolderScan(root=str(top), classes=tuple(classes), paths=tuple(paths),
                      labels=np.asarray(labels, dtype=np.int64), sizes=tuple(sizes),
                      notes=tuple(notes), digest=h.hexdigest()[:16])


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows links, like ImageFolder
    except OSError:
        return False


def _dir_key(path: str | os.PathLike) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk(folder: str, ancestors: frozenset, out: list[tuple[str, list[str]]]) -> int:
    """Depth-first walk following directory links, skipping a link to an ancestor (a loop).
    Appends (folder, sorted image names); returns the number of loops skipped."""
    loops = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    names, subdirs = [], []
    for e in entries:
        try:
            if e.is_dir():
                key = _dir_key(e.path)
                if key in ancestors:
                    loops += 1
                else:
                    subdirs.append((e.path, key))
            elif e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS):
                names.append(e.name)
        except OSError:  # a dangling link
            continue
    out.append((folder, sorted(names)))
    for path, key in subdirs:
        loops += _walk(path, ancestors | {key}, out)
    return loops


def _read_header(path: str) -> tuple[int, bytes, tuple[int, int]]:
    """(file size, first + last 4 KiB, (width, height)) without decoding the pixels."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_DIGEST_BYTES)
            tail = b""
            if size > 2 * _DIGEST_BYTES:
                f.seek(-_DIGEST_BYTES, os.SEEK_END)
                tail = f.read(_DIGEST_BYTES)
            f.seek(0)
            with warnings.catch_warnings():  # a huge image: PIL's warning would print its own path
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    wh = (int(im.size[0]), int(im.size[1]))
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, ...
        raise DatasetError(f"cannot read image {path}: {exc}".splitlines()[0]) from None
    return size, head + tail, wh


class DecodeResized:
    """Decode one image file to a uint8 ``(3, size, size)`` tensor (see the module docstring)."""

    def __init__(self, size: int):
        from torchvision.transforms import v2

        self.size = int(size)
        self.transform = v2.Compose([v2.Resize(self.size, antialias=True),
                                     v2.CenterCrop(self.size), v2.PILToTensor()])

    def __call__(self, path: str) -> torch.Tensor:
        from PIL import Image

        with warnings.catch_warnings():  # a huge image: PIL's warning would print its own path
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.draft("RGB", (self.size, self.size))  # JPEG: decode at a reduced scale (no-op else)
                rgb = to_rgb8(im)
        return self.transform(rgb)


def to_rgb8(im: Any) -> Any:
    """A PIL image as 8-bit RGB. 16-bit grey (PNG: modes ``I;16*``, or ``I`` with values above
    255) is scaled to 8 bits, not clipped (PIL's own conversion clips it to white); 32-bit float
    grey is read as [0, 1] when it lies there."""
    from PIL import Image

    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or (im.mode == "I" and a.size and a.max() > 255):
            a = a / 257.0  # 65535 -> 255
        elif im.mode == "F" and a.size and a.max() <= 1.0:
            a = a * 255.0
        grey = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
        return grey.convert("RGB")
    return im.convert("RGB")


class FolderImages(torch.utils.data.Dataset):
    """The images of a scan, decoded at ``size`` on access: item i -> uint8 ``(3, size, size)``.

    An unreadable file raises a one-line :class:`DatasetError` naming it."""

    def __init__(self, paths: tuple[str, ...], size: int):
        self.paths = paths
        self.decode = DecodeResized(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.paths[i]
        try:
            return self.decode(path)
        except Exception as exc:
            raise DatasetError(f"cannot read image {path}: {exc}".splitlines()[0]) from None
