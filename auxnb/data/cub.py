"""CUB-200-2011 (Wah et al. 2011): bird species, the 312 binary attributes, and attribute groups.

Reads the dataset's own text files (keeping the first four tokens of every attribute line, as
some lines carry extra fields: no row is ever dropped) and its JPEGs, resized at load time.
A missing file is an error naming the layout and ``AUXNB_DATA``; nothing is substituted.
"""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from auxnb.data.text import bad_line, read_rows
from auxnb.data.sources import data_root, missing_dataset_error
from auxnb.tasks import MISSING_CLASS

__all__ = ["CUB_FOLDER", "MAOAL_GROUPS", "CubData", "load_cub", "read_images", "parse_attribute_labels"]

CUB_FOLDER = "CUB_200_2011"
#: The two attribute groups of MAOAL's CUB experiment (supplement §2.1: wing colour and bill shape).
MAOAL_GROUPS = ("has_wing_color", "has_bill_shape")
_LAYOUT = [
    "images.txt",
    "image_class_labels.txt",
    "train_test_split.txt",
    "classes.txt",
    "attributes/image_attribute_labels.txt",
    "attributes/attributes.txt (or attributes.txt here, or one level up)",
    "images/<class folder>/<image>.jpg",
]
_URL = ("https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1", "97eceeb196236b17998738112f37df78")


def read_images(paths: Sequence[Path], size: int, workers: int | None = None) -> Tensor:
    """Decode images (any format PIL reads; grey, CMYK, RGBA all become RGB) resized to ``size × size``.

    Returns uint8 ``[N, 3, size, size]``. Decoding runs in a thread pool (PIL releases the GIL).
    """
    from PIL import Image

    def one(path: Path) -> np.ndarray:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size, size), Image.BILINEAR)
            return np.array(rgb, dtype=np.uint8).transpose(2, 0, 1)  # a writable copy

    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, arr in enumerate(pool.map(one, paths)):
            out[i] = torch.from_numpy(arr)
    return out


def _read_pairs(path: Path, integer: tuple[int, ...], expected: str) -> list[list[str]]:
    """Whitespace-separated rows of a CUB table (a header line tolerated, a bad line named)."""
    return [r for _, r in read_rows(path, min_width=max(integer) + 1 if integer else 1, integer=integer, expected=expected)]


def parse_attribute_labels(path: str | os.PathLike, num_images: int, num_attributes: int) -> tuple[Tensor, Tensor]:
    """``attributes/image_attribute_labels.txt`` -> ``(is_present, certainty)``, uint8 ``[N, A]``.

    Every line is ``<image id> <attribute id> <is_present> <certainty id> <time>``; some lines of
    the real file carry extra fields, so only the first four tokens are read; a header line is
    tolerated, any other bad line is an error naming it. Ids are 1-based. Every (image, attribute) pair must appear exactly once.

    Raises:
        ValueError: a line with fewer than four tokens, an id out of range, or pairs missing or repeated.
    """
    path = Path(path)
    present = np.zeros((num_images, num_attributes), dtype=np.uint8)
    certainty = np.zeros((num_images, num_attributes), dtype=np.uint8)
    seen = np.zeros((num_images, num_attributes), dtype=np.int32)
    records = 0  # data lines read (-1 once a header line was skipped)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            expected = "'<image id> <attribute id> <is_present> <certainty id> <time>'"
            if "\x00" in line:
                raise bad_line(path, number, line.replace("\x00", ""), "NUL bytes (a damaged file)", expected)
            if len(parts) < 4:
                raise bad_line(path, number, line, f"{len(parts)} fields where at least 4 are expected", expected)
            try:
                img, att, pres, cert = (int(float(p)) for p in parts[:4])
            except ValueError:
                if not records:
                    records = -1  # the first non-blank line is a header: skip it, once
                    continue
                raise bad_line(path, number, line, "a non-number among the first 4 fields", expected) from None
            if not (1 <= img <= num_images and 1 <= att <= num_attributes):
                raise bad_line(path, number, line, f"image {img} / attribute {att} is outside 1..{num_images} / "
                               f"1..{num_attributes}", expected)
            if pres not in (0, 1):
                raise bad_line(path, number, line, f"is_present {pres} is not 0 or 1", expected)
            if not 1 <= cert <= 4:
                raise bad_line(path, number, line, f"certainty id {cert} is outside 1..4 (CUB's certainties.txt)", expected)
            records = max(records, 0) + 1
            present[img - 1, att - 1] = pres
            certainty[img - 1, att - 1] = cert
            seen[img - 1, att - 1] += 1
    if (seen != 1).any():
        missing, repeated = int((seen == 0).sum()), int((seen > 1).sum())
        raise ValueError(
            f"{path}: every (image, attribute) pair must appear once; {missing} are missing and {repeated} repeated."
        )
    return torch.from_numpy(present), torch.from_numpy(certainty)


@dataclass
class CubData:
    """CUB-200-2011 in memory, in the order of ``images.txt``.

    Attributes:
        image_ids: the dataset's 1-based image ids (long ``[N]``).
        paths: image paths relative to ``images/``.
        labels: species, long ``[N]`` in ``0..C-1`` (``image_class_labels.txt`` minus 1).
        classes: species names in label order (``classes.txt``).
        is_train: bool ``[N]`` from ``train_test_split.txt`` (the official 5,994 / 5,794 split).
        attributes: uint8 ``[N, A]`` (A = 312): 1 where the annotator marked the attribute present.
        certainty: uint8 ``[N, A]``: 1 not visible, 2 guessing, 3 probably, 4 definitely.
        attribute_names: e.g. ``"has_bill_shape::dagger"`` in attribute-id order.
        images: uint8 ``[N, 3, S, S]`` resized at load time, or ``None`` when not loaded.
    """

    image_ids: Tensor
    paths: list[str]
    labels: Tensor
    classes: tuple[str, ...]
    is_train: Tensor
    attributes: Tensor
    certainty: Tensor
    attribute_names: tuple[str, ...]
    images: Tensor | None = None
    root: Path | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def attribute_groups(self) -> dict[str, list[int]]:
        """Group name (the part before ``::``) -> attribute columns (0-based), in id order."""
        groups: dict[str, list[int]] = {}
        for col, name in enumerate(self.attribute_names):
            groups.setdefault(name.split("::", 1)[0], []).append(col)
        return groups

    def group_labels(self, group: str) -> tuple[Tensor, tuple[str, ...]]:
        """One attribute group as a multi-class label (MAOAL's "wing colour" / "bill shape" tasks).

        The label is the group's value marked present with the highest certainty (ties: the lower
        attribute id); an image with no value of the group marked present gets ``MISSING_CLASS``
        (its auxiliary loss is masked, the image is kept).

        Returns:
            ``(labels, values)``: long ``[N]`` in ``0..len(values)-1`` or -1, and the value names.
        """
        groups = self.attribute_groups()
        if group not in groups:
            raise KeyError(f"Unknown attribute group {group!r}; groups are {sorted(groups)}.")
        cols = torch.tensor(groups[group])
        present = self.attributes[:, cols].bool()
        score = (self.certainty[:, cols].long() + 1) * present.long()  # 0 where absent
        best = score.argmax(1)  # argmax returns the first maximum: the lower attribute id on ties
        labels = torch.where(present.any(1), best, torch.full_like(best, MISSING_CLASS))
        values = tuple(self.attribute_names[c].split("::", 1)[1] for c in groups[group])
        return labels, values


def _attributes_txt(folder: Path) -> Path | None:
    for candidate in (folder / "attributes" / "attributes.txt", folder / "attributes.txt", folder.parent / "attributes.txt"):
        if candidate.is_file():
            return candidate
    return None


def load_cub(
    root: str | os.PathLike | None = None,
    *,
    image_size: int | None = 256,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    download: bool = False,
) -> CubData:
    """Load CUB-200-2011 from ``<root>/CUB_200_2011/``.

    Args:
        root: the data root (default ``$AUXNB_DATA`` or ``~/.cache/auxnb``).
        image_size: images are resized to ``image_size × image_size`` at load time (MAOAL
            supplement §2.1: images brought to 256, randomly cropped to 224 for training);
            ``None`` skips the images (labels and attributes only).
        cache_dir: when given, the resized images are saved there (``cub-<size>.pt``) and read
            back next time instead of decoding 11,788 JPEGs again.
        download: fetch the official archive when files are missing (needs internet).
    """
    base = data_root(root)
    folder = base / CUB_FOLDER
    required = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt",
                "attributes/image_attribute_labels.txt"]
    if download and any(not (folder / r).is_file() for r in required):
        from torchvision.datasets.utils import download_and_extract_archive

        base.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(_URL[0], download_root=str(base), filename="CUB_200_2011.tgz", md5=_URL[1])
    attributes_txt = _attributes_txt(folder)
    if any(not (folder / r).is_file() for r in required) or attributes_txt is None:
        raise missing_dataset_error(CUB_FOLDER, _LAYOUT, root)

    images_rows = _read_pairs(folder / "images.txt", (0,), "'<image id> <image path>'")
    image_ids = [int(r[0]) for r in images_rows]
    paths = [r[1] for r in images_rows]
    n = len(image_ids)
    if image_ids != list(range(1, n + 1)):
        raise ValueError(f"{folder / 'images.txt'}: image ids must run 1..N in order.")
    labels_by_id = {int(r[0]): int(r[1]) for r in _read_pairs(folder / "image_class_labels.txt", (0, 1), "'<image id> <class id>'")}
    split_by_id = {int(r[0]): int(r[1]) for r in _read_pairs(folder / "train_test_split.txt", (0, 1),
                                                             "'<image id> <is_training_image>'")}
    for name, table in (("image_class_labels.txt", labels_by_id), ("train_test_split.txt", split_by_id)):
        if set(table) != set(image_ids):
            raise ValueError(f"{folder / name} does not cover exactly the {n} images of images.txt.")
    classes_rows = _read_pairs(folder / "classes.txt", (0,), "'<class id> <class name>'")
    classes = tuple(r[1] for r in sorted(classes_rows, key=lambda r: int(r[0])))
    labels = torch.tensor([labels_by_id[i] - 1 for i in image_ids], dtype=torch.long)
    if n and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
        raise ValueError(f"{folder / 'image_class_labels.txt'}: class ids outside 1..{len(classes)}.")
    attribute_rows = _read_pairs(attributes_txt, (0,), "'<attribute id> <attribute name>'")
    attribute_names = tuple(r[1] for r in sorted(attribute_rows, key=lambda r: int(r[0])))
    present, certainty = parse_attribute_labels(
        folder / "attributes" / "image_attribute_labels.txt", n, len(attribute_names)
    )
    data = CubData(
        image_ids=torch.tensor(image_ids, dtype=torch.long),
        paths=paths,
        labels=labels,
        classes=classes,
        is_train=torch.tensor([split_by_id[i] == 1 for i in image_ids]),
        attributes=present,
        certainty=certainty,
        attribute_names=attribute_names,
        root=folder,
    )
    if image_size is not None:
        data.images = _cached_images(
            [folder / "images" / p for p in paths], image_size, cache_dir, f"cub-{image_size}.pt", workers
        )
    return data


def _cached_images(paths: list[Path], size: int, cache_dir, name: str, workers: int | None) -> Tensor:
    # the file name carries a checksum of the image list, so another copy of the data (or a
    # fixture) never reads a cache made from different files
    digest = zlib.crc32("\n".join(str(p) for p in paths).encode())
    cache = Path(cache_dir) / f"{Path(name).stem}-{digest:08x}.pt" if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            images = torch.load(cache, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache (cut short, a flipped bit): it is rebuilt from the images below
            images = None
        if isinstance(images, Tensor) and images.shape == (len(paths), 3, size, size) and images.dtype == torch.uint8:
            return images
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image file(s) listed in the dataset's index are missing, e.g. {missing[0]}; "
            "unpack the full archive (images included)."
        )
    images = read_images(paths, size, workers)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        import io

        from auxnb.checkpoint import write_bytes

        buffer = io.BytesIO()
        torch.save(images, buffer)
        # atomic through a writer-unique temporary: a killed run never leaves half a cache behind, two
        # runs filling one cache never collide, a full disk says so and leaves nothing
        write_bytes(cache, buffer.getvalue())
    return images
