"""The papers' recommendation settings: rating regression with an L2-regulariser or a CTR auxiliary task.

MovieLens-1M / -100K and Amazon 2014 5-core (Beauty, Toys, Movies) with an AutoInt backbone.
Rating 3 is dropped (MAOAL's dataset sizes imply it; a neutral rating is neither a click nor a
non-click), ratings above 3 are clicks. D_dev holds at most one rating per user. A setting never
trains, never prints, and never swaps real data for fixture data.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..data import TaskDataset, as_generator
from ..data.amazon import load_amazon
from ..data.movielens import RatingsData, load_movielens_100k, load_movielens_1m
from ..models import AutoInt, MultiHeadModel, make_head
from ..tasks import Task, TaskSet
from .core import Setting, register_setting
from .protocols import Variant, bilevel_defaults, dataset_root, paper_methods, pools_bundle, register_variant

__all__ = [
    "NEUTRAL_RATING",
    "ParameterNorm",
    "drop_neutral",
    "click_labels",
    "carve_dev_per_user",
    "ratings_tasks",
    "ratings_model",
    "ratings_setting",
]

#: The rating removed before training: neither a click (> 3) nor a non-click (< 3).
NEUTRAL_RATING = 3.0


class ParameterNorm(nn.Module):
    """An L2 regulariser written as a task head, so every method can weight it like a task loss.

    MAOAL §4.1 uses "the L2 regularizer as the auxiliary loss" of rating prediction. The head
    returns ``sqrt(coefficient)·‖θ‖`` for every sample (θ = the bound parameters); with target 0
    the task's squared-error loss is exactly ``coefficient·‖θ‖²`` per sample, whose gradient is
    ``2·coefficient·θ``: a method that weights this task by ``w`` (per module, for MAOAL) applies
    weight decay ``2·w·coefficient`` to those parameters. The head has no parameters of its own
    and holds the bound ones without registering them (they belong to the model).

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> head = ParameterNorm().bind(lin.parameters())
        >>> out = head(torch.zeros(3, 5))
        >>> bool(torch.allclose(out[:, 0] ** 2, sum(p.pow(2).sum() for p in lin.parameters()).expand(3)))
        True
    """

    def __init__(self, coefficient: float = 1.0):
        super().__init__()
        if not coefficient > 0:
            raise ValueError(f"coefficient must be > 0, got {coefficient!r}.")
        self.coefficient = float(coefficient)
        self._bound: tuple[nn.Parameter, ...] = ()

    def bind(self, params: Iterable[nn.Parameter]) -> "ParameterNorm":
        """Regularise these parameters (a plain tuple attribute: not registered, not in state_dict)."""
        self._bound = tuple(params)
        return self

    def extra_repr(self) -> str:
        return f"coefficient={self.coefficient}, bound={len(self._bound)} tensors"

    def forward(self, features: Tensor) -> Tensor:
        if not self._bound:
            raise RuntimeError("ParameterNorm is not bound to any parameters; call .bind(model.parameters()) first.")
        squared = sum(p.pow(2).sum() for p in self._bound)
        norm = torch.sqrt(self.coefficient * squared)
        return norm.to(features.dtype).expand(features.shape[0], 1)


def drop_neutral(data: RatingsData) -> RatingsData:
    """The interactions whose rating is not 3 (MAOAL's MovieLens-1M sizes, 590,697 + 512 + 73,901 +
    73,902 = 739,012, are exactly the 1,000,209 ratings minus the 261,197 threes)."""
    return data.subset(data.ratings != NEUTRAL_RATING)


def click_labels(ratings: Tensor) -> Tensor:
    """CTR labels from star ratings: 1.0 above 3, 0.0 below 3 (rating 3 must be dropped first).

    Example:
        >>> click_labels(torch.tensor([1., 2., 4., 5.])).tolist()
        [0.0, 0.0, 1.0, 1.0]
    """
    if bool((ratings == NEUTRAL_RATING).any()):
        raise ValueError("Rating 3 is neither a click nor a non-click; drop it first (drop_neutral).")
    return (ratings > NEUTRAL_RATING).float()


def carve_dev_per_user(
    dataset: TaskDataset, size: int, generator: torch.Generator | int | None = 0, user_field: int = 0
) -> tuple[TaskDataset, TaskDataset | None]:
    """D_dev for recommendation: `size` users drawn uniformly, one of their ratings each (SPEC-NOTES).

    Args:
        dataset: ratings whose inputs are field ids ``[N, F]``; column `user_field` is the user.

    Returns:
        ``(rest, dev)``: dev has at most one rating per user and never more than `size` rows.

    Raises:
        ValueError: fewer than `size` distinct users.
    """
    if not size:
        return dataset, None
    g = as_generator(generator)
    users = dataset.inputs[:, user_field].cpu().long()
    distinct = torch.unique(users)
    if size > len(distinct):
        raise ValueError(f"dev_size={size} but the training split has only {len(distinct)} users (one dev rating each).")
    chosen_users = distinct[torch.randperm(len(distinct), generator=g)[:size]]
    perm = torch.randperm(len(users), generator=g)
    n_ids = int(users.max()) + 1
    first = torch.full((n_ids,), len(users), dtype=torch.long)
    first.scatter_reduce_(0, users[perm], torch.arange(len(users)), reduce="amin")  # a random rating per user
    rows = perm[first[chosen_users]]
    in_dev = torch.zeros(len(users), dtype=torch.bool)
    in_dev[rows] = True
    return dataset.subset(~in_dev), dataset.subset(in_dev)


#: MovieLens and Amazon ratings are 1–5 stars
RATING_RANGE = (1.0, 5.0)


def ratings_tasks(aux: str) -> TaskSet:
    """Rating regression (primary, RMSE, stars in [1, 5]) with ``aux="l2"`` (the L2 regulariser task,
    target 0) or ``aux="ctr"`` (binary click task). The range is what DTG's label normalisation
    (Eq. 9) maps generated ratings into."""
    primary = Task("rating", "regression", primary=True, label_range=RATING_RANGE)
    if aux == "l2":
        return TaskSet([primary, Task("l2", "regression", extra={"regulariser": "coefficient·‖θ‖² (ParameterNorm)"})])
    if aux == "ctr":
        return TaskSet([primary, Task("click", "binary")])
    raise ValueError(f"aux must be 'l2' or 'ctr', got {aux!r}.")


def ratings_dataset(data: RatingsData, aux: str) -> TaskDataset:
    targets = {"rating": data.ratings}
    targets["l2" if aux == "l2" else "click"] = torch.zeros_like(data.ratings) if aux == "l2" else click_labels(data.ratings)
    return TaskDataset(data.fields, targets)


def ratings_model(field_dims, tasks: TaskSet, *, embed_dim: int = 16, num_blocks: int = 4, num_heads: int = 4,
                  hidden: int = 16, l2_coefficient: float = 1.0) -> MultiHeadModel:
    """AutoInt (4 blocks, 4 heads, embedding 16) with 2-layer MLP heads of width 16 (MAOAL §2.4); the
    ``l2`` task's head is a `ParameterNorm` over every other parameter of the model, with loss
    ``l2_coefficient·‖θ‖²`` (the authors' code: 1e-3, ``config/params_reg.json`` "aux_weight")."""
    backbone = AutoInt(field_dims, embed_dim=embed_dim, num_blocks=num_blocks, num_heads=num_heads)
    heads: dict[str, nn.Module] = {}
    for task in tasks:
        heads[task.name] = ParameterNorm(l2_coefficient) if task.name == "l2" else make_head(backbone.out_features, task.out_dim, hidden)
    model = MultiHeadModel(backbone, heads)
    if "l2" in heads:
        heads["l2"].bind(p for name, p in model.named_parameters())  # weights and biases of backbone and heads
    return model


_FIX = {"n_users": 30, "n_items": 40, "per_user": 12}


def _load(dataset: str, config: Mapping[str, Any]) -> RatingsData:
    download = bool(config.get("download"))
    if dataset == "movielens-1m":
        return load_movielens_1m(dataset_root(config, "movielens-1m", **_FIX), download=download)
    if dataset == "movielens-100k":
        return load_movielens_100k(dataset_root(config, "movielens-100k", **_FIX), download=download)
    category = dataset.split("-", 1)[1]
    stem = {"beauty": "Beauty", "toys": "Toys_and_Games", "movies": "Movies_and_TV"}[category]
    return load_amazon(category, dataset_root(config, "amazon", category=stem, **_FIX))


def ratings_setting(dataset: str, aux: str):
    """Builder: `dataset` ratings (rating 3 dropped) with the ``l2`` or ``ctr`` auxiliary task."""

    def build(config: Mapping[str, Any]):
        if (config.get("backbone") or "autoint").lower() != "autoint":
            raise ValueError(f"The recommendation settings use the AutoInt backbone; got backbone={config['backbone']!r}.")
        data = drop_neutral(_load(dataset, config))
        tasks = ratings_tasks(aux)
        bundle = pools_bundle(
            ratings_dataset(data, aux), None, tasks, config, stratify=False,
            dev_carver=lambda ds, size, g: carve_dev_per_user(ds, size, g),
            source=f"{data.name} (rating 3 dropped; fields {', '.join(data.field_names)})",
            protocol="MAOAL supplement §2.4: 80/10/10 random split, D_dev one rating per user",
        )
        bundle.info["field_names"] = data.field_names
        bundle.info["field_dims"] = data.field_dims
        coefficient = config.get("l2_coefficient")
        if coefficient is not None and not coefficient > 0:
            raise ValueError(f"l2_coefficient must be > 0, got {coefficient!r}.")
        bundle.info["l2_coefficient"] = coefficient if aux == "l2" else None
        return bundle, ratings_model(data.field_dims, tasks, l2_coefficient=1.0 if coefficient is None else float(coefficient))

    return build


# --------------------------------------------------------------------------- registration
_PAPER = {"epochs": 20, "batch_size": 256, "optimizer": "adam", "lr": 1e-3, "scheduler": None,
          "val_size": 0.1, "test_size": 0.1, "dev_size": 512}
_SMALL = {"epochs": 2, "batch_size": 256, "optimizer": "adam", "lr": 1e-3, "scheduler": None,
          "train_size": 40_000, "val_size": 0.1, "test_size": 0.1, "dev_size": 200}
_SMOKE = {"fixture": True, "steps": 4, "eval_every": 2, "batch_size": 16, "optimizer": "adam", "lr": 1e-3,
          "scheduler": None, "val_size": 0.1, "test_size": 0.1, "dev_size": 5}


def _defaults(experiment: str):
    # MAOAL supplement §2.4: T = 20; φ by SGD, lr 1e-3 momentum 0.9 (MovieLens), lr 0.1 momentum 0 (Beauty);
    # the series, clipping and N-JTDS / JTDS / AuxL as the authors' code ran them (`paper_methods`)
    return bilevel_defaults(paper_methods(experiment))


def _register(name: str, dataset: str, aux: str, description: str, reproduces: str, paper: Mapping[str, Any],
              upper: str = "movielens", small: Mapping[str, Any] | None = None) -> None:
    register_setting(Setting(
        name=name,
        description=description,
        reproduces=reproduces,
        build=ratings_setting(dataset, aux),
        scales={"paper": {**_PAPER, **paper}, "small": {**_SMALL, **(small or {})}, "smoke": dict(_SMOKE)},
        method_defaults=_defaults(upper),
    ))


_COMMON = (
    "AutoInt backbone (4 interacting blocks, 4 heads, embedding 16; Block-L = embedding + blocks + heads), "
    "2-layer MLP heads (hidden 16). Rating 3 dropped; random 80/10/10 split into train / val / test; D_dev = "
    "512 ratings from D_train, at most one per user. Adam 1e-3, batch 256. "
)
_L2 = ("Auxiliary: the L2 regulariser c·‖θ‖² over all model parameters as a task (ParameterNorm head, target 0); "
       "Equal weighs it 1.0, which MAOAL notes is far too strong. c (`l2_coefficient`) is the authors' code's 1e-3 at "
       "paper scale (config/params_reg.json \"aux_weight\"; the paper gives no value) and 1.0 at small / smoke scale. ")
# the authors' code: loss_list = [rating loss, aux_weight·Σ‖p‖²] with aux_weight = 1e-3 (MAOAL train_regularizer.py)
_L2_PAPER = {"l2_coefficient": 1e-3}
_CTR = "Auxiliary: CTR prediction (click = rating above 3), a binary task with its own head. "

_register("movielens-l2", "movielens-1m", "l2",
          "MovieLens-1M rating regression (fields: user, gender, age, occupation, item, first genre). " + _L2 + _COMMON
          + "20 epochs; MAOAL T = 20, φ by SGD 1e-3 momentum 0.9.",
          "MAOAL Table 1 (MovieLens) [maoal-table1]", dict(_L2_PAPER))
_register("beauty-l2", "amazon-beauty", "l2",
          "Amazon Beauty 5-core rating regression (fields: user, item, category = level 1 of the first category "
          "path). " + _L2 + _COMMON + "20 epochs; MAOAL T = 20, φ by SGD 0.1 momentum 0.",
          "MAOAL Table 1 (Beauty) [maoal-table1]", dict(_L2_PAPER), upper="beauty")
_register("movielens-ctr", "movielens-1m", "ctr",
          "MovieLens-1M rating regression with CTR prediction. " + _CTR + _COMMON
          + "15 epochs (JTDS A.4); JTDS used |D_dev| = 200 (pass dev_size=200), K = 3, T searched in {10, 20, 50}.",
          "JTDS Table 2 (ML-1M) [jtds-table2]", {"epochs": 15})
_register("toys-ctr", "amazon-toys", "ctr",
          "Amazon Toys and Games 5-core rating regression with CTR prediction (fields: user, item, category). "
          + _CTR + _COMMON + "DTG's appendix is not in our copy: MAOAL's recommendation protocol (20 epochs) is used.",
          "DTG Tables 1, 4, 6 (Toys) [dtg-table1, dtg-table4, dtg-table6]", {})
_register("movies-ctr", "amazon-movies", "ctr",
          "Amazon Movies and TV 5-core rating regression with CTR prediction (fields: user, item, category). "
          + _CTR + _COMMON + "DTG's appendix is not in our copy: MAOAL's recommendation protocol (20 epochs) is used.",
          "DTG Tables 1, 5 (Movies) [dtg-table1, dtg-table5]", {})
_register("movielens100k-l2", "movielens-100k", "l2",
          "MovieLens-100K rating regression (fields as MovieLens-1M; ages bucketed into its seven groups) with the "
          "L2 regulariser as the auxiliary task: the MovieLens-1M protocol on a dataset a CPU trains in minutes. "
          + _COMMON, "CPU-size variant of MAOAL Table 1 (MovieLens); no paper numbers", dict(_L2_PAPER),
          small={"train_size": None})
_register("movielens100k-ctr", "movielens-100k", "ctr",
          "MovieLens-100K rating regression with CTR prediction: the JTDS MovieLens-1M protocol at CPU size. "
          + _CTR + _COMMON, "CPU-size variant of JTDS Table 2 (ML-1M); no paper numbers", {"epochs": 15},
          small={"train_size": None})

register_variant(Variant("movielens-ctr", "jtds", "JTDS Table 2 (ML-1M)", {"dev_size": 200}))
