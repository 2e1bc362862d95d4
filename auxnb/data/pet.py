"""Oxford-IIIT Pet (Parkhi et al. 2012): 37 breeds, the official trainval / test lists, images resized at load.

Reads ``annotations/trainval.txt`` and ``annotations/test.txt`` (torchvision's layout) and the
JPEGs (some are grey, CMYK or PNG inside: all become RGB). A missing file is an error naming
the layout and ``AUXNB_DATA``; nothing is substituted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from auxnb.data.cub import _cached_images
from auxnb.data.text import bad_line
from auxnb.data.sources import data_root, missing_dataset_error

__all__ = ["PET_FOLDER", "PetData", "load_pet", "parse_pet_list"]

PET_FOLDER = "oxford-iiit-pet"
_LAYOUT = ["annotations/trainval.txt", "annotations/test.txt", "images/<image name>.jpg"]
_URLS = (
    ("https://thor.robots.ox.ac.uk/~vgg/data/pets/images.tar.gz", "5c4f3ee8e5d25df40f4fd59a7f44e54c"),
    ("https://thor.robots.ox.ac.uk/~vgg/data/pets/annotations.tar.gz", "95a8c909bbe2e81eed6a22bccdf3f68f"),
)


def parse_pet_list(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """Rows ``<image name> <class id 1..37> <species 1 cat / 2 dog> <breed id>`` -> ``(name, class-1, species-1)``.

    Lines starting with ``#`` (the header of ``list.txt``) and blank lines are skipped.
    """
    rows = []
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split()
            expected = "'<name> <class id> <species> <breed id>'"
            if len(parts) < 3:
                raise bad_line(path, number, line, f"{len(parts)} fields where 4 are expected", expected)
            if "\x00" in line:
                raise bad_line(path, number, line.replace("\x00", ""), "NUL bytes (a damaged file)", expected)
            try:
                rows.append((parts[0], int(parts[1]) - 1, int(parts[2]) - 1))
                if not 0 <= rows[-1][1] < 37 or rows[-1][2] not in (0, 1):
                    raise bad_line(path, number, line, f"class id {parts[1]} (1..37) or species {parts[2]} (1 cat, 2 dog) "
                                   "out of range", expected)
            except ValueError as err:
                if str(err).startswith(str(path)):
                    raise
                if not rows and not parts[1].lstrip("-").isdigit() and not parts[2].lstrip("-").isdigit():
                    continue  # a header line without the leading '#'
                raise bad_line(path, number, line, "a class id or species that is not an integer", expected) from None
    return rows


@dataclass
class PetData:
    """Oxford-IIIT Pet in memory: trainval rows first, then test rows.

    Attributes:
        names: image names (file ``images/<name>.jpg``).
        labels: breed, long ``[N]`` in ``0..36``. species: long ``[N]``, 0 cat, 1 dog.
        classes: breed names in label order (from the image names: ``"Abyssinian"``,
            ``"american_bulldog"``; capitalised names are cats).
        is_trainval: bool ``[N]``: the official trainval (3,680) vs test (3,669) lists.
        images: uint8 ``[N, 3, S, S]`` or ``None`` when not loaded.
    """

    names: list[str]
    labels: Tensor
    species: Tensor
    classes: tuple[str, ...]
    is_trainval: Tensor
    images: Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)


def load_pet(
    root: str | os.PathLike | None = None,
    *,
    image_size: int | None = 256,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    download: bool = False,
) -> PetData:
    """Load Oxford-IIIT Pet from ``<root>/oxford-iiit-pet/`` (the folder torchvision's download makes).

    Args:
        image_size: images resized to ``image_size × image_size`` (MAOAL supplement §2.2: same
            preprocessing as CUB, 256 then random 224 crops); ``None`` skips the images.
        cache_dir: keep the resized images there (``pet-<size>.pt``) for the next load.
        download: fetch the official archives when files are missing (needs internet).
    """
    base = data_root(root)
    folder = base / PET_FOLDER
    lists = [folder / "annotations" / "trainval.txt", folder / "annotations" / "test.txt"]
    if download and not all(p.is_file() for p in lists):
        from torchvision.datasets.utils import download_and_extract_archive

        for url, md5 in _URLS:
            download_and_extract_archive(url, download_root=str(folder), md5=md5)
    if not all(p.is_file() for p in lists):
        raise missing_dataset_error(PET_FOLDER, _LAYOUT, root)
    trainval, test = parse_pet_list(lists[0]), parse_pet_list(lists[1])
    rows = trainval + test
    n_classes = max(r[1] for r in rows) + 1 if rows else 0
    classes = [""] * n_classes
    for name, label, _ in rows:
        breed = name.rsplit("_", 1)[0]
        if classes[label] and classes[label] != breed:
            raise ValueError(f"Class id {label + 1} names two breeds: {classes[label]!r} and {breed!r}.")
        classes[label] = breed
    data = PetData(
        names=[r[0] for r in rows],
        labels=torch.tensor([r[1] for r in rows], dtype=torch.long),
        species=torch.tensor([r[2] for r in rows], dtype=torch.long),
        classes=tuple(classes),
        is_trainval=torch.tensor([True] * len(trainval) + [False] * len(test)),
    )
    if image_size is not None:
        data.images = _cached_images(
            [folder / "images" / f"{name}.jpg" for name in data.names], image_size, cache_dir, f"pet-{image_size}.pt", workers
        )
    return data
