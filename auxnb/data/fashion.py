"""Fashion-MNIST from its IDX files (gzipped or not), as uint8 images ``[N, 1, 28, 28]``.

Looked up in ``<data root>/fashion-mnist/``, torchvision's ``<data root>/FashionMNIST/raw/``,
then Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist/``).
A missing file is an error naming the layout and ``AUXNB_DATA``; nothing is substituted.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from auxnb.data.sources import data_root, missing_dataset_error

__all__ = ["FASHION_CLASSES", "FASHION_FOLDER", "SYSTEM_FASHION_DIR", "read_idx", "find_fashion_mnist", "load_fashion_mnist"]

FASHION_FOLDER = "fashion-mnist"
#: Where Debian's ``dataset-fashion-mnist`` package installs the real files.
SYSTEM_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
#: Class names in label order (Xiao et al. 2017).
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_URL = "https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
# IDX type codes (third byte of the magic number) -> numpy dtype (big-endian)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (``.gz`` or plain): magic ``0 0 type ndim``, big-endian int32 dims, data.

    Raises:
        ValueError: a bad magic number, unknown type code, or a data size that does not match.
    """
    path = Path(path)
    fix = "replace it with a copy of the official file (https://github.com/zalandoresearch/fashion-mnist)"
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as err:
        if isinstance(err, OSError) and not isinstance(err, gzip.BadGzipFile) and err.errno is not None:
            raise
        raise ValueError(f"{path} cannot be read to its end ({type(err).__name__}: {err}): the file is cut short or "
                         f"not gzip-compressed; {fix}.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number); {fix}.")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_TYPES:
        raise ValueError(f"{path}: unknown IDX type code 0x{code:02x}; {fix}.")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: the header of {ndim} dimensions is cut short ({len(raw)} bytes); {fix}.")
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_TYPES[code])
    held = (len(raw) - 4 - 4 * ndim) / dtype.itemsize
    if any(d < 0 for d in dims) or held != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} values) but the file holds {held:g}: it is "
                         f"cut short or damaged; {fix}.")
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    return data.reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(root: str | os.PathLike | None = None, *, system: bool = True) -> Path | None:
    """The first folder holding all four Fashion-MNIST IDX files, or ``None``.

    Searched: ``<root>/fashion-mnist``, ``<root>/FashionMNIST/raw``, and (with `system`)
    ``/usr/share/datasets/fashion-mnist`` from Debian's ``dataset-fashion-mnist`` package.
    """
    base = data_root(root)
    candidates = [base / FASHION_FOLDER, base / "FashionMNIST" / "raw"]
    if system:
        candidates.append(SYSTEM_FASHION_DIR)
    for folder in candidates:
        if all(_find(folder, stem) is not None for stems in _FILES.values() for stem in stems):
            return folder
    return None


def load_fashion_mnist(
    root: str | os.PathLike | None = None, split: str = "train", *, system: bool = True, download: bool = False
) -> tuple[Tensor, Tensor]:
    """Fashion-MNIST images and labels.

    Args:
        root: the data root (default ``$AUXNB_DATA`` or ``~/.cache/auxnb``).
        split: ``"train"`` (60,000) or ``"test"`` (10,000).
        system: also look in ``/usr/share/datasets/fashion-mnist`` (Debian package).
        download: fetch the files with torchvision when none are found (needs internet).

    Returns:
        ``(images, labels)``: uint8 ``[N, 1, 28, 28]`` and long ``[N]`` in 0..9.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    folder = find_fashion_mnist(root, system=system)
    if folder is None and download:
        from torchvision.datasets.utils import download_and_extract_archive

        target = data_root(root) / FASHION_FOLDER
        for stems in _FILES.values():
            for stem in stems:
                download_and_extract_archive(_URL + stem + ".gz", download_root=str(target), remove_finished=False)
        folder = find_fashion_mnist(root, system=system)
    if folder is None:
        layout = [f"{stem}.gz (or {stem})" for stems in _FILES.values() for stem in stems]
        err = missing_dataset_error(FASHION_FOLDER, layout, root)
        raise FileNotFoundError(
            f"{err} On Debian/Ubuntu, `apt-get install dataset-fashion-mnist` installs the real files in "
            f"{SYSTEM_FASHION_DIR}, which is searched too."
        )
    image_stem, label_stem = _FILES[split]
    images = read_idx(_find(folder, image_stem))  # type: ignore[arg-type]
    labels = read_idx(_find(folder, label_stem))  # type: ignore[arg-type]
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{folder}/{image_stem}: images have shape {images.shape}; expected [N, 28, 28]; replace the files with copies of the official ones.")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{folder}: {labels.shape[0]} labels for {images.shape[0]} images; replace the files with copies of the official ones.")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{folder}/{label_stem}: labels outside 0..9; replace the files with copies of the official ones.")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
