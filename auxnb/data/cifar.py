"""CIFAR-10 and CIFAR-100 from the original python pickles (CIFAR-100 with fine and coarse labels).

Reads the files of the official "python version" archives; ``download=True`` fetches them with
torchvision's download utilities. A missing file is an error naming the layout and ``AUXNB_DATA``;
nothing here substitutes other data.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from auxnb.data.sources import data_root, missing_dataset_error

__all__ = [
    "CIFAR10_FOLDER",
    "CIFAR100_FOLDER",
    "CIFAR10_CLASSES",
    "CIFAR100_COARSE",
    "CIFAR100_FINE",
    "CIFAR100_SUPERCLASSES",
    "CifarSplit",
    "load_cifar10",
    "load_cifar100",
    "download_cifar",
]

#: Folders the official archives unpack into (under the data root).
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
_CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
_CIFAR100_FILES = ["train", "test", "meta"]
_URLS = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}

#: CIFAR-10 class names in label order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

#: CIFAR-100 superclass (coarse label) -> its five classes, as listed by the dataset's authors.
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
#: Coarse label names in label order (alphabetical, as in the archive's ``meta``).
CIFAR100_COARSE = tuple(sorted(CIFAR100_SUPERCLASSES))
#: Fine label names in label order (alphabetical, as in the archive's ``meta``).
CIFAR100_FINE = tuple(sorted(name for names in CIFAR100_SUPERCLASSES.values() for name in names))


@dataclass
class CifarSplit:
    """One split of CIFAR: uint8 images ``[N, 3, 32, 32]`` and label tensors.

    Attributes:
        images: uint8 ``[N, 3, 32, 32]`` (RGB, channel-first as stored in the pickles).
        labels: long ``[N]``: the class (CIFAR-10) or the fine class (CIFAR-100).
        coarse: long ``[N]``: the superclass (CIFAR-100 only, else ``None``).
        classes: class names in label order; coarse_classes: superclass names (CIFAR-100).
    """

    images: Tensor
    labels: Tensor
    classes: tuple[str, ...]
    coarse: Tensor | None = None
    coarse_classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def _key(k: Any) -> str:
    return k.decode("latin-1") if isinstance(k, bytes) else str(k)


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3's protocol-2 pickles of ``bytes`` call ``_codecs.encode(text, "latin1")``; only
    # that codec is admitted (a codec lookup by name could import other modules).
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode called with encoding {encoding!r}; only 'latin1' is admitted")
    return text.encode("latin-1")


def _numpy_reconstruct():
    try:  # numpy >= 2
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


#: The only globals a CIFAR "python version" batch references: numpy array reconstruction
#: (module ``numpy.core.multiarray`` when written by Python 2 / numpy 1, ``numpy._core.multiarray``
#: by numpy 2), ``numpy.ndarray``, ``numpy.dtype``, and ``_codecs.encode`` (bytes written by
#: Python 3 at protocol 2). Dicts, lists, ints, str and bytes need no global.
_CIFAR_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """Admits only what CIFAR batch files hold; any other global (code) is refused unloaded."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        factory = _CIFAR_GLOBALS.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"{self._path} references {module}.{name}, which a CIFAR batch never holds: the file was not "
                "written as a CIFAR batch and may try to run code, so it was not loaded. Delete it and unpack "
                "the official archive again (or pass download=True / --set download=True)."
            )
        return factory()


def _unpickle(path: Path) -> dict[str, Any]:
    """Read one CIFAR batch without running code (a restricted unpickler; see `_CIFAR_GLOBALS`).

    The archives were pickled by Python 2: byte-string keys and values. encoding="bytes" reads
    them without guessing a text encoding; keys are then decoded here.
    """
    try:
        raw = _CifarUnpickler(io.BytesIO(path.read_bytes()), path).load()
    except pickle.UnpicklingError as err:
        if str(err).startswith(str(path)):
            raise ValueError(str(err)) from None
        raise ValueError(
            f"{path} is not a readable CIFAR batch ({err}); the file is damaged or truncated. "
            "Delete it and unpack the official archive again."
        ) from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError, OverflowError) as err:
        raise ValueError(
            f"{path} is not a readable CIFAR batch ({type(err).__name__}: {err}); the file is damaged or "
            "truncated. Delete it and unpack the official archive again."
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a CIFAR batch dictionary (got {type(raw).__name__}); the file is damaged "
                         "or not a CIFAR batch. Delete it and unpack the official archive again.")
    return {_key(k): v for k, v in raw.items()}


def _names(values: Any) -> tuple[str, ...]:
    return tuple(_key(v) for v in values)


def _images(batch: dict[str, Any], path: Path) -> Tensor:
    if "data" not in batch:
        raise ValueError(f"{path} has no 'data' entry; keys are {sorted(batch)}. Unpack the official archive again.")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: 'data' has shape {data.shape}; expected [N, 3072] (3 x 32 x 32 per row). The file is "
                         "damaged or not CIFAR: unpack the official archive again.")
    # each row holds the red plane, then green, then blue, each row-major 32 x 32
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())


def _labels(batch: dict[str, Any], key: str, rows: int, path: Path) -> Tensor:
    """The batch's `key` labels as long ``[rows]``: one integer per image row, else an error naming the file."""
    if key not in batch:
        raise ValueError(f"{path} has no {key!r} entry; keys are {sorted(batch)}. Unpack the official archive again.")
    try:
        values = np.asarray(batch[key])
        if values.dtype.kind not in "iu" and values.size:
            raise TypeError(values.dtype)
        values = values.astype(np.int64).reshape(-1)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{path}: {key!r} does not hold integer labels; unpack the official archive again.") from None
    if len(values) != rows:
        raise ValueError(
            f"{path}: {len(values)} {key} for {rows} images (each image row needs one label): the file is damaged "
            "or cut short; unpack the official archive again."
        )
    return torch.from_numpy(values)


def _resolve(root: str | os.PathLike | None, folder: str, files: list[str], name: str, download: bool) -> Path:
    base = data_root(root)
    path = base / folder
    missing = [f for f in files if not (path / f).is_file()]
    if missing and download:
        download_cifar(name, base)
        missing = [f for f in files if not (path / f).is_file()]
    if missing:
        raise missing_dataset_error(folder, files, base)
    return path


def download_cifar(name: str, root: str | os.PathLike | None = None) -> Path:
    """Fetch and unpack the official archive of ``"cifar10"`` or ``"cifar100"`` into the data root.

    Needs internet; uses torchvision's ``download_and_extract_archive`` (checks the MD5).
    """
    if name not in _URLS:
        raise ValueError(f"Unknown CIFAR name {name!r}; use 'cifar10' or 'cifar100'.")
    from torchvision.datasets.utils import download_and_extract_archive

    url, md5 = _URLS[name]
    base = data_root(root)
    made = not base.exists()
    base.mkdir(parents=True, exist_ok=True)
    try:
        download_and_extract_archive(url, download_root=str(base), md5=md5)
    except OSError as err:  # URLError, a timeout, a full disk
        if made and not any(base.iterdir()):
            base.rmdir()  # a failed download leaves nothing behind
        raise ConnectionError(
            f"Could not download {name} from {url} ({getattr(err, 'reason', err)}). Check the internet "
            f"connection, or fetch that archive elsewhere and unpack it under {base}."
        ) from None
    return base / (CIFAR10_FOLDER if name == "cifar10" else CIFAR100_FOLDER)


def load_cifar10(root: str | os.PathLike | None = None, split: str = "train", *, download: bool = False) -> CifarSplit:
    """CIFAR-10 from ``<root>/cifar-10-batches-py/`` (data_batch_1..5, test_batch, batches.meta).

    Args:
        root: the data root (default ``$AUXNB_DATA`` or ``~/.cache/auxnb``).
        split: ``"train"`` (the five data batches, 50,000 images) or ``"test"`` (10,000).
        download: fetch the archive first when files are missing (needs internet).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    path = _resolve(root, CIFAR10_FOLDER, _CIFAR10_FILES, "cifar10", download)
    meta = _unpickle(path / "batches.meta")
    classes = _names(meta.get("label_names", CIFAR10_CLASSES))
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        batch = _unpickle(path / name)
        images.append(_images(batch, path / name))
        labels.append(_labels(batch, "labels", len(images[-1]), path / name))
    out = CifarSplit(torch.cat(images), torch.cat(labels), classes)
    _check_range(out.labels, len(classes), path / names[0], "labels")
    return out


def load_cifar100(root: str | os.PathLike | None = None, split: str = "train", *, download: bool = False) -> CifarSplit:
    """CIFAR-100 from ``<root>/cifar-100-python/`` (train, test, meta) with fine *and* coarse labels.

    torchvision's CIFAR100 exposes only the fine labels; the pickles hold both, so they are read
    here directly. ``coarse`` gives each image's superclass (20), ``labels`` its class (100).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    path = _resolve(root, CIFAR100_FOLDER, _CIFAR100_FILES, "cifar100", download)
    meta = _unpickle(path / "meta")
    batch = _unpickle(path / split)
    for key in ("fine_labels", "coarse_labels"):
        if key not in batch:
            raise ValueError(f"{path / split} has no {key!r}; keys are {sorted(batch)}. Unpack the official archive again.")
    images = _images(batch, path / split)
    out = CifarSplit(
        images,
        _labels(batch, "fine_labels", len(images), path / split),
        _names(meta.get("fine_label_names", CIFAR100_FINE)),
        _labels(batch, "coarse_labels", len(images), path / split),
        _names(meta.get("coarse_label_names", CIFAR100_COARSE)),
    )
    _check_range(out.labels, len(out.classes), path / split, "fine_labels")
    _check_range(out.coarse, len(out.coarse_classes or ()), path / split, "coarse_labels")
    return out


def _check_range(labels: Tensor | None, n: int, path: Path, what: str) -> None:
    if labels is None or not len(labels):
        return
    if int(labels.min()) < 0 or int(labels.max()) >= n:
        raise ValueError(f"{path}: {what} range over [{int(labels.min())}, {int(labels.max())}] but there are {n} names; "
                         "the file is damaged or from another dataset: unpack the official archive again.")
