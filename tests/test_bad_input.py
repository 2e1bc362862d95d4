"""The bad-input catalogue of issue 26: data files, checkpoints, user arrays, the command line and
a full disk. Every case must end in one clear error that names the file (and line / entry / row
and column) and the fix; nothing is accepted silently, and the command line shows no traceback.

(The API and CLI argument cases of earlier issues are in tests/test_catalogue.py.)
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch

from auxnb import TaskDataset
from auxnb import checkpoint as ckpt_io
from auxnb.__main__ import main
from auxnb.checkpoint import CheckpointError
from auxnb.data.amazon import load_amazon
from auxnb.data.cifar import load_cifar10, load_cifar100
from auxnb.data.cub import load_cub
from auxnb.data.fashion import load_fashion_mnist
from auxnb.data.fixtures import (
    write_fashion_mnist, write_amazon, write_cifar10, write_cifar100, write_cub, write_movielens_100k, write_movielens_1m, write_pet,
)
from auxnb.data.movielens import load_movielens_100k, load_movielens_1m
from auxnb.data.pet import load_pet

FIX_DATA = ["official file", "official ones", "official source", "replace", "unpack the official archive", "correct or delete that line",
            "jmcauley.ucsd.edu"]  # one of these (the remedy) must be in every data-file error


# --------------------------------------------------------------------------- editing helpers
def _lines(path: Path, encoding: str = "utf-8") -> list[str]:
    return path.read_bytes().decode(encoding).splitlines(keepends=True)


def _write_lines(path: Path, lines: list[str], encoding: str = "utf-8") -> None:
    path.write_bytes("".join(lines).encode(encoding))


def set_field(path: Path, line: int, sep: str | None, index: int, value: str, encoding: str = "utf-8") -> Path:
    lines = _lines(path, encoding)
    parts = lines[line - 1].rstrip("\n").split(sep)
    parts[index] = value
    lines[line - 1] = (sep if sep is not None else " ").join(parts) + "\n"
    _write_lines(path, lines, encoding)
    return path


def replace_line(path: Path, line: int, text: str, encoding: str = "utf-8") -> Path:
    lines = _lines(path, encoding)
    lines[line - 1] = text
    _write_lines(path, lines, encoding)
    return path


def cut_mid_line(path: Path) -> Path:
    data = path.read_bytes()
    half = len(data) // 2
    while data[half - 1:half] == b"\n":
        half -= 1
    path.write_bytes(data[:half])
    return path


def cut_at_line(path: Path) -> Path:
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[: len(lines) // 2]))
    return path


def nul_in(path: Path, line: int = 2) -> Path:
    lines = path.read_bytes().splitlines(keepends=True)
    lines[line - 1] = lines[line - 1][:3] + b"\x00\x00" + lines[line - 1][3:]
    path.write_bytes(b"".join(lines))
    return path


def gz_edit(path: Path, edit: Callable[[list[str]], list[str]]) -> Path:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.readlines()
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(edit(lines))
    return path


def review_field(key: str, value) -> Callable[[list[str]], list[str]]:
    def edit(lines):
        record = json.loads(lines[2])
        record[key] = value
        return lines[:2] + [json.dumps(record) + "\n"] + lines[3:]
    return edit


def repickle(path: Path, change: Callable[[dict], None]) -> Path:
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")  # the test's own fixture file, written just before
    change(batch)
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return path


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/auxnb-issue26-must-not-exist",))


# --------------------------------------------------------------------------- data-file cases
ML100 = "ml-100k"
ML1M = "ml-1m"

# (id, fixture, mutation(folder) -> the file the error must name, loader(root), words the message must hold)
DATA_CASES = [
    # MovieLens-100K: u.data
    ("ml100k-rating-0", "ml100k", lambda f: set_field(f / ML100 / "u.data", 3, "\t", 2, "0"), load_movielens_100k, ["line 3", "rating 0", "1-5"]),
    ("ml100k-rating-9", "ml100k", lambda f: set_field(f / ML100 / "u.data", 4, "\t", 2, "9"), load_movielens_100k, ["line 4", "rating 9"]),
    ("ml100k-rating-neg", "ml100k", lambda f: set_field(f / ML100 / "u.data", 5, "\t", 2, "-1"), load_movielens_100k, ["line 5", "rating -1"]),
    ("ml100k-rating-6-last", "ml100k", lambda f: set_field(f / ML100 / "u.data", len(_lines(f / ML100 / "u.data")), "\t", 2, "6"), load_movielens_100k, ["rating 6"]),
    ("ml100k-rating-text", "ml100k", lambda f: set_field(f / ML100 / "u.data", 3, "\t", 2, "five"), load_movielens_100k, ["line 3", "'five' is not an integer"]),
    ("ml100k-rating-float", "ml100k", lambda f: set_field(f / ML100 / "u.data", 3, "\t", 2, "4.5"), load_movielens_100k, ["line 3", "'4.5' is not an integer"]),
    ("ml100k-timestamp-neg", "ml100k", lambda f: set_field(f / ML100 / "u.data", 6, "\t", 3, "-5"), load_movielens_100k, ["line 6", "timestamp -5"]),
    ("ml100k-huge-int", "ml100k", lambda f: set_field(f / ML100 / "u.data", 3, "\t", 3, "9" * 30), load_movielens_100k, ["line 3", "too large"]),
    ("ml100k-user-unknown", "ml100k", lambda f: set_field(f / ML100 / "u.data", 7, "\t", 0, "999"), load_movielens_100k, ["line 7", "user id 999", "u.user"]),
    ("ml100k-item-unknown", "ml100k", lambda f: set_field(f / ML100 / "u.data", 8, "\t", 1, "777"), load_movielens_100k, ["line 8", "item id 777", "u.item"]),
    ("ml100k-3-fields", "ml100k", lambda f: replace_line(f / ML100 / "u.data", 3, "1\t2\t3\n"), load_movielens_100k, ["line 3", "3 fields where 4"]),
    ("ml100k-empty-data", "ml100k", lambda f: _put(f / ML100 / "u.data", ""), load_movielens_100k, ["no ratings"]),
    ("ml100k-header-only", "ml100k", lambda f: _put(f / ML100 / "u.data", "user\titem\trating\ttimestamp\n"), load_movielens_100k, ["no ratings"]),
    ("ml100k-cut-mid-line", "ml100k", lambda f: cut_mid_line(f / ML100 / "u.data"), load_movielens_100k, ["no line end", "cut short"]),
    ("ml100k-cut-at-line", "ml100k", lambda f: cut_at_line(f / ML100 / "u.data"), load_movielens_100k, ["u.info states", "ratings"]),
    ("ml100k-nul-data", "ml100k", lambda f: nul_in(f / ML100 / "u.data", 4), load_movielens_100k, ["line 4", "NUL bytes"]),
    # MovieLens-100K: u.user, u.item, u.info
    ("ml100k-nul-user", "ml100k", lambda f: nul_in(f / ML100 / "u.user", 2), load_movielens_100k, ["line 2", "NUL bytes"]),
    ("ml100k-gender-x", "ml100k", lambda f: set_field(f / ML100 / "u.user", 2, "|", 2, "X"), load_movielens_100k, ["line 2", "gender 'X'"]),
    ("ml100k-age-0", "ml100k", lambda f: set_field(f / ML100 / "u.user", 3, "|", 1, "0"), load_movielens_100k, ["line 3", "age 0"]),
    ("ml100k-age-999", "ml100k", lambda f: set_field(f / ML100 / "u.user", 3, "|", 1, "999"), load_movielens_100k, ["line 3", "age 999"]),
    ("ml100k-occupation-unlisted", "ml100k", lambda f: set_field(f / ML100 / "u.user", 4, "|", 3, "astronaut"), load_movielens_100k, ["line 4", "'astronaut'", "u.occupation"]),
    ("ml100k-user-cut", "ml100k", lambda f: cut_at_line(f / ML100 / "u.user"), load_movielens_100k, ["u.info states", "users"]),
    ("ml100k-genre-flag-2", "ml100k", lambda f: set_field(f / ML100 / "u.item", 2, "|", 7, "2", "latin-1"), load_movielens_100k, ["line 2", "genre flag 2"]),
    ("ml100k-genre-flag-neg", "ml100k", lambda f: set_field(f / ML100 / "u.item", 3, "|", 9, "-1", "latin-1"), load_movielens_100k, ["line 3", "genre flag -1"]),
    ("ml100k-item-cut", "ml100k", lambda f: cut_at_line(f / ML100 / "u.item"), load_movielens_100k, ["u.info states", "items"]),
    ("ml100k-item-18-flags", "ml100k", lambda f: replace_line(f / ML100 / "u.item", 2, "2|T|01-Jan-1995||u|" + "|".join("0" * 18) + "\n", "latin-1"), load_movielens_100k, ["line 2", "23 fields where 24"]),
    ("ml100k-nul-item", "ml100k", lambda f: nul_in(f / ML100 / "u.item", 5), load_movielens_100k, ["line 5", "NUL bytes"]),
    # MovieLens-1M
    ("ml1m-rating-6", "ml1m", lambda f: set_field(f / ML1M / "ratings.dat", 3, "::", 2, "6"), load_movielens_1m, ["line 3", "rating 6"]),
    ("ml1m-rating-0", "ml1m", lambda f: set_field(f / ML1M / "ratings.dat", 9, "::", 2, "0"), load_movielens_1m, ["line 9", "rating 0"]),
    ("ml1m-cut-mid-line", "ml1m", lambda f: cut_mid_line(f / ML1M / "ratings.dat"), load_movielens_1m, ["no line end"]),
    ("ml1m-empty", "ml1m", lambda f: _put(f / ML1M / "ratings.dat", ""), load_movielens_1m, ["no ratings"]),
    ("ml1m-readme-count", "ml1m", lambda f: _put(f / ML1M / "README", "1,000,209 anonymous ratings of 3,900 movies made by 6,040 MovieLens users").parent / "ratings.dat", load_movielens_1m, ["README states 1000209"]),
    ("ml1m-user-unknown", "ml1m", lambda f: set_field(f / ML1M / "ratings.dat", 5, "::", 0, "4242"), load_movielens_1m, ["line 5", "user id 4242", "users.dat"]),
    ("ml1m-movie-unknown", "ml1m", lambda f: set_field(f / ML1M / "ratings.dat", 5, "::", 1, "4242"), load_movielens_1m, ["line 5", "movie id 4242", "movies.dat"]),
    ("ml1m-gender", "ml1m", lambda f: set_field(f / ML1M / "users.dat", 2, "::", 1, "Q"), load_movielens_1m, ["line 2", "gender 'Q'"]),
    ("ml1m-occupation-21", "ml1m", lambda f: set_field(f / ML1M / "users.dat", 3, "::", 3, "21"), load_movielens_1m, ["line 3", "occupation 21"]),
    ("ml1m-age-code-20", "ml1m", lambda f: set_field(f / ML1M / "users.dat", 4, "::", 2, "20"), load_movielens_1m, ["line 4", "age code 20"]),
    ("ml1m-nul-movies", "ml1m", lambda f: nul_in(f / ML1M / "movies.dat", 3), load_movielens_1m, ["line 3", "NUL bytes"]),
    ("ml1m-huge-int", "ml1m", lambda f: set_field(f / ML1M / "ratings.dat", 2, "::", 3, "1" * 25), load_movielens_1m, ["line 2", "too large"]),
    # Amazon
    ("amazon-rating-7", "amazon", lambda f: gz_edit(f / "amazon" / "reviews_Beauty_5.json.gz", review_field("overall", 7.0)), lambda r: load_amazon("beauty", r), [":3", "overall", "1-5"]),
    ("amazon-rating-0", "amazon", lambda f: gz_edit(f / "amazon" / "reviews_Beauty_5.json.gz", review_field("overall", 0)), lambda r: load_amazon("beauty", r), [":3", "1-5"]),
    ("amazon-rating-nan", "amazon", lambda f: gz_edit(f / "amazon" / "reviews_Beauty_5.json.gz", review_field("overall", float("nan"))), lambda r: load_amazon("beauty", r), [":3", "nan"]),
    ("amazon-rating-text", "amazon", lambda f: gz_edit(f / "amazon" / "reviews_Beauty_5.json.gz", review_field("overall", "great")), lambda r: load_amazon("beauty", r), [":3", "not a review record"]),
    ("amazon-no-asin", "amazon", lambda f: gz_edit(f / "amazon" / "reviews_Beauty_5.json.gz", lambda ls: ls[:2] + ['{"reviewerID": "A", "overall": 5.0, "unixReviewTime": 1}\n'] + ls[3:]), lambda r: load_amazon("beauty", r), [":3", "asin"]),
    ("amazon-time-huge", "amazon", lambda f: gz_edit(f / "amazon" / "reviews_Beauty_5.json.gz", review_field("unixReviewTime", 10**30)), lambda r: load_amazon("beauty", r), [":3", "unixReviewTime"]),
    ("amazon-truncated-gz", "amazon", lambda f: _cut_bytes(f / "amazon" / "reviews_Beauty_5.json.gz"), lambda r: load_amazon("beauty", r), ["cut short"]),
    ("amazon-not-gzip", "amazon", lambda f: _put(f / "amazon" / "reviews_Beauty_5.json.gz", b'{"plain": "json"}\n'), lambda r: load_amazon("beauty", r), ["not gzip"]),
    ("amazon-empty", "amazon", lambda f: gz_edit(f / "amazon" / "reviews_Beauty_5.json.gz", lambda ls: []), lambda r: load_amazon("beauty", r), ["holds no reviews"]),
    ("amazon-nul", "amazon", lambda f: gz_edit(f / "amazon" / "reviews_Beauty_5.json.gz", lambda ls: ls[:1] + ["\x00" + ls[1]] + ls[2:]), lambda r: load_amazon("beauty", r), [":2", "NUL bytes"]),
    ("amazon-meta-bad", "amazon", lambda f: gz_edit(f / "amazon" / "meta_Beauty.json.gz", lambda ls: [ls[0][:-3] + "\n"] + ls[1:]), lambda r: load_amazon("beauty", r), [":1", "not a metadata record"]),
    # CUB
    ("cub-present-2", "cub", lambda f: set_field(f / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt", 2, None, 2, "2"), lambda r: load_cub(r, image_size=None), ["line 2", "is_present 2"]),
    ("cub-certainty-9", "cub", lambda f: set_field(f / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt", 3, None, 3, "9"), lambda r: load_cub(r, image_size=None), ["line 3", "certainty id 9"]),
    ("cub-attribute-range", "cub", lambda f: set_field(f / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt", 4, None, 1, "9999"), lambda r: load_cub(r, image_size=None), ["line 4", "attribute 9999"]),
    ("cub-nul", "cub", lambda f: nul_in(f / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt", 5), lambda r: load_cub(r, image_size=None), ["line 5", "NUL bytes"]),
    ("cub-3-fields", "cub", lambda f: replace_line(f / "CUB_200_2011" / "attributes" / "image_attribute_labels.txt", 6, "1 2 1\n"), lambda r: load_cub(r, image_size=None), ["line 6", "3 fields"]),
    # Oxford-IIIT Pet
    ("pet-class-38", "pet", lambda f: set_field(f / "oxford-iiit-pet" / "annotations" / "trainval.txt", 2, None, 1, "38"), lambda r: load_pet(r, image_size=None), ["line 2", "class id 38"]),
    ("pet-species-3", "pet", lambda f: set_field(f / "oxford-iiit-pet" / "annotations" / "trainval.txt", 2, None, 2, "3"), lambda r: load_pet(r, image_size=None), ["line 2", "species 3"]),
    ("pet-nul", "pet", lambda f: nul_in(f / "oxford-iiit-pet" / "annotations" / "trainval.txt", 3), lambda r: load_pet(r, image_size=None), ["line 3", "NUL bytes"]),
    ("pet-class-text", "pet", lambda f: set_field(f / "oxford-iiit-pet" / "annotations" / "test.txt", 2, None, 1, "cat"), lambda r: load_pet(r, image_size=None), ["line 2", "not an integer"]),
    # CIFAR
    ("cifar10-labels-short", "cifar10", lambda f: repickle(f / "cifar-10-batches-py" / "data_batch_2", lambda b: b.__setitem__(b"labels", b[b"labels"][:-1])), lambda r: load_cifar10(r, "train"), ["data_batch_2", "labels for", "images"]),
    ("cifar10-data-shape", "cifar10", lambda f: repickle(f / "cifar-10-batches-py" / "test_batch", lambda b: b.__setitem__(b"data", b[b"data"][:, :100])), lambda r: load_cifar10(r, "test"), ["test_batch", "[N, 3072]"]),
    ("cifar10-truncated", "cifar10", lambda f: _cut_bytes(f / "cifar-10-batches-py" / "data_batch_1"), lambda r: load_cifar10(r, "train"), ["data_batch_1", "damaged or truncated"]),
    ("cifar10-code", "cifar10", lambda f: _put(f / "cifar-10-batches-py" / "batches.meta", pickle.dumps(_RunsCode(), protocol=2)), lambda r: load_cifar10(r, "train"), ["batches.meta", "posix.system", "not loaded"]),
    ("cifar10-label-range", "cifar10", lambda f: repickle(f / "cifar-10-batches-py" / "test_batch", lambda b: b[b"labels"].__setitem__(0, 10)), lambda r: load_cifar10(r, "test"), ["test_batch", "labels range"]),
    ("cifar10-text-labels", "cifar10", lambda f: repickle(f / "cifar-10-batches-py" / "test_batch", lambda b: b.__setitem__(b"labels", [b"cat"] * len(b[b"labels"]))), lambda r: load_cifar10(r, "test"), ["test_batch", "integer labels"]),
    ("cifar10-not-dict", "cifar10", lambda f: _put(f / "cifar-10-batches-py" / "test_batch", pickle.dumps([1, 2], protocol=2)), lambda r: load_cifar10(r, "test"), ["test_batch", "batch dictionary"]),
    # Fashion-MNIST (IDX: the header states the sizes)
    ("fashion-cut-gz", "fashion", lambda f: _cut_bytes(f / "fashion-mnist" / "train-images-idx3-ubyte.gz"), lambda r: _fashion(r), ["cut short"]),
    ("fashion-cut-plain", "fashion-plain", lambda f: _cut_bytes(f / "fashion-mnist" / "train-images-idx3-ubyte"), lambda r: _fashion(r), ["header says", "cut short"]),
    ("fashion-bad-magic", "fashion-plain", lambda f: _put(f / "fashion-mnist" / "train-labels-idx1-ubyte", b"\x01\x02\x03\x04rest"), lambda r: _fashion(r), ["bad magic"]),
    ("fashion-short-header", "fashion-plain", lambda f: _put(f / "fashion-mnist" / "train-labels-idx1-ubyte", b"\x00\x00\x08\x01\x00"), lambda r: _fashion(r), ["header", "cut short"]),
    ("fashion-label-10", "fashion-plain", lambda f: _idx_edit(f / "fashion-mnist" / "train-labels-idx1-ubyte", -1, 10), lambda r: _fashion(r), ["labels outside 0..9"]),
    ("cifar100-no-coarse", "cifar100", lambda f: repickle(f / "cifar-100-python" / "train", lambda b: b.pop(b"coarse_labels")), lambda r: load_cifar100(r, "train"), ["train", "coarse_labels"]),
    ("cifar100-coarse-short", "cifar100", lambda f: repickle(f / "cifar-100-python" / "test", lambda b: b.__setitem__(b"coarse_labels", b[b"coarse_labels"][:3])), lambda r: load_cifar100(r, "test"), ["test", "3 coarse_labels for"]),
]


def _fashion(root):
    return load_fashion_mnist(root, "train", system=False)


def _idx_edit(path: Path, position: int, value: int) -> Path:
    data = bytearray(path.read_bytes())
    data[position] = value
    path.write_bytes(bytes(data))
    return path


def _put(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _cut_bytes(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


_WRITERS = {
    "ml100k": lambda r: write_movielens_100k(r, n_users=10, n_items=12, per_user=4),
    "ml1m": lambda r: write_movielens_1m(r, n_users=10, n_items=12, per_user=4),
    "amazon": lambda r: write_amazon(r, n_users=8, n_items=10, per_user=4),
    "cub": lambda r: write_cub(r, num_classes=2, train_per_class=2, test_per_class=1),
    "pet": lambda r: write_pet(r),
    "cifar10": lambda r: write_cifar10(r, train_per_class=1, test_per_class=1),
    "fashion": lambda r: write_fashion_mnist(r, train_per_class=1, test_per_class=1),
    "fashion-plain": lambda r: write_fashion_mnist(r, train_per_class=1, test_per_class=1, compress=False),
    "cifar100": lambda r: write_cifar100(r, train_per_class=1, test_per_class=1),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Each fixture dataset written once; a case edits its own copy."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = tmp_path_factory.mktemp(kind)
            _WRITERS[kind](made[kind])
        return made[kind]
    return get


@pytest.mark.parametrize("case, kind, mutate, load, words", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_a_bad_data_file_is_named_with_its_line_and_the_fix(case, kind, mutate, load, words, pristine, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(pristine(kind), root)
    named = mutate(root)
    with pytest.raises(ValueError) as info:
        load(root)
    message = str(info.value)
    assert str(named) in message, f"{case}: the file {named} is not named in {message!r}"
    for word in words:
        assert word in message, f"{case}: {word!r} not in {message!r}"
    assert any(fix.lower() in message.lower() for fix in FIX_DATA), f"{case}: no remedy in {message!r}"
    assert not Path("/tmp/auxnb-issue26-must-not-exist").exists()


def test_every_pristine_fixture_loads(pristine):
    # the control: the unedited files of every case above load without complaint
    assert len(load_movielens_100k(pristine("ml100k"))) == 40 and len(load_movielens_1m(pristine("ml1m"))) == 40
    load_amazon("beauty", pristine("amazon")), load_cub(pristine("cub"), image_size=None), load_pet(pristine("pet"), image_size=None)
    load_cifar10(pristine("cifar10"), "train"), load_cifar100(pristine("cifar100"), "test")


# --------------------------------------------------------------------------- checkpoint cases
def _payload():
    g = torch.Generator().manual_seed(0)
    return {
        "identity": {"method": "x"},
        "model": {"w": torch.randn(64, generator=g), "b": torch.randn(8, generator=g)},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(64, generator=g)}}, "param_groups": [{"lr": 0.1}]},
        "method": {"phi": torch.randn(16, generator=g)},
        "rng": {"torch": torch.get_rng_state()},
        "state": {"best": {"w": torch.randn(64, generator=g)}, "step": 3},
    }


def _flip_tensor(path: Path, tensor: torch.Tensor) -> None:
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.file_size == len(data) and archive.read(info) == data:
                n, m = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
                raw[info.header_offset + 30 + n + m + len(data) // 2] ^= 0x04
                path.write_bytes(bytes(raw))
                return
    raise AssertionError("tensor not found")


def _saved(tmp: Path, change: Callable[[dict], None] | None = None) -> Path:
    payload = _payload()
    if change is not None:
        change(payload)
    return ckpt_io.save(tmp / "checkpoint.pt", payload)


def _flip_case(get):
    def make(tmp):
        path = _saved(tmp)
        _flip_tensor(path, get(_payload()))
        return path
    return make


def _set(keys, value):
    def change(p):
        target = p
        for k in keys[:-1]:
            target = target[k]
        target[keys[-1]] = value
    return change


# (id, make(tmp) -> path, how it is used: "load" or an entry name to read, words)
CHECKPOINT_CASES = [
    ("flip-model", _flip_case(lambda p: p["model"]["w"]), "load", ["damaged", "CRC-32"]),
    ("flip-model-bias", _flip_case(lambda p: p["model"]["b"]), "load", ["damaged"]),
    ("flip-optimizer", _flip_case(lambda p: p["optimizer"]["state"][0]["exp_avg"]), "load", ["damaged"]),
    ("flip-method", _flip_case(lambda p: p["method"]["phi"]), "load", ["damaged"]),
    ("flip-rng", _flip_case(lambda p: p["rng"]["torch"]), "load", ["damaged"]),
    ("flip-best", _flip_case(lambda p: p["state"]["best"]["w"]), "load", ["damaged"]),
    ("nan-model", lambda t: _saved(t, _set(["model", "w"], torch.full((64,), float("nan")))), "load", ["model['w']", "NaN/Inf"]),
    ("inf-model", lambda t: _saved(t, _set(["model", "b"], torch.full((8,), float("inf")))), "load", ["model['b']", "NaN/Inf"]),
    ("nan-best", lambda t: _saved(t, _set(["state", "best", "w"], torch.full((64,), float("nan")))), "load", ["state.best['w']"]),
    ("missing-model", lambda t: _saved(t, lambda p: p.pop("model")), "model", ["no 'model' entry"]),
    ("missing-optimizer", lambda t: _saved(t, lambda p: p.pop("optimizer")), "optimizer", ["no 'optimizer' entry"]),
    ("missing-rng", lambda t: _saved(t, lambda p: p.pop("rng")), "rng", ["no 'rng' entry"]),
    ("missing-method", lambda t: _saved(t, lambda p: p.pop("method")), "method", ["no 'method' entry"]),
    ("truncated", lambda t: _cut_bytes(_saved(t)), "load", ["not a complete checkpoint"]),
    ("empty", lambda t: _put(t / "checkpoint.pt", b""), "load", ["empty"]),
    ("directory", lambda t: (t / "checkpoint.pt").mkdir() or t / "checkpoint.pt", "load", ["directory"]),
    ("text-file", lambda t: _put(t / "checkpoint.pt", "hello"), "load", ["not a complete checkpoint"]),
    ("other-program", lambda t: torch.save({"a": torch.ones(2)}, t / "checkpoint.pt") or t / "checkpoint.pt", "load", ["not an auxnb checkpoint"]),
    ("code-pickle", lambda t: torch.save({"format": ckpt_io.FORMAT, "x": _RunsCode()}, t / "checkpoint.pt") or t / "checkpoint.pt", "load", ["could run code"]),
]


@pytest.mark.parametrize("case, make, use, words", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_a_bad_checkpoint_is_refused_naming_the_file_and_the_remedy(case, make, use, words, tmp_path):
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as info:
        loaded = ckpt_io.load(path)
        if use != "load":
            loaded[use]
    message = str(info.value)
    assert str(path) in message and "delete it" in message, message
    for word in words:
        assert word in message, f"{case}: {word!r} not in {message!r}"
    assert not Path("/tmp/auxnb-issue26-must-not-exist").exists()


# --------------------------------------------------------------------------- user arrays
def _x(change):
    x = np.random.default_rng(0).normal(size=(80, 4))
    change(x)
    return x


def _frame(col, value, row=7):
    frame = pd.DataFrame(np.random.default_rng(0).normal(size=(20, 3)), columns=["age", "income", "score"])
    frame["y"] = np.arange(20) % 2
    frame.loc[row, col] = value
    return frame


Y80 = {"y": np.arange(80) % 3}
ARRAY_CASES = [
    ("numpy-nan", lambda: TaskDataset.from_numpy(_x(lambda x: x.__setitem__((5, 2), np.nan)), Y80), ["row 5", "column 2", "nan"]),
    ("numpy-inf", lambda: TaskDataset.from_numpy(_x(lambda x: x.__setitem__((0, 0), np.inf)), Y80), ["row 0", "column 0", "inf"]),
    ("numpy-neg-inf", lambda: TaskDataset.from_numpy(_x(lambda x: x.__setitem__((79, 3), -np.inf)), Y80), ["row 79", "-inf"]),
    ("numpy-half-test-rows", lambda: TaskDataset.from_numpy(_x(lambda x: x.__setitem__((slice(40, 80), 1), np.nan)), Y80), ["row 40", "40 row(s)"]),
    ("numpy-val-row", lambda: TaskDataset.from_numpy(_x(lambda x: x.__setitem__((70, 0), np.nan)), Y80), ["row 70"]),
    ("numpy-overflow-f32", lambda: TaskDataset.from_numpy(_x(lambda x: x.__setitem__((3, 1), 1e300)), Y80), ["row 3", "too large for float32"]),
    ("numpy-float32-nan", lambda: TaskDataset.from_numpy(_x(lambda x: x.__setitem__((9, 0), np.nan)).astype(np.float32), Y80), ["row 9"]),
    ("numpy-images-nan", lambda: TaskDataset.from_numpy(np.where(np.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4) == 37, np.nan, 0.0), {"y": [0, 1]}), ["row 0", "position (2, 1, 1)"]),
    ("tensor-nan", lambda: TaskDataset.from_numpy(torch.tensor([[0.0, float("nan")]]), {"y": [0]}), ["row 0", "column 1"]),
    ("list-inf", lambda: TaskDataset.from_numpy([[1.0], [float("inf")]], {"y": [0, 1]}), ["row 1"]),
    ("pandas-nan", lambda: TaskDataset.from_pandas(_frame("income", np.nan), targets="y"), ["row 7", "column 'income'"]),
    ("pandas-inf", lambda: TaskDataset.from_pandas(_frame("score", np.inf, 3), targets="y"), ["row 3", "column 'score'", "inf"]),
    ("pandas-nullable-int", lambda: TaskDataset.from_pandas(pd.DataFrame({"n": pd.array([1, None, 3], dtype="Int64"), "y": [0, 1, 0]}), targets="y"), ["row 1", "column 'n'"]),
    ("pandas-overflow", lambda: TaskDataset.from_pandas(_frame("age", 1e200, 2), targets="y"), ["row 2", "column 'age'", "too large"]),
]


@pytest.mark.parametrize("case, fn, words", ARRAY_CASES, ids=[c[0] for c in ARRAY_CASES])
def test_non_finite_user_inputs_are_refused_with_row_and_column(case, fn, words):
    with pytest.raises(ValueError) as info:
        fn()
    message = str(info.value)
    for word in words + ["Fill or drop those rows"]:
        assert word in message, f"{case}: {word!r} not in {message!r}"


def test_nan_targets_stay_missing_labels_and_finite_inputs_are_accepted():
    # the control: NaN in a *target* is a missing label (documented), finite inputs pass
    ds = TaskDataset.from_numpy(np.zeros((3, 2)), {"y": np.array([0.5, np.nan, 1.0])})
    assert torch.isnan(ds.targets["y"][1]) and torch.isfinite(ds.inputs).all()


# --------------------------------------------------------------------------- disk
def _failing_open(monkeypatch, code):
    import builtins

    real_open = builtins.open

    def fake(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).endswith(".tmp"):
            real_open(file, mode, *args, **kwargs).close()
            raise OSError(code, os.strerror(code))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake)


DISK_CASES = [
    ("enospc-checkpoint", errno.ENOSPC, lambda t: ckpt_io.save(t / "checkpoint.pt", _payload()), "checkpoint.pt", "Disk full"),
    ("edquot-checkpoint", errno.EDQUOT, lambda t: ckpt_io.save(t / "checkpoint.pt", _payload()), "checkpoint.pt", "Disk full"),
    ("eio-checkpoint", errno.EIO, lambda t: ckpt_io.save(t / "checkpoint.pt", _payload()), "checkpoint.pt", "Could not write"),
    ("enospc-csv", errno.ENOSPC, lambda t: ckpt_io.write_csv(t / "runs.csv", pd.DataFrame({"a": [1]})), "runs.csv", "Disk full"),
    ("enospc-result", errno.ENOSPC, lambda t: ckpt_io.save(t / "result.pt", {"kind": "x"}), "result.pt", "Disk full"),
    ("enospc-sweep-table", errno.ENOSPC, lambda t: __import__("auxnb.experiments", fromlist=["x"]).sweep(
        "digits-rotation", ["stl"], [0], scale="smoke", progress=False, device="cpu", out=t / "all.csv"), "all.csv", "Disk full"),
]


@pytest.mark.parametrize("case, code, fn, name, words", DISK_CASES, ids=[c[0] for c in DISK_CASES])
def test_a_failing_disk_says_so_names_the_file_and_leaves_nothing(case, code, fn, name, words, tmp_path, monkeypatch):
    _failing_open(monkeypatch, code)
    with pytest.raises(OSError) as info:
        fn(tmp_path)
    message = str(info.value)
    assert words in message and name in message and "no partial file" in message, message
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert not (tmp_path / name).exists()


# --------------------------------------------------------------------------- command line
def _ml100k_rating_9(data: Path) -> None:
    write_movielens_100k(data)
    set_field(data / ML100 / "u.data", 3, "\t", 2, "9")


def _ml100k_cut(data: Path) -> None:
    write_movielens_100k(data)
    cut_at_line(data / ML100 / "u.data")


def _ml100k_empty(data: Path) -> None:
    write_movielens_100k(data)
    (data / ML100 / "u.data").write_text("")


def _ml1m_bad_gender(data: Path) -> None:
    write_movielens_1m(data)
    set_field(data / ML1M / "users.dat", 2, "::", 1, "Q")


def _cifar_code(data: Path) -> None:
    write_cifar10(data, train_per_class=1, test_per_class=1)
    (data / "cifar-10-batches-py" / "data_batch_1").write_bytes(pickle.dumps(_RunsCode(), protocol=2))


def _beauty_cut(data: Path) -> None:
    write_amazon(data)
    _cut_bytes(data / "amazon" / "reviews_Beauty_5.json.gz")


def _damaged_checkpoint(data: Path) -> None:
    main(["run", "digits-rotation", "--scale", "smoke", "--no-progress", "--checkpoint-dir", "ck", "--set", "steps=4"])
    raw = torch.load("ck/checkpoint.pt", weights_only=True)
    _flip_tensor(Path("ck/checkpoint.pt"), next(iter(raw["model"].values())))


def _nan_checkpoint(data: Path) -> None:
    main(["run", "digits-rotation", "--scale", "smoke", "--no-progress", "--checkpoint-dir", "ck", "--set", "steps=4"])
    payload = dict(ckpt_io.load("ck/checkpoint.pt"))
    payload.pop("format")
    name = next(iter(payload["model"]))
    payload["model"][name] = payload["model"][name] * float("nan")
    ckpt_io.save("ck/checkpoint.pt", payload)


SMALL = ["--scale", "small", "--no-progress"]
CLI_CASES = [
    ("run-ml100k-rating-9", _ml100k_rating_9, ["run", "movielens100k-l2", *SMALL], ["u.data, line 3", "rating 9"]),
    ("run-ml100k-truncated", _ml100k_cut, ["run", "movielens100k-l2", *SMALL], ["u.data", "u.info states"]),
    ("run-ml100k-empty", _ml100k_empty, ["run", "movielens100k-l2", *SMALL], ["u.data", "no ratings"]),
    ("run-ml1m-gender", _ml1m_bad_gender, ["run", "movielens-l2", *SMALL], ["users.dat, line 2", "gender 'Q'"]),
    ("run-cifar-code", _cifar_code, ["run", "cifar10-rotation", *SMALL], ["data_batch_1", "not loaded"]),
    ("run-beauty-cut", _beauty_cut, ["run", "beauty-l2", *SMALL], ["reviews_Beauty_5.json.gz", "cut short"]),
    ("resume-damaged", _damaged_checkpoint, ["run", "digits-rotation", "--scale", "smoke", "--no-progress", "--checkpoint-dir", "ck",
                                             "--resume", "--set", "steps=4"], ["ck/checkpoint.pt", "damaged"]),
    ("resume-nan", _nan_checkpoint, ["run", "digits-rotation", "--scale", "smoke", "--no-progress", "--checkpoint-dir", "ck",
                                     "--resume", "--set", "steps=4"], ["ck/checkpoint.pt", "NaN/Inf"]),
    ("run-ckpt-dir-is-file", lambda d: Path("ck").write_text("x"), ["run", "digits-rotation", "--scale", "smoke", "--no-progress",
                                                                    "--checkpoint-dir", "ck/sub"], ["not writable", "ck/sub"]),
]


@pytest.mark.parametrize("case, setup, argv, words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_is_one_error_line_naming_file_and_fix(case, setup, argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUXNB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("AUXNB_DEVICE", "cpu")
    monkeypatch.delenv("AUXNB_TRACEBACK", raising=False)
    setup(tmp_path / "data")
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
    for word in words:
        assert word in err, f"{case}: {word!r} not in {err!r}"
    assert not Path("/tmp/auxnb-issue26-must-not-exist").exists()


def test_the_catalogue_holds_at_least_90_cases():
    total = len(DATA_CASES) + len(CHECKPOINT_CASES) + len(ARRAY_CASES) + len(DISK_CASES) + len(CLI_CASES)
    assert total >= 90, total


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_smoke_with_the_real_dataset_present_says_it_was_not_used(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUXNB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("AUXNB_DEVICE", "cpu")
    argv = ["movielens100k-l2", "--scale", "smoke", "--no-progress"]
    argv = ["run", *argv] if command == "run" else ["sweep", *argv, "--methods", "stl", "--seeds", "0", "--out", "r.csv"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "fixture files" in out and "not used" not in out  # no real dataset: only which data was read
    write_movielens_100k(tmp_path / "data")
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())  # the CLI wraps its lines to the terminal's width
    assert "fixture files" in out and "movielens-100k" in out and str(tmp_path / "data") in out and "not used" in out
