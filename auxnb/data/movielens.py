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
from auxnb.data.text import read_rows

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


def _int_table(path: Path, sep: str | None, expected: str) -> np.ndarray:
    """A table of 4 integers a line, ``[N, 4]``: one vectorised parse; on any failure the rows are
    read one by one (`read_rows`), which skips a header line and names a bad line."""
    text = read_text(path)
    try:
        table = np.array((text.replace(sep, " ") if sep else text).split(), dtype=np.int64)
        if table.size % 4 == 0:
            return table.reshape(-1, 4)
    except ValueError:
        pass
    rows = read_rows(path, sep=sep, width=4, integer=(0, 1, 2, 3), text=text, expected=expected)
    return np.array([[int(v) for v in r] for _, r in rows], dtype=np.int64).reshape(-1, 4)


def load_movielens_1m(root: str | os.PathLike | None = None, *, download: bool = False) -> RatingsData:
    """MovieLens-1M from ``<root>/ml-1m/`` (ratings.dat, users.dat, movies.dat; ``::``-separated).

    Fields (MAOAL supplement §2.4): user id, gender, age (the seven age codes), occupation
    (0..20), item id, and the item's category = its *first* listed genre (movies.dat lists
    several, e.g. ``Animation|Children's|Comedy``; one id per field keeps AutoInt's input one
    token per field).
    """
    files = ["ratings.dat", "users.dat", "movies.dat"]
    path = _require(ML1M_FOLDER, files, root, download)
    users = [r for _, r in read_rows(path / "users.dat", sep="::", width=5, integer=(0, 2, 3), text=read_text(path / "users.dat"),
                                     expected="'UserID::Gender::Age::Occupation::Zip-code'")]
    movies = [r for _, r in read_rows(path / "movies.dat", sep="::", width=3, integer=(0,), text=read_text(path / "movies.dat"),
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
    table = _int_table(path / "ratings.dat", "::", "'UserID::MovieID::Rating::Timestamp' (integers)")
    rows_user = np.array([_lookup(user_index, str(u), "user", path / "ratings.dat") for u in table[:, 0]])
    rows_item = np.array([_lookup(item_index, str(i), "movie", path / "ratings.dat") for i in table[:, 1]])
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
    users = [r for _, r in read_rows(path / "u.user", sep="|", width=5, integer=(0, 1), text=read_text(path / "u.user"),
                                     expected="'user id|age|gender|occupation|zip code'")]
    n_genres = len(ML100K_GENRES)
    items = [r for _, r in read_rows(path / "u.item", sep="|", width=5 + n_genres, integer=(0, *range(5, 5 + n_genres)),
                                     text=read_text(path / "u.item"),
                                     expected=f"'movie id|title|release date|video release date|IMDb URL' and {n_genres} 0/1 genre flags, '|'-separated")]
    genres = ML100K_GENRES
    if (path / "u.genre").is_file():
        listed = [r for _, r in read_rows(path / "u.genre", sep="|", width=2, integer=(1,), text=read_text(path / "u.genre"),
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
    table = _int_table(path / "u.data", None, "'user id<TAB>item id<TAB>rating<TAB>timestamp' (integers)")
    rows_user = np.array([_lookup(user_index, str(u), "user", path / "u.data") for u in table[:, 0]])
    rows_item = np.array([_lookup(item_index, str(i), "item", path / "u.data") for i in table[:, 1]])
    titles = {r[0]: r[1] for r in items}
    vocabs = {"user": user_vocab, "gender": gender_vocab, "age": tuple(str(a) for a in ML_AGE_GROUPS),
              "occupation": occ_vocab, "item": item_vocab, "genre": tuple(genres),
              "item_title": tuple(titles[i] for i in item_vocab)}
    return _build("movielens-100k", rows_user, rows_item, table[:, 2], table[:, 3], user_feats, item_feats,
                  ("gender", "age", "occupation"), ("genre",), vocabs)
