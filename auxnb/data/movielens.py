"""MovieLens-100K and MovieLens-1M ratings with user and item features as categorical field ids.

Reads the GroupLens files as distributed (latin-1; copies re-encoded to UTF-8 are accepted too).
MovieLens may not be redistributed: auxnb never ships it; ``download=True`` fetches it from
GroupLens for the user. A missing file is an error naming the layout and ``AUXNB_DATA``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from auxnb.data.sources import data_root, missing_dataset_error
from auxnb.data.text import bad_line, check_text, line_numbers, read_rows

__all__ = [
    "ML100K_FOLDER",
    "ML1M_FOLDER",
    "ML_AGE_GROUPS",
    "ML100K_GENRES",
    "RatingsData",
    "read_text",
    "load_movielens_100k",
    "load_movielens_1m",
    "age_group",
]

#: The star scale of every MovieLens release.
ML_RATING_SCALE = (1, 5)
#: MovieLens-1M's occupation codes (README): 0 "other" ... 20 "writer".
ML1M_OCCUPATIONS = range(21)
ML100K_FOLDER = "ml-100k"
ML1M_FOLDER = "ml-1m"
#: MovieLens-1M's age codes (users.dat): 1 "Under 18", 18 "18-24", 25, 35, 45, 50, 56 "56+".
ML_AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)
#: The 19 genre flags of MovieLens-100K's u.item, in column order (u.genre).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
_URLS = {
    ML100K_FOLDER: ("https://files.grouplens.org/datasets/movielens/ml-100k.zip", "0e33842e24a9c977be4e0107933c0723"),
    ML1M_FOLDER: ("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906"),
}


@dataclass
class RatingsData:
    """User-item interactions as categorical field ids (the input of `auxnb.models.AutoInt`).

    Attributes:
        name: dataset name.
        fields: long ``[N, F]``: one 0-based id per field, field ``f`` in ``[0, field_dims[f])``.
        field_names: e.g. ``("user", "gender", "age", "occupation", "item", "genre")``.
        field_dims: number of distinct ids of each field.
        ratings: float ``[N]`` (1..5 stars).
        timestamps: long ``[N]`` (unix seconds).
        vocab: field name -> the raw value of each id (``vocab["item"][i]`` is the item's
            original id; ``vocab["genre"][g]`` the genre name; MovieLens also gives
            ``vocab["item_title"][i]``, the decoded title).
    """

    name: str
    fields: Tensor
    field_names: tuple[str, ...]
    field_dims: tuple[int, ...]
    ratings: Tensor
    timestamps: Tensor
    vocab: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.ratings)

    def column(self, name: str) -> Tensor:
        """The ids of field `name` (long ``[N]``)."""
        if name not in self.field_names:
            raise KeyError(f"Unknown field {name!r}; fields are {self.field_names}.")
        return self.fields[:, self.field_names.index(name)]

    @property
    def users(self) -> Tensor:
        return self.column("user")

    def subset(self, mask: Tensor) -> "RatingsData":
        """The rows where `mask` is True (ids and vocabularies unchanged)."""
        return RatingsData(self.name, self.fields[mask], self.field_names, self.field_dims, self.ratings[mask],
                           self.timestamps[mask], self.vocab)


def read_text(path: str | os.PathLike) -> str:
    """A text file decoded as UTF-8 when it is valid UTF-8, else as latin-1 (GroupLens's encoding).

    Latin-1 accented letters (one byte >= 0x80 between ASCII letters) are never valid UTF-8, so a
    latin-1 original is not misread; a UTF-8 re-encoding decodes to the same text.
    """
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def age_group(age: int) -> int:
    """An age in years -> MovieLens-1M's age code (1, 18, 25, 35, 45, 50 or 56).

    Example:
        >>> [age_group(a) for a in (7, 18, 24, 25, 49, 50, 56, 73)]
        [1, 18, 18, 25, 45, 50, 56, 56]
    """
    code = ML_AGE_GROUPS[0]
    for lower in ML_AGE_GROUPS[1:]:
        if age >= lower:
            code = lower
    return code


def _index(values: Sequence[str]) -> tuple[dict[str, int], tuple[str, ...]]:
    vocab = tuple(dict.fromkeys(values))  # first-seen order, duplicates dropped
    return {v: i for i, v in enumerate(vocab)}, vocab


def _numeric_vocab(values: Sequence[str]) -> tuple[dict[str, int], tuple[str, ...]]:
    ordered = sorted(set(values), key=lambda v: (int(v) if v.lstrip("-").isdigit() else float("inf"), v))
    return {v: i for i, v in enumerate(ordered)}, tuple(ordered)


def _lookup(table: Mapping[str, int], value: str, what: str, path: Path) -> int:
    try:
        return table[value]
    except KeyError:
        raise ValueError(f"{path}: {what} {value!r} has no entry in the {what} file.") from None


def _require(folder: str, files: list[str], root, download: bool) -> Path:
    base = data_root(root)
    path = base / folder
    if download and not all((path / f).is_file() for f in files):
        from torchvision.datasets.utils import download_and_extract_archive

        url, md5 = _URLS[folder]
        base.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(url, download_root=str(base), md5=md5)
    if not all((path / f).is_file() for f in files):
        raise FileNotFoundError(
            f"{missing_dataset_error(folder, files, root)} MovieLens may not be redistributed, so auxnb never "
            "ships it: get it from https://grouplens.org/datasets/movielens/ (or pass download=True)."
        )
    return path


def _build(name, rows_user, rows_item, ratings, stamps, user_feats, item_feats, user_fields, item_fields, vocabs):
    """Assemble field ids: user, user features, item, item features."""
    fields = torch.stack(
        [torch.as_tensor(rows_user)]
        + [torch.as_tensor(user_feats[:, j])[torch.as_tensor(rows_user)] for j in range(user_feats.shape[1])]
        + [torch.as_tensor(rows_item)]
        + [torch.as_tensor(item_feats[:, j])[torch.as_tensor(rows_item)] for j in range(item_feats.shape[1])],
        dim=1,
    ).long()
    names = ("user",) + tuple(user_fields) + ("item",) + tuple(item_fields)
    dims = tuple(len(vocabs[n]) for n in names)
    return RatingsData(
        name=name,
        fields=fields,
        field_names=names,
        field_dims=dims,
        ratings=torch.as_tensor(ratings, dtype=torch.float32),
        timestamps=torch.as_tensor(stamps, dtype=torch.long),
        vocab=vocabs,
    )


def _text(path: Path) -> str:
    """A MovieLens table's text: no NUL bytes, last line complete (else an error naming file and line)."""
    return check_text(path, read_text(path))


def _int_table(path: Path, sep: str | None, expected: str, text: str | None = None) -> np.ndarray:
    """A table of 4 integers a line, ``[N, 4]``: one vectorised parse; on any failure the rows are
    read one by one (`read_rows`), which skips a header line and names a bad line."""
    text = _text(path) if text is None else text
    try:
        table = np.array((text.replace(sep, " ") if sep else text).split(), dtype=np.int64)
        if table.size % 4 == 0:
            return table.reshape(-1, 4)
    except (ValueError, OverflowError):
        pass
    rows = read_rows(path, sep=sep, width=4, integer=(0, 1, 2, 3), text=text, expected=expected)
    for number, r in rows:
        for v in r:
            if not -(2**63) <= int(v) < 2**63:
                raise bad_line(path, number, sep.join(r) if sep else " ".join(r), f"{v.strip()} is too large for an id, "
                               "rating or time", expected)
    return np.array([[int(v) for v in r] for _, r in rows], dtype=np.int64).reshape(-1, 4)


def _bad_row(path: Path, text: str, rows: int, k: int, problem: str, expected: str) -> ValueError:
    number = line_numbers(text, rows)[k]
    return bad_line(path, number, text.splitlines()[number - 1], problem, expected)


def _check_ratings(path: Path, table: np.ndarray, text: str, expected: str) -> None:
    """No rating file is used empty, with stars off the 1-5 scale, or with negative times (file and line named)."""
    if len(table) == 0:
        raise ValueError(f"{path} holds no ratings (it is empty, or only a header); replace it with a copy from its "
                         "official source (https://grouplens.org/datasets/movielens/).")
    low, high = ML_RATING_SCALE
    bad = np.flatnonzero((table[:, 2] < low) | (table[:, 2] > high))
    if len(bad):
        k = int(bad[0])
        raise _bad_row(path, text, len(table), k, f"rating {table[k, 2]} is outside MovieLens' {low}-{high} star scale "
                       f"({len(bad)} such line{'s' if len(bad) > 1 else ''})", expected)
    bad = np.flatnonzero(table[:, 3] < 0)
    if len(bad):
        raise _bad_row(path, text, len(table), int(bad[0]), f"timestamp {table[int(bad[0]), 3]} is negative", expected)


def _row_ids(column: np.ndarray, index: Mapping[str, int], path: Path, text: str, what: str, listed: str, expected: str) -> np.ndarray:
    """Each id of `column` as its 0-based index; an id missing from `listed` names the line."""
    out = np.empty(len(column), dtype=np.int64)
    for k, v in enumerate(column):
        i = index.get(str(v))
        if i is None:
            raise _bad_row(path, text, len(column), k, f"{what} id {v} is not listed in {listed}", expected)
        out[k] = i
    return out


def _check_count(path: Path, what: str, found: int, stated: int | None, source: Path) -> None:
    if stated is not None and found != stated:
        raise ValueError(
            f"{path} holds {found} {what} but {source} states {stated}: the file is incomplete or was changed "
            "(a truncated download or copy?); replace the dataset with a copy from its official source."
        )


def _stated_counts(path: Path, patterns: Mapping[str, str]) -> dict[str, int]:
    """Counts a dataset states about itself (``u.info``, a README), by `patterns` (regex with one number)."""
    import re

    if not path.is_file():
        return {}
    text = read_text(path)
    out = {}
    for key, pattern in patterns.items():
        m = re.search(pattern, text)
        if m:
            out[key] = int(m.group(1).replace(",", ""))
    return out


def load_movielens_1m(root: str | os.PathLike | None = None, *, download: bool = False) -> RatingsData:
    """MovieLens-1M from ``<root>/ml-1m/`` (ratings.dat, users.dat, movies.dat; ``::``-separated).

    Fields (MAOAL supplement §2.4): user id, gender, age (the seven age codes), occupation
    (0..20), item id, and the item's category = its *first* listed genre (movies.dat lists
    several, e.g. ``Animation|Children's|Comedy``; one id per field keeps AutoInt's input one
    token per field).
    """
    files = ["ratings.dat", "users.dat", "movies.dat"]
    path = _require(ML1M_FOLDER, files, root, download)
    user_expected = "'UserID::Gender::Age::Occupation::Zip-code'"
    user_rows = read_rows(path / "users.dat", sep="::", width=5, integer=(0, 2, 3), text=_text(path / "users.dat"), expected=user_expected)
    for number, r in user_rows:
        if r[1] not in ("M", "F"):
            raise bad_line(path / "users.dat", number, "::".join(r), f"gender {r[1]!r} is not M or F", user_expected)
        if int(r[3]) not in ML1M_OCCUPATIONS:
            raise bad_line(path / "users.dat", number, "::".join(r), f"occupation {r[3]} is outside 0-20", user_expected)
        if int(r[2]) not in ML_AGE_GROUPS:
            raise bad_line(path / "users.dat", number, "::".join(r), f"age code {r[2]} is not one of {ML_AGE_GROUPS}", user_expected)
    users = [r for _, r in user_rows]
    movies = [r for _, r in read_rows(path / "movies.dat", sep="::", width=3, integer=(0,), text=_text(path / "movies.dat"),
                                      expected="'MovieID::Title::Genres'")]
    user_index, user_vocab = _numeric_vocab([r[0] for r in users])
    gender_index, gender_vocab = _index(sorted({r[1] for r in users}))
    age_index = {str(a): i for i, a in enumerate(ML_AGE_GROUPS)}
    occ_index, occ_vocab = _numeric_vocab([r[3] for r in users])
    item_index, item_vocab = _numeric_vocab([r[0] for r in movies])
    first_genres = [r[2].split("|")[0].strip() for r in movies]
    genre_index, genre_vocab = _index(sorted(set(first_genres)))
    user_feats = np.zeros((len(user_vocab), 3), dtype=np.int64)
    for r in users:
        u = user_index[r[0]]
        user_feats[u] = (gender_index[r[1]], _lookup(age_index, r[2], "age code", path / "users.dat"), occ_index[r[3]])
    item_feats = np.zeros((len(item_vocab), 1), dtype=np.int64)
    for r, g in zip(movies, first_genres):
        item_feats[item_index[r[0]], 0] = genre_index[g]
    expected = "'UserID::MovieID::Rating::Timestamp' (integers)"
    text = _text(path / "ratings.dat")
    table = _int_table(path / "ratings.dat", "::", expected, text)
    _check_ratings(path / "ratings.dat", table, text, expected)
    stated = _stated_counts(path / "README", {"ratings": r"([\d,]+) anonymous ratings", "users": r"made by ([\d,]+) MovieLens users"})
    _check_count(path / "ratings.dat", "ratings", len(table), stated.get("ratings"), path / "README")
    _check_count(path / "users.dat", "users", len(users), stated.get("users"), path / "README")
    rows_user = _row_ids(table[:, 0], user_index, path / "ratings.dat", text, "user", "users.dat", expected)
    rows_item = _row_ids(table[:, 1], item_index, path / "ratings.dat", text, "movie", "movies.dat", expected)
    titles = {r[0]: r[1] for r in movies}
    vocabs = {"user": user_vocab, "gender": gender_vocab, "age": tuple(str(a) for a in ML_AGE_GROUPS),
              "occupation": occ_vocab, "item": item_vocab, "genre": genre_vocab,
              "item_title": tuple(titles[i] for i in item_vocab)}
    return _build("movielens-1m", rows_user, rows_item, table[:, 2], table[:, 3], user_feats, item_feats,
                  ("gender", "age", "occupation"), ("genre",), vocabs)


def load_movielens_100k(root: str | os.PathLike | None = None, *, download: bool = False) -> RatingsData:
    """MovieLens-100K from ``<root>/ml-100k/`` (u.data tab-separated; u.user, u.item ``|``-separated, latin-1).

    Fields as for MovieLens-1M: user id, gender, age (bucketed into MovieLens-1M's seven age
    codes), occupation (u.user's names, ids in alphabetical order), item id, and the item's
    category = its first genre flag among u.item's 19 (``unknown`` when none is set).
    """
    files = ["u.data", "u.user", "u.item"]
    path = _require(ML100K_FOLDER, files, root, download)
    user_expected = "'user id|age|gender|occupation|zip code'"
    user_rows = read_rows(path / "u.user", sep="|", width=5, integer=(0, 1), text=_text(path / "u.user"), expected=user_expected)
    occupations = None
    if (path / "u.occupation").is_file():
        occupations = {line.strip() for line in _text(path / "u.occupation").splitlines() if line.strip()}
    for number, r in user_rows:
        if not 1 <= int(r[1]) <= 150:
            raise bad_line(path / "u.user", number, "|".join(r), f"age {r[1]} is not an age in years (1-150)", user_expected)
        if r[2] not in ("M", "F"):
            raise bad_line(path / "u.user", number, "|".join(r), f"gender {r[2]!r} is not M or F", user_expected)
        if occupations is not None and r[3] not in occupations:
            raise bad_line(path / "u.user", number, "|".join(r), f"occupation {r[3]!r} is not listed in u.occupation", user_expected)
    users = [r for _, r in user_rows]
    n_genres = len(ML100K_GENRES)
    item_expected = f"'movie id|title|release date|video release date|IMDb URL' and {n_genres} 0/1 genre flags, '|'-separated"
    item_rows = read_rows(path / "u.item", sep="|", width=5 + n_genres, integer=(0, *range(5, 5 + n_genres)),
                          text=_text(path / "u.item"), expected=item_expected)
    for number, r in item_rows:
        flag = next((v for v in r[5:] if v.strip() not in ("0", "1")), None)
        if flag is not None:
            raise bad_line(path / "u.item", number, "|".join(r), f"genre flag {flag.strip()} is not 0 or 1", item_expected)
    items = [r for _, r in item_rows]
    genres = ML100K_GENRES
    if (path / "u.genre").is_file():
        listed = [r for _, r in read_rows(path / "u.genre", sep="|", width=2, integer=(1,), text=_text(path / "u.genre"),
                                          expected="'<genre>|<id>'")]
        genres = tuple(name for name, _ in sorted(listed, key=lambda r: int(r[1])))
    user_index, user_vocab = _numeric_vocab([r[0] for r in users])
    gender_index, gender_vocab = _index(sorted({r[2] for r in users}))
    age_index = {a: i for i, a in enumerate(ML_AGE_GROUPS)}
    occ_index, occ_vocab = _index(sorted({r[3] for r in users}))
    item_index, item_vocab = _numeric_vocab([r[0] for r in items])
    user_feats = np.zeros((len(user_vocab), 3), dtype=np.int64)
    for r in users:
        user_feats[user_index[r[0]]] = (gender_index[r[2]], age_index[age_group(int(r[1]))], occ_index[r[3]])
    item_feats = np.zeros((len(item_vocab), 1), dtype=np.int64)
    for r in items:
        flags = [int(v) for v in r[5:]]
        item_feats[item_index[r[0]], 0] = flags.index(1) if 1 in flags else 0  # column 0 is "unknown"
    expected = "'user id<TAB>item id<TAB>rating<TAB>timestamp' (integers)"
    text = _text(path / "u.data")
    table = _int_table(path / "u.data", None, expected, text)
    _check_ratings(path / "u.data", table, text, expected)
    stated = _stated_counts(path / "u.info", {"users": r"(\d+)\s+users", "items": r"(\d+)\s+items", "ratings": r"(\d+)\s+ratings"})
    _check_count(path / "u.data", "ratings", len(table), stated.get("ratings"), path / "u.info")
    _check_count(path / "u.user", "users", len(users), stated.get("users"), path / "u.info")
    _check_count(path / "u.item", "items", len(items), stated.get("items"), path / "u.info")
    rows_user = _row_ids(table[:, 0], user_index, path / "u.data", text, "user", "u.user", expected)
    rows_item = _row_ids(table[:, 1], item_index, path / "u.data", text, "item", "u.item", expected)
    titles = {r[0]: r[1] for r in items}
    vocabs = {"user": user_vocab, "gender": gender_vocab, "age": tuple(str(a) for a in ML_AGE_GROUPS),
              "occupation": occ_vocab, "item": item_vocab, "genre": tuple(genres),
              "item_title": tuple(titles[i] for i in item_vocab)}
    return _build("movielens-100k", rows_user, rows_item, table[:, 2], table[:, 3], user_feats, item_feats,
                  ("gender", "age", "occupation"), ("genre",), vocabs)
