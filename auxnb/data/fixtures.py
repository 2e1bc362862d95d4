"""Tiny fixture files in each dataset's exact on-disk format, for tests and ``smoke`` runs.

Every writer makes a few files exactly as the real dataset lays them out (CIFAR pickles, CUB
text files with the malformed attribute lines and JPEGs, Pet lists, IDX, MovieLens latin-1
text, Amazon json.gz with Python dict literals) and returns what it wrote, as the truth tests
check loaders against. The contents are synthetic: never present them as the real dataset.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from auxnb.data.cifar import CIFAR10_CLASSES, CIFAR100_COARSE, CIFAR100_FINE, CIFAR100_SUPERCLASSES

__all__ = [
    "FIXTURE_NOTE",
    "CUB_ATTRIBUTE_GROUPS",
    "cub_attribute_names",
    "write_cifar10",
    "write_cifar100",
    "write_cub",
    "write_pet",
    "write_fashion_mnist",
    "write_movielens_100k",
    "write_movielens_1m",
    "write_amazon",
    "fixture_root",
    "WRITERS",
]

#: What every fixture-backed run says about its data.
FIXTURE_NOTE = "FIXTURE: tiny synthetic files in the dataset's format, not the real dataset"

_COLOURS = ("blue", "brown", "iridescent", "purple", "rufous", "grey", "yellow", "olive", "green", "pink",
            "orange", "black", "white", "red", "buff")
_PATTERNS = ("solid", "spotted", "striped", "multi-colored")
#: CUB-200-2011's 28 attribute groups and their values, in attribute-id order (312 in all).
CUB_ATTRIBUTE_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("has_bill_shape", ("curved_(up_or_down)", "dagger", "hooked", "needle", "hooked_seabird", "spatulate",
                        "all-purpose", "cone", "specialized")),
    ("has_wing_color", _COLOURS),
    ("has_upperparts_color", _COLOURS),
    ("has_underparts_color", _COLOURS),
    ("has_breast_pattern", _PATTERNS),
    ("has_back_color", _COLOURS),
    ("has_tail_shape", ("forked_tail", "rounded_tail", "notched_tail", "fan-shaped_tail", "pointed_tail",
                        "squared_tail")),
    ("has_upper_tail_color", _COLOURS),
    ("has_head_pattern", ("spotted", "malar", "crested", "masked", "unique_pattern", "eyebrow", "eyering",
                          "plain", "eyeline", "striped", "capped")),
    ("has_breast_color", _COLOURS),
    ("has_throat_color", _COLOURS),
    ("has_eye_color", tuple(c for c in _COLOURS if c != "iridescent")),
    ("has_bill_length", ("about_the_same_as_head", "longer_than_head", "shorter_than_head")),
    ("has_forehead_color", _COLOURS),
    ("has_under_tail_color", _COLOURS),
    ("has_nape_color", _COLOURS),
    ("has_belly_color", _COLOURS),
    ("has_wing_shape", ("rounded-wings", "pointed-wings", "broad-wings", "tapered-wings", "long-wings")),
    ("has_size", ("large_(16_-_32_in)", "small_(5_-_9_in)", "very_large_(32_-_72_in)", "medium_(9_-_16_in)",
                  "very_small_(3_-_5_in)")),
    ("has_shape", ("upright-perching_water-like", "chicken-like-marsh", "long-legged-like", "duck-like",
                   "owl-like", "gull-like", "hummingbird-like", "pigeon-like", "tree-clinging-like", "hawk-like",
                   "sandpiper-like", "upland-ground-like", "swallow-like", "perching-like")),
    ("has_back_pattern", _PATTERNS),
    ("has_tail_pattern", _PATTERNS),
    ("has_belly_pattern", _PATTERNS),
    ("has_primary_color", _COLOURS),
    ("has_leg_color", _COLOURS),
    ("has_bill_color", _COLOURS),
    ("has_crown_color", _COLOURS),
    ("has_wing_pattern", _PATTERNS),
)


def cub_attribute_names() -> list[str]:
    """The 312 attribute names ``group::value`` in id order (as in CUB's attributes.txt)."""
    return [f"{group}::{value}" for group, values in CUB_ATTRIBUTE_GROUPS for value in values]


# --------------------------------------------------------------------------- images
def _prototypes(num_classes: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """One coarse random pattern per class ([C, channels, 4, 4] in 40..215): classes are separable."""
    return rng.uniform(40, 215, size=(num_classes, channels, 4, 4))


def _class_images(labels: np.ndarray, size: tuple[int, int], channels: int, rng: np.random.Generator,
                  protos: np.ndarray) -> np.ndarray:
    """uint8 [N, channels, H, W]: each image its class pattern (upsampled 4x4) plus pixel noise."""
    h, w = size
    rows = np.minimum(np.arange(h) * 4 // h, 3)
    cols = np.minimum(np.arange(w) * 4 // w, 3)
    base = protos[labels][:, :, rows][:, :, :, cols]
    noisy = base + rng.normal(0, 20, size=base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _labels(per_class: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    labels = np.repeat(np.arange(num_classes), per_class)
    rng.shuffle(labels)
    return labels


def _save_jpeg(array_chw: np.ndarray, path: Path, mode: str = "RGB", fmt: str = "JPEG") -> None:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(array_chw.transpose(1, 2, 0)), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


# --------------------------------------------------------------------------- CIFAR
def _pickle(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the archives were written by Python 2 (protocol 2)


def write_cifar10(root: str | os.PathLike, *, train_per_class: int = 6, test_per_class: int = 4, seed: int = 0) -> dict:
    """``<root>/cifar-10-batches-py/``: data_batch_1..5, test_batch, batches.meta (byte-string keys).

    Returns ``{"folder", "classes", "train_labels", "test_labels", "train_images", "test_images"}``.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    protos = _prototypes(10, 3, rng)
    train_labels, test_labels = _labels(train_per_class, 10, rng), _labels(test_per_class, 10, rng)
    train = _class_images(train_labels, (32, 32), 3, rng, protos)
    test = _class_images(test_labels, (32, 32), 3, rng, protos)
    for i, part in enumerate(np.array_split(np.arange(len(train_labels)), 5), start=1):
        _pickle({
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": [int(v) for v in train_labels[part]],
            b"data": train[part].reshape(len(part), -1),
            b"filenames": [f"fixture_{j}.png".encode() for j in part],
        }, folder / f"data_batch_{i}")
    _pickle({b"batch_label": b"testing batch 1 of 1", b"labels": [int(v) for v in test_labels],
             b"data": test.reshape(len(test), -1), b"filenames": [f"test_{j}.png".encode() for j in range(len(test))]},
            folder / "test_batch")
    _pickle({b"num_cases_per_batch": len(train_labels) // 5, b"label_names": [c.encode() for c in CIFAR10_CLASSES],
             b"num_vis": 3072}, folder / "batches.meta")
    return {"folder": folder, "classes": CIFAR10_CLASSES, "train_labels": train_labels, "test_labels": test_labels,
            "train_images": train, "test_images": test}


def write_cifar100(root: str | os.PathLike, *, train_per_class: int = 2, test_per_class: int = 2, seed: int = 0) -> dict:
    """``<root>/cifar-100-python/``: train, test (fine_labels and coarse_labels), meta.

    Fine and coarse labels follow the real dataset's superclass structure.
    Returns ``{"folder", "fine", "coarse", "fine_of" (fine -> coarse), "train_fine", "train_coarse",
    "test_fine", "test_coarse", "train_images", "test_images"}``.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    fine_to_coarse = np.array(
        [CIFAR100_COARSE.index(next(c for c, f in CIFAR100_SUPERCLASSES.items() if name in f)) for name in CIFAR100_FINE]
    )
    protos = _prototypes(100, 3, rng)
    out: dict[str, Any] = {"folder": folder, "fine": CIFAR100_FINE, "coarse": CIFAR100_COARSE, "fine_of": fine_to_coarse}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = _labels(per_class, 100, rng)
        images = _class_images(fine, (32, 32), 3, rng, protos)
        _pickle({
            b"filenames": [f"{split}_{j}.png".encode() for j in range(len(fine))],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": [int(v) for v in fine],
            b"coarse_labels": [int(fine_to_coarse[v]) for v in fine],
            b"data": images.reshape(len(fine), -1),
        }, folder / split)
        out[f"{split}_fine"], out[f"{split}_coarse"], out[f"{split}_images"] = fine, fine_to_coarse[fine], images
    _pickle({b"fine_label_names": [n.encode() for n in CIFAR100_FINE],
             b"coarse_label_names": [n.encode() for n in CIFAR100_COARSE]}, folder / "meta")
    return out


# --------------------------------------------------------------------------- CUB
def write_cub(
    root: str | os.PathLike,
    *,
    num_classes: int = 4,
    train_per_class: int = 3,
    test_per_class: int = 3,
    image_size: tuple[int, int] = (40, 32),
    attributes_txt: str = "top",
    malformed_every: int = 97,
    seed: int = 0,
) -> dict:
    """``<root>/CUB_200_2011/`` with CUB's text files and JPEGs (``images/<class>/<name>.jpg``).

    Args:
        attributes_txt: where attributes.txt goes: ``"top"`` (next to the ``CUB_200_2011``
            folder, as the official archive has it), ``"inside"`` (``CUB_200_2011/attributes.txt``)
            or ``"attributes"`` (``CUB_200_2011/attributes/attributes.txt``).
        malformed_every: every this many lines of image_attribute_labels.txt carries an extra
            field after the fourth (as some lines of the real file do); 0: none.

    Returns ``{"folder", "classes", "labels", "is_train", "attributes", "certainty",
    "attribute_names", "malformed_lines"}`` (labels 0-based, in image-id order).
    """
    rng = np.random.default_rng(seed)
    base = Path(root)
    folder = base / "CUB_200_2011"
    (folder / "attributes").mkdir(parents=True, exist_ok=True)
    classes = [f"{c + 1:03d}.Fixture_Bird_{c + 1}" for c in range(num_classes)]
    names = cub_attribute_names()
    per_class = train_per_class + test_per_class
    labels = np.repeat(np.arange(num_classes), per_class)
    is_train = np.tile(np.r_[np.ones(train_per_class, bool), np.zeros(test_per_class, bool)], num_classes)
    n = len(labels)
    # attributes depend on the species (a per-class presence probability), as in the real data
    p_class = rng.uniform(0.05, 0.6, size=(num_classes, len(names)))
    attributes = (rng.uniform(size=(n, len(names))) < p_class[labels]).astype(np.uint8)
    certainty = rng.integers(1, 5, size=(n, len(names))).astype(np.uint8)
    attributes[0, 9:24] = 0  # image 1: no wing colour marked -> a missing group label
    attributes[1, 9:24] = 0
    attributes[1, [10, 20]] = 1  # image 2: two wing colours; the more certain one (col 20) wins
    certainty[1, [10, 20]] = (2, 4)
    protos = _prototypes(num_classes, 3, rng)
    pixels = _class_images(labels, (image_size[1], image_size[0]), 3, rng, protos)
    with open(folder / "classes.txt", "w") as f:
        f.writelines(f"{c + 1} {name}\n" for c, name in enumerate(classes))
    lines_images, lines_labels, lines_split = [], [], []
    for i in range(n):
        rel = f"{classes[labels[i]]}/Fixture_Bird_{i + 1:04d}.jpg"
        lines_images.append(f"{i + 1} {rel}\n")
        lines_labels.append(f"{i + 1} {labels[i] + 1}\n")
        lines_split.append(f"{i + 1} {int(is_train[i])}\n")
        _save_jpeg(pixels[i], folder / "images" / rel, mode="L" if i == 2 else "RGB")  # one grey JPEG
    (folder / "images.txt").write_text("".join(lines_images))
    (folder / "image_class_labels.txt").write_text("".join(lines_labels))
    (folder / "train_test_split.txt").write_text("".join(lines_split))
    malformed = []
    with open(folder / "attributes" / "image_attribute_labels.txt", "w") as f:
        number = 0
        for i in range(n):
            for a in range(len(names)):
                number += 1
                time = f"{rng.uniform(1, 30):.3f}"
                if malformed_every and number % malformed_every == 0:
                    f.write(f"{i + 1} {a + 1} {attributes[i, a]} {certainty[i, a]} 0 {time}\n")
                    malformed.append(number)
                else:
                    f.write(f"{i + 1} {a + 1} {attributes[i, a]} {certainty[i, a]} {time}\n")
    (folder / "attributes" / "certainties.txt").write_text("1 not visible\n2 guessing\n3 probably\n4 definitely\n")
    text = "".join(f"{a + 1} {name}\n" for a, name in enumerate(names))
    target = {"top": base / "attributes.txt", "inside": folder / "attributes.txt",
              "attributes": folder / "attributes" / "attributes.txt"}[attributes_txt]
    target.write_text(text)
    return {"folder": folder, "classes": tuple(classes), "labels": labels, "is_train": is_train,
            "attributes": attributes, "certainty": certainty, "attribute_names": tuple(names),
            "malformed_lines": malformed, "prototypes": protos}


# --------------------------------------------------------------------------- Pet
def write_pet(
    root: str | os.PathLike,
    *,
    breeds: tuple[str, ...] = ("Abyssinian", "Bengal", "american_bulldog", "beagle"),
    trainval_per_class: int = 3,
    test_per_class: int = 3,
    image_size: tuple[int, int] = (36, 30),
    seed: int = 0,
) -> dict:
    """``<root>/oxford-iiit-pet/``: annotations/{trainval,test,list}.txt and images/<name>.jpg.

    Capitalised breeds are cats (species 1), the others dogs (species 2), as in the real lists.
    One image is a grey JPEG and one a PNG stored under a .jpg name (both occur in the real set).
    Returns ``{"folder", "classes", "trainval" [(name, label, species)], "test" [...]}`` (0-based).
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "oxford-iiit-pet"
    (folder / "annotations").mkdir(parents=True, exist_ok=True)
    protos = _prototypes(len(breeds), 3, rng)
    species = [0 if b[0].isupper() else 1 for b in breeds]
    breed_ids = [sum(1 for b in breeds[: c + 1] if (b[0].isupper()) == (breeds[c][0].isupper())) for c in range(len(breeds))]
    rows: dict[str, list[tuple[str, int, int]]] = {"trainval": [], "test": []}
    k = 0
    for c, breed in enumerate(breeds):
        for split, count in (("trainval", trainval_per_class), ("test", test_per_class)):
            for _ in range(count):
                k += 1
                name = f"{breed}_{k}"
                pixels = _class_images(np.array([c]), (image_size[1], image_size[0]), 3, rng, protos)[0]
                path = folder / "images" / f"{name}.jpg"
                if k == 2:
                    _save_jpeg(pixels, path, mode="L")
                elif k == 3:
                    _save_jpeg(pixels, path, mode="RGBA", fmt="PNG")
                else:
                    _save_jpeg(pixels, path)
                rows[split].append((name, c, species[c]))
    for split in ("trainval", "test"):
        with open(folder / "annotations" / f"{split}.txt", "w") as f:
            f.writelines(f"{name} {c + 1} {s + 1} {breed_ids[c]}\n" for name, c, s in rows[split])
    with open(folder / "annotations" / "list.txt", "w") as f:
        f.write("#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n#SPECIES: 1:Cat 2:Dog\n")
        f.writelines(f"{name} {c + 1} {s + 1} {breed_ids[c]}\n" for name, c, s in rows["trainval"] + rows["test"])
    return {"folder": folder, "classes": breeds, "trainval": rows["trainval"], "test": rows["test"]}


# --------------------------------------------------------------------------- Fashion-MNIST
def _idx(array: np.ndarray, path: Path, compress: bool) -> Path:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}i", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)
    return path


def write_fashion_mnist(
    root: str | os.PathLike, *, train_per_class: int = 5, test_per_class: int = 3, compress: bool = True,
    folder: str = "fashion-mnist", seed: int = 0,
) -> dict:
    """``<root>/fashion-mnist/``: the four IDX files (``.gz`` when `compress`, else plain).

    Returns ``{"folder", "train_images", "train_labels", "test_images", "test_labels"}``.
    """
    rng = np.random.default_rng(seed)
    target = Path(root) / folder
    target.mkdir(parents=True, exist_ok=True)
    protos = _prototypes(10, 1, rng)
    out: dict[str, Any] = {"folder": target}
    for split, prefix, per_class in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
        labels = _labels(per_class, 10, rng)
        images = _class_images(labels, (28, 28), 1, rng, protos)[:, 0]
        _idx(images, target / f"{prefix}-images-idx3-ubyte", compress)
        _idx(labels.astype(np.uint8), target / f"{prefix}-labels-idx1-ubyte", compress)
        out[f"{split}_images"], out[f"{split}_labels"] = images, labels
    return out


# --------------------------------------------------------------------------- ratings
def _ratings(n_users: int, n_items: int, per_user: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
    """(user, item, stars, time) with 0-based ids; stars from a rank-2 model so they are learnable."""
    u = rng.normal(size=(n_users, 2))
    v = rng.normal(size=(n_items, 2))
    bias = rng.normal(0, 0.5, size=n_items)
    rows = []
    for user in range(n_users):
        for item in rng.choice(n_items, size=min(per_user, n_items), replace=False):
            score = 3.2 + 0.9 * float(u[user] @ v[item]) + bias[item] + rng.normal(0, 0.3)
            rows.append((user, int(item), int(np.clip(np.rint(score), 1, 5)), int(8.8e8 + rng.integers(0, 10**7))))
    # every star value occurs, so rating-3 filtering and CTR labels are exercised
    for k in range(min(5, len(rows))):
        user, item, _, t = rows[k]
        rows[k] = (user, item, k + 1, t)
    return rows


_TITLES = ("Toy Story (1995)", "Misérables, Les (1995)", "Café au lait (1993)", "Amélie (2001)", "Heat (1995)")
_OCCUPATIONS = ("administrator", "artist", "doctor", "educator", "engineer", "programmer", "student", "technician")
_ML1M_GENRES = ("Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
                "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")


def write_movielens_100k(
    root: str | os.PathLike, *, n_users: int = 30, n_items: int = 40, per_user: int = 12, seed: int = 0
) -> dict:
    """``<root>/ml-100k/``: u.data (tab-separated), u.user, u.item (latin-1, 5 + 19 genre flags), u.genre.

    Returns ``{"folder", "ratings" [(user id, item id, stars, time)] (1-based ids), "users"
    [(id, age, gender, occupation)], "items" [(id, title, first genre index)], "titles"}``.
    """
    from auxnb.data.movielens import ML100K_GENRES

    rng = np.random.default_rng(seed)
    folder = Path(root) / "ml-100k"
    folder.mkdir(parents=True, exist_ok=True)
    rows = _ratings(n_users, n_items, per_user, rng)
    (folder / "u.data").write_text("".join(f"{u + 1}\t{i + 1}\t{r}\t{t}\n" for u, i, r, t in rows))
    users = [(k + 1, int(rng.integers(7, 74)), "MF"[k % 2], _OCCUPATIONS[k % len(_OCCUPATIONS)]) for k in range(n_users)]
    (folder / "u.user").write_text("".join(f"{k}|{a}|{g}|{o}|{10000 + k}\n" for k, a, g, o in users))
    items = []
    lines = []
    for k in range(n_items):
        flags = (rng.uniform(size=len(ML100K_GENRES)) < 0.15).astype(int)
        if k == 0:
            flags[:] = 0  # no genre flag: category "unknown"
        title = _TITLES[k % len(_TITLES)] if k < len(_TITLES) else f"Fixture Movie {k + 1} (1990)"
        first = int(np.argmax(flags)) if flags.any() else 0
        items.append((k + 1, title, first))
        lines.append(f"{k + 1}|{title}|01-Jan-1995||http://fixture/{k + 1}|" + "|".join(map(str, flags)) + "\n")
    (folder / "u.item").write_bytes("".join(lines).encode("latin-1"))
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(ML100K_GENRES)) + "\n")
    (folder / "u.occupation").write_text("".join(f"{o}\n" for o in sorted(_OCCUPATIONS)))
    (folder / "u.info").write_text(f"{n_users} users\n{n_items} items\n{len(rows)} ratings\n")  # as the real u.info
    return {"folder": folder, "ratings": [(u + 1, i + 1, r, t) for u, i, r, t in rows], "users": users, "items": items,
            "titles": [t for _, t, _ in items]}


def write_movielens_1m(
    root: str | os.PathLike, *, n_users: int = 30, n_items: int = 40, per_user: int = 12, encoding: str = "latin-1",
    seed: int = 0,
) -> dict:
    """``<root>/ml-1m/``: ratings.dat, users.dat, movies.dat (``::``-separated) in `encoding`.

    The originals are latin-1; some copies were re-encoded to UTF-8 (``encoding="utf-8"``).
    Returns ``{"folder", "ratings" (1-based ids), "users" [(id, gender, age code, occupation)],
    "items" [(id, title, genres)]}``.
    """
    from auxnb.data.movielens import ML_AGE_GROUPS

    rng = np.random.default_rng(seed)
    folder = Path(root) / "ml-1m"
    folder.mkdir(parents=True, exist_ok=True)
    rows = _ratings(n_users, n_items, per_user, rng)
    (folder / "ratings.dat").write_text("".join(f"{u + 1}::{i + 1}::{r}::{t}\n" for u, i, r, t in rows))
    users = [(k + 1, "FM"[k % 2], int(ML_AGE_GROUPS[k % 7]), int(k % 21)) for k in range(n_users)]
    (folder / "users.dat").write_text("".join(f"{k}::{g}::{a}::{o}::{20000 + k}\n" for k, g, a, o in users))
    items = []
    for k in range(n_items):
        count = int(rng.integers(1, 4))
        genres = tuple(rng.choice(_ML1M_GENRES, size=count, replace=False))
        title = _TITLES[k % len(_TITLES)] if k < len(_TITLES) else f"Fixture Movie {k + 1} (1990)"
        items.append((k + 1, title, genres))
    text = "".join(f"{k}::{t}::{'|'.join(g)}\n" for k, t, g in items)
    (folder / "movies.dat").write_bytes(text.encode(encoding))
    return {"folder": folder, "ratings": [(u + 1, i + 1, r, t) for u, i, r, t in rows], "users": users, "items": items}


def write_amazon(
    root: str | os.PathLike, category: str = "Beauty", *, n_users: int = 30, n_items: int = 40, per_user: int = 10,
    seed: int = 0,
) -> dict:
    """``<root>/amazon/reviews_<category>_5.json.gz`` (JSON lines) and ``meta_<category>.json.gz``.

    The metadata lines are Python dict literals (``repr``: single quotes, as in the 2014 release).
    Item 0 has no metadata line, item 1 no ``categories`` key, item 2 a one-level path; extra
    metadata lines describe items nobody reviewed. Returns ``{"reviews_path", "meta_path",
    "reviews" [(reviewerID, asin, overall, time)], "categories" {asin: level-1 category}}``.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "amazon"
    folder.mkdir(parents=True, exist_ok=True)
    top = category.replace("_and_", " & ").replace("_", " ")
    rows = _ratings(n_users, n_items, per_user, rng)
    asins = [f"B{k:09d}" for k in range(n_items + 5)]
    reviewers = [f"A{k:05d}FIXTURE" for k in range(n_users)]
    reviews = [(reviewers[u], asins[i], float(r), t) for u, i, r, t in rows]
    subcats = ("Skin Care", "Makeup", "Hair Care", "Fragrance")
    categories: dict[str, str] = {}
    meta_lines = []
    for k, asin in enumerate(asins):
        if k == 0:
            continue  # no metadata at all
        record: dict[str, Any] = {"asin": asin, "title": f"Fixture's product n\u00b0{k}", "price": round(float(rng.uniform(1, 50)), 2),
                                  "salesRank": {top: int(rng.integers(1, 10**5))}}
        if k == 1:
            pass  # no categories key
        elif k == 2:
            record["categories"] = [[top]]
            categories[asin] = top
        else:
            sub = subcats[k % len(subcats)]
            record["categories"] = [[top, sub, "Fixture Leaf"], [top, "Other"]]
            categories[asin] = sub
        meta_lines.append(repr(record) + "\n")
    reviews_path = folder / f"reviews_{category}_5.json.gz"
    with gzip.open(reviews_path, "wt", encoding="utf-8") as f:
        for user, asin, overall, t in reviews:
            f.write(json.dumps({"reviewerID": user, "asin": asin, "reviewerName": "Fixture \u00e9", "helpful": [0, 0],
                                "reviewText": "Fixture review.", "overall": overall, "summary": "ok",
                                "unixReviewTime": t, "reviewTime": "01 1, 2014"}) + "\n")
    meta_path = folder / f"meta_{category}.json.gz"
    with gzip.open(meta_path, "wt", encoding="utf-8") as f:
        f.writelines(meta_lines)
    return {"reviews_path": reviews_path, "meta_path": meta_path, "reviews": reviews, "categories": categories}


# --------------------------------------------------------------------------- cache for smoke runs
#: Fixture kinds -> writer, for `fixture_root`.
WRITERS: dict[str, Callable[..., dict]] = {
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "cub": write_cub,
    "pet": write_pet,
    "fashion-mnist": write_fashion_mnist,
    "movielens-100k": write_movielens_100k,
    "movielens-1m": write_movielens_1m,
    "amazon": write_amazon,
}
_VERSION = 1


def fixture_root(kind: str, base: str | os.PathLike | None = None, **params: Any) -> Path:
    """A data root holding fixture `kind` written with `params` (made once, then reused).

    The folder lives under `base` (default ``<system temp>/auxnb-fixtures``), named by a hash
    of the kind, the parameters and the writer version; it is written to a scratch folder and
    renamed into place, so concurrent callers never see half a fixture. Pass the returned
    path as ``root`` / ``data_root`` to a loader.
    """
    if kind not in WRITERS:
        raise ValueError(f"Unknown fixture kind {kind!r}; kinds: {', '.join(WRITERS)}.")
    key = json.dumps({"kind": kind, "version": _VERSION, **params}, sort_keys=True, default=str)
    parent = Path(base) if base is not None else Path(tempfile.gettempdir()) / "auxnb-fixtures"
    final = parent / f"{kind}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (final / ".complete").is_file():
        return final
    parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=parent))
    try:
        WRITERS[kind](scratch, **params)
        (scratch / ".complete").write_text(key)
        try:
            os.replace(scratch, final)
        except OSError:  # another process finished first (its folder is complete): use it
            if not (final / ".complete").is_file():
                raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return final
