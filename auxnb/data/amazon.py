"""Amazon product reviews 2014 (He & McAuley 2016), 5-core files: ratings with user, item and category ids.

Reads ``reviews_<Category>_5.json.gz`` (one JSON object a line) and ``meta_<Category>.json.gz``
(one Python dict literal a line, single-quoted: parsed with `ast.literal_eval`, never `eval`).
A missing file is an error naming the layout and ``AUXNB_DATA``; nothing is substituted.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import re
from typing import Any

import numpy as np
import torch

from auxnb.data.movielens import RatingsData
from auxnb.data.sources import data_root, missing_dataset_error

__all__ = ["AMAZON_FOLDER", "AMAZON_CATEGORIES", "UNKNOWN_CATEGORY", "item_category", "parse_meta_line", "load_amazon"]

AMAZON_FOLDER = "amazon"
#: Short names -> the category part of the 2014 file names.
AMAZON_CATEGORIES = {"beauty": "Beauty", "toys": "Toys_and_Games", "movies": "Movies_and_TV"}
#: Category id given to items without metadata or without a ``categories`` entry.
UNKNOWN_CATEGORY = "<unknown>"
_ASIN = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")


def _file_stem(category: str) -> str:
    return AMAZON_CATEGORIES.get(category.lower(), category)


def parse_meta_line(line: str) -> dict[str, Any]:
    """One line of a 2014 ``meta_*.json.gz`` file: a Python dict literal (``{'asin': '...', ...}``).

    Strict JSON lines (as in some re-exports) are accepted too.

    Example:
        >>> parse_meta_line("{'asin': '0205616461', 'title': \\"Bath & Body's Best\\", 'categories': [['Beauty', 'Bath']]}")["title"]
        "Bath & Body's Best"
    """
    line = line.strip()
    try:
        value = ast.literal_eval(line)
    except (ValueError, SyntaxError):
        value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError(f"Expected a dict literal, got {type(value).__name__}.")
    return value


def item_category(meta: dict[str, Any] | None, level: int = 1) -> str:
    """The item's category: level `level` of its first ``categories`` path.

    Level 0 is the dataset's own top category ("Beauty", "Toys & Games", "Movies & TV") for
    nearly every item, so it carries no information; level 1 (default) is the first real split
    ("Skin Care", "Games", "Movies"). A shorter path gives its deepest level; no metadata or no
    ``categories`` gives `UNKNOWN_CATEGORY`.

    Example:
        >>> item_category({"categories": [["Beauty", "Skin Care", "Face"], ["Beauty", "Makeup"]]})
        'Skin Care'
        >>> item_category({"categories": [["Beauty"]]}), item_category(None)
        ('Beauty', '<unknown>')
    """
    if not meta:
        return UNKNOWN_CATEGORY
    paths = meta.get("categories") or []
    if not paths or not paths[0]:
        return UNKNOWN_CATEGORY
    path = paths[0]
    return str(path[min(level, len(path) - 1)])


class _gzip_lines:
    """``(line number, line)`` of a gzipped text file; a truncated or non-gzip file is a ValueError naming it."""

    def __init__(self, path, fix: str) -> None:
        self.path, self.fix = path, fix

    def __enter__(self):
        self.handle = gzip.open(self.path, "rt", encoding="utf-8")
        return self._lines()

    def _lines(self):
        try:
            yield from enumerate(self.handle, start=1)
        except (EOFError, gzip.BadGzipFile, UnicodeDecodeError, OSError) as err:
            raise ValueError(f"{self.path} cannot be read to its end ({type(err).__name__}: {err}): the file is cut short, "
                             f"damaged or not gzip-compressed UTF-8 text; {self.fix}.") from None

    def __exit__(self, *exc):
        self.handle.close()
        return False


def load_amazon(
    category: str, root: str | os.PathLike | None = None, *, category_level: int = 1
) -> RatingsData:
    """An Amazon 2014 5-core dataset from ``<root>/amazon/``.

    Args:
        category: ``"beauty"``, ``"toys"``, ``"movies"`` (or the file names' own spelling,
            ``"Toys_and_Games"``).
        category_level: which level of the first ``categories`` path is the item category
            (see `item_category`).

    Returns:
        `RatingsData` with fields ``("user", "item", "category")`` (MAOAL supplement §2.4 and
        DTG §4.1: user ID, item ID and item category), ratings ``overall`` (1..5) and
        ``unixReviewTime``. Users and items are numbered in order of first appearance.
    """
    stem = _file_stem(category)
    folder = data_root(root) / AMAZON_FOLDER
    reviews_path = folder / f"reviews_{stem}_5.json.gz"
    meta_path = folder / f"meta_{stem}.json.gz"
    if not reviews_path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(
            f"{missing_dataset_error(AMAZON_FOLDER, [reviews_path.name, meta_path.name], root)} The 2014 files "
            "(5-core reviews and metadata) come from https://jmcauley.ucsd.edu/data/amazon/ (by request)."
        )
    users: dict[str, int] = {}
    items: dict[str, int] = {}
    rows_user, rows_item, ratings, stamps = [], [], [], []
    fix = "replace the file with a copy from https://jmcauley.ucsd.edu/data/amazon/"
    with _gzip_lines(reviews_path, fix) as lines:
        for number, line in lines:
            if not line.strip():
                continue
            if "\x00" in line:
                raise ValueError(f"{reviews_path}:{number}: NUL bytes in the line (a damaged file); {fix}.")
            try:
                review = json.loads(line)
                user, asin = review["reviewerID"], review["asin"]
                rating, stamp = float(review["overall"]), int(review["unixReviewTime"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError) as err:
                raise ValueError(f"{reviews_path}:{number}: not a review record ({err}); {fix}.") from None
            if not 1 <= rating <= 5:  # NaN fails too
                raise ValueError(f"{reviews_path}:{number}: rating 'overall' = {rating} is outside Amazon's 1-5 star scale; {fix}.")
            if not 0 <= stamp < 2**63:
                raise ValueError(f"{reviews_path}:{number}: 'unixReviewTime' = {stamp} is not a time; {fix}.")
            rows_user.append(users.setdefault(user, len(users)))
            rows_item.append(items.setdefault(asin, len(items)))
            ratings.append(rating)
            stamps.append(stamp)
    if not ratings:
        raise ValueError(f"{reviews_path} holds no reviews (empty, or cut short); {fix}.")
    categories: dict[str, str] = {}
    with _gzip_lines(meta_path, fix) as lines:
        for number, line in lines:
            found = _ASIN.search(line)
            # the metadata covers the whole category; parse only the items that were reviewed
            if found is None or found.group(1) not in items:
                continue
            try:
                meta = parse_meta_line(line)
            except (ValueError, SyntaxError, MemoryError, RecursionError) as err:
                raise ValueError(f"{meta_path}:{number}: not a metadata record ({err}); {fix}.") from None
            categories[str(meta.get("asin"))] = item_category(meta, category_level)
    item_vocab = tuple(items)
    item_categories = [categories.get(asin, UNKNOWN_CATEGORY) for asin in item_vocab]
    category_vocab = tuple(sorted(set(item_categories)))
    category_index = {c: i for i, c in enumerate(category_vocab)}
    item_cat = np.array([category_index[c] for c in item_categories], dtype=np.int64)
    rows_user_t = torch.tensor(rows_user, dtype=torch.long)
    rows_item_t = torch.tensor(rows_item, dtype=torch.long)
    fields = torch.stack([rows_user_t, rows_item_t, torch.from_numpy(item_cat)[rows_item_t]], dim=1)
    vocab = {"user": tuple(users), "item": item_vocab, "category": category_vocab}
    return RatingsData(
        name=f"amazon-{stem}",
        fields=fields,
        field_names=("user", "item", "category"),
        field_dims=(len(users), len(items), len(category_vocab)),
        ratings=torch.tensor(ratings, dtype=torch.float32),
        timestamps=torch.tensor(stamps, dtype=torch.long),
        vocab=vocab,
    )
