"""What the paper settings share: official-split bundles, fixture roots, backbones, and documented variants.

A setting at ``smoke`` scale reads fixture files it writes itself (its bundle and run say so);
at ``small`` / ``paper`` scale it reads the real dataset or raises the loader's missing-data
error. Nothing here trains, prints, or falls back from real to fixture data.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd
import torch
from torch import Tensor, nn

from ..data import DataBundle, TaskDataset, View, data_root
from ..data.fixtures import FIXTURE_NOTE, fixture_root
from ..data.splits import _stage_generator, check_label_protocol, label_protocol, split_indices
from ..models import ConvNet4, MLP, ResNet18, ResNet50
from ..tasks import TaskSet

__all__ = [
    "fixture_data_note",
    "Variant",
    "register_variant",
    "variants",
    "get_variant",
    "pools_bundle",
    "dataset_root",
    "is_fixture",
    "image_backbone",
    "resolve_pretrained",
    "bilevel_defaults",
    "maoal_paper",
    "paper_methods",
    "data_available",
    "SETTING_DATA",
    "FIXTURE_NOTE",
]

#: A dev carver: ``(train, size, generator) -> (train_rest, dev)``.
DevCarver = Callable[[TaskDataset, int, torch.Generator], "tuple[TaskDataset, TaskDataset | None]"]


def is_fixture(config: Mapping[str, Any]) -> bool:
    """Whether this config reads fixture files (the ``smoke`` scale of the paper settings)."""
    return bool(config.get("fixture"))


def dataset_root(config: Mapping[str, Any], kind: str, **fixture_params: Any) -> Path:
    """The data root a setting reads: a fixture root at smoke scale, else the user's data root."""
    if is_fixture(config):
        return fixture_root(kind, **fixture_params)
    return data_root(config.get("data_root"))


def cache_dir(config: Mapping[str, Any]) -> Path | None:
    """Where resized images are cached for the real datasets (``<data root>/.auxnb-cache``)."""
    if is_fixture(config):
        return None
    return data_root(config.get("data_root")) / ".auxnb-cache"


def _subsample(dataset: TaskDataset, size: int | None, labels: Tensor | None, stratify: bool, seed: int, stage: str) -> TaskDataset:
    if size is None or size >= len(dataset):
        return dataset
    strat: Tensor | int = labels if (stratify and labels is not None and labels.dim() == 1 and not labels.is_floating_point()) else len(dataset)
    keep, _ = split_indices(strat, [size, None], stratify=stratify, generator=_stage_generator(seed, stage))
    return dataset.subset(keep.sort().values)


def pools_bundle(
    train_pool: TaskDataset,
    heldout_pool: TaskDataset | None,
    tasks: TaskSet,
    config: Mapping[str, Any],
    *,
    val_from: str = "heldout",
    views: Mapping[str, View] | None = None,
    aux_train: Mapping[str, TaskDataset] | None = None,
    transform: Callable[[Tensor], Tensor] | None = None,
    eval_transform: Callable[[Tensor], Tensor] | None = None,
    stratify: bool = True,
    dev_carver: DevCarver | None = None,
    source: str = "",
    protocol: str = "",
) -> DataBundle:
    """A `DataBundle` from a dataset's official pools, in the papers' order (as `build_bundle`).

    1. D_val: `val_size` samples drawn (stratified on the primary label) from the held-out pool
       (``val_from="heldout"``; D_test is the rest of it, or `test_size` of it) or from the
       training pool (``val_from="train"``; D_test is the held-out pool, or `test_size` of it).
       Without a held-out pool, val and test both come from the training pool (fractions allowed).
    2. ``train_size`` (optional): a stratified subsample of what is left for training (CPU runs).
    3. the labelled budget: ``label_fraction`` (per class, others kept unlabelled) or ``shots``.
    4. D_dev: ``dev_size`` labelled training samples (class-balanced; `dev_carver` replaces the
       rule, e.g. one rating per user), removed from D_train.
    5. ``label_noise`` on the remaining training labels only (D_dev, D_val, D_test stay clean).

    `config` supplies ``seed``, ``val_size``, ``test_size``, ``train_size``, ``dev_size``,
    ``label_fraction``, ``shots``, ``label_noise`` and ``fixture``.
    """
    seed = int(config["seed"])
    primary = tasks.primary
    val_size, test_size = config.get("val_size"), config.get("test_size")
    check_label_protocol(primary, config.get("label_fraction"), config.get("shots"), config.get("label_noise") or 0.0)

    def strat_of(ds: TaskDataset) -> Tensor | int:
        y = ds.targets[primary.name]
        if stratify and y.dim() == 1 and not y.is_floating_point():
            return y.cpu()
        return len(ds)

    if heldout_pool is None:
        rest, val_pos, test_pos = split_indices(
            strat_of(train_pool), [None, val_size, test_size], stratify=stratify, generator=_stage_generator(seed, "split")
        )
        train, val, test = (train_pool.subset(p.sort().values) for p in (rest, val_pos, test_pos))
    elif val_from == "heldout":
        val_pos, test_pos = split_indices(
            strat_of(heldout_pool), [val_size, None], stratify=stratify, generator=_stage_generator(seed, "split")
        )
        train, val = train_pool, heldout_pool.subset(val_pos.sort().values)
        test = _subsample(heldout_pool.subset(test_pos.sort().values), test_size,
                          heldout_pool.targets[primary.name][test_pos.sort().values], stratify, seed, "test")
    elif val_from == "train":
        rest, val_pos = split_indices(
            strat_of(train_pool), [None, val_size], stratify=stratify, generator=_stage_generator(seed, "split")
        )
        train, val = train_pool.subset(rest.sort().values), train_pool.subset(val_pos.sort().values)
        test = _subsample(heldout_pool, test_size, heldout_pool.targets[primary.name], stratify, seed, "test")
    else:
        raise ValueError(f"val_from must be 'heldout' or 'train', got {val_from!r}.")
    train = _subsample(train, config.get("train_size"), train.targets[primary.name], stratify, seed, "train_size")

    label_fraction, shots = config.get("label_fraction"), config.get("shots")
    dev_size, label_noise = int(config.get("dev_size") or 0), config.get("label_noise") or 0.0
    train, dev, corrupted = label_protocol(  # the same stages as build_bundle (auxnb.data.splits)
        train, primary, seed=seed, n_ids=int(train_pool.index.max()) + 1 if len(train_pool) else 0,  # the training pool's ids
        label_fraction=label_fraction, shots=shots, dev_size=dev_size, label_noise=label_noise, dev_carver=dev_carver,
    )
    fixture = is_fixture(config)
    info: dict[str, Any] = {
        "source": f"{FIXTURE_NOTE} ({source})" if fixture else source,
        "fixture": fixture,
        # the training pool's id space (D_train and D_dev ids lie in it): what per-sample state
        # indexed by id needs (N-JTDS's weight table, issue 12 defect 1)
        "n_source": int(train_pool.index.max()) + 1 if len(train_pool) else 0,
        "protocol": protocol,
        "seed": seed,
        "val_size": val_size,
        "test_size": test_size,
        "dev_size": dev_size,
        "label_fraction": label_fraction,
        "shots": shots,
        "label_noise": label_noise,
        "effective_flip_rate": label_noise * (1 - 1 / primary.out_dim) if label_noise else 0.0,
        "corrupted": corrupted,
    }
    bundle = DataBundle(
        tasks=tasks, train=train, dev=dev, val=val, test=test, aux_train=dict(aux_train or {}),
        views=dict(views or {}), info=info, transform=transform, eval_transform=eval_transform,
    )
    bundle.info["sizes"] = bundle.describe()
    return bundle


# --------------------------------------------------------------------------- availability
#: Setting -> the datasets it reads (keys of `_DATA_FILES`).
SETTING_DATA: dict[str, tuple[str, ...]] = {
    "cifar10-rotation": ("cifar10",), "cifar100-rotation": ("cifar100",), "cifar100-coarse": ("cifar100",),
    "cifar100-20": ("cifar100",), "cifar10-100": ("cifar10", "cifar100"), "fashion-rotation": ("fashion-mnist",),
    "pet-rotation": ("pet",), "cub-attributes": ("cub",), "cub-attributes-312": ("cub",), "pet-cub": ("pet", "cub"),
    "movielens-l2": ("movielens-1m",), "movielens-ctr": ("movielens-1m",), "movielens100k-l2": ("movielens-100k",),
    "movielens100k-ctr": ("movielens-100k",), "beauty-l2": ("amazon-beauty",), "toys-ctr": ("amazon-toys",),
    "movies-ctr": ("amazon-movies",),
}
_DATA_FILES = {
    "cifar10": "cifar-10-batches-py/test_batch", "cifar100": "cifar-100-python/test",
    "pet": "oxford-iiit-pet/annotations/test.txt", "cub": "CUB_200_2011/attributes/image_attribute_labels.txt",
    "movielens-1m": "ml-1m/ratings.dat", "movielens-100k": "ml-100k/u.data",
    "amazon-beauty": "amazon/reviews_Beauty_5.json.gz", "amazon-toys": "amazon/reviews_Toys_and_Games_5.json.gz",
    "amazon-movies": "amazon/reviews_Movies_and_TV_5.json.gz",
}


def data_available(setting: str, data_root_: str | os.PathLike | None = None) -> bool:
    """Whether the real data a paper setting reads is on disk (a cheap check of one file per
    dataset; Fashion-MNIST also in Debian's folder). Settings without an entry (digits) are True."""
    from ..data.fashion import find_fashion_mnist

    root = data_root(data_root_)
    for name in SETTING_DATA.get(setting, ()):
        if name == "fashion-mnist":
            if find_fashion_mnist(data_root_) is None:
                return False
        elif not (root / _DATA_FILES[name]).is_file():
            return False
    return True


# --------------------------------------------------------------------------- models
_WEIGHT_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-0676ba61.pth"}


def resolve_pretrained(spec: str | None, arch: str, config: Mapping[str, Any]) -> str | None:
    """The local weights file for `arch`: ``spec`` = ``"none"`` / None (train from scratch),
    ``"auto"`` (``<data root>/weights/<torchvision file name>``, e.g. ``resnet18-f37072fd.pth``,
    or any ``<arch>*.pth`` there) or a path.

    Raises:
        FileNotFoundError: ``"auto"`` found no file; the message says where to put it and how to
            make it (auxnb never downloads weights).
    """
    if spec is None or str(spec).lower() in ("none", "false", "scratch", ""):
        return None
    if str(spec).lower() not in ("auto", "true", "imagenet"):
        return str(Path(spec).expanduser())
    folder = data_root(config.get("data_root")) / "weights"
    wanted = folder / _WEIGHT_FILES.get(arch, f"{arch}.pth")
    if wanted.is_file():
        return str(wanted)
    others = sorted(folder.glob(f"{arch}*.pth")) if folder.is_dir() else []
    if others:
        return str(others[0])
    raise FileNotFoundError(
        f"This protocol fine-tunes an ImageNet-pretrained {arch}, but no weights file was found at {wanted}. "
        f"auxnb never downloads weights: on a machine with internet run\n"
        f"  python -c \"import torch, torchvision; torch.save(torchvision.models.{arch}(weights='DEFAULT').state_dict(), '{wanted.name}')\"\n"
        f"and put the file in {folder} (the data root is $AUXNB_DATA), pass pretrained=<path>, or pretrained=none "
        "to train from scratch (not the paper's protocol)."
    )


def image_backbone(config: Mapping[str, Any], *, default: str, in_channels: int, input_size: int) -> nn.Module:
    """The backbone named by ``config["backbone"]`` (or `default`) for square images of `input_size`.

    ``convnet4`` (MAOAL supplement §2.3), ``resnet18`` / ``resnet50`` (with the CIFAR stem when
    the images are at most 64 px, JTDS §A.4; pretrained per ``config["pretrained"]``), ``mlp``.
    """
    name = (config.get("backbone") or default).lower()
    small = input_size <= 64
    if name == "convnet4":
        return ConvNet4(in_channels=in_channels, input_size=input_size)
    if name in ("resnet18", "resnet50"):
        weights = resolve_pretrained(config.get("pretrained"), name, config)
        cls = ResNet18 if name == "resnet18" else ResNet50
        return cls(cifar_stem=small and weights is None, pretrained=weights, in_channels=in_channels)
    if name == "mlp":
        return _Flatten(MLP(in_channels * input_size * input_size, hidden=(256, 256)))
    raise ValueError(f"Unknown backbone {name!r}; use convnet4, resnet18, resnet50 or mlp.")


class _Flatten(nn.Module):
    """Flattens images for an MLP backbone (blocks are the MLP's)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp
        self.out_features = mlp.out_features

    def blocks(self):
        return self.mlp.blocks()

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x.flatten(1))


def _constructor_params(name: str) -> set[str] | None:
    from .. import methods
    from ..methods.bilevel import BilevelMethod
    from ..methods.upper import UPPER_FIELDS

    cls = methods._REGISTRY.get(name)
    if cls is None:
        return None
    params = set(inspect.signature(cls.__init__).parameters)
    if issubclass(cls, BilevelMethod):
        # the upper level's fields are keywords of every bi-level constructor (through **upper_keywords)
        params |= set(UPPER_FIELDS) | {"upper"}
    return params


def _accepted(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    params = _constructor_params(name)
    return {k: v for k, v in kwargs.items() if params is not None and k in params}


def maoal_paper(experiment: str) -> dict[str, Any]:
    """MAOAL's published configuration for `experiment` as keyword arguments: the authors' code
    (``UpperLevel.authors("maoal", experiment)``: the supplement's T and α optimiser, the series
    with η = 1, 3 matvecs, no leading η, clipping at 10; α through a ReLU). The paper's text is
    ``MAOAL.paper_text(experiment)``; the book page "The papers and the authors' code" compares them."""
    from ..methods.upper import UpperLevel

    return {"nonneg": "relu", "upper": UpperLevel.authors("maoal", experiment)}


def paper_methods(experiment: str) -> dict[str, dict[str, Any]]:
    """The ``paper``-scale keyword arguments of every bi-level method on a setting of `experiment`
    (a MAOAL experiment name: its cadence and φ optimiser): the authors' code's configuration where
    it is public (MAOAL, JTDS, N-JTDS, AuxL), the paper's values for DTG (no public code). The
    do-no-harm guard is not a method keyword: it is the run's ``guard=`` (`auxnb.selection`), the
    same at every scale (``guard=None`` for the papers' methods alone)."""
    from ..methods.dtg import PAPER_CONFIG as DTG_PAPER
    from ..methods.upper import UpperLevel

    return {
        "maoal": maoal_paper(experiment),
        "auxl": {"upper": UpperLevel.authors("auxl", experiment)},
        # the paper's raw feature and no warm-up (auxnb's defaults since issue 22 are neither)
        "jtds": {"normalize": "none", "feature_norm": "none", "warmup": 0, "upper": UpperLevel.authors("jtds")},
        "n-jtds": {"upper": UpperLevel.authors("n-jtds")},
        "dtg": dict(DTG_PAPER),
    }


def bilevel_defaults(
    paper: Mapping[str, Mapping[str, Any]] | None = None, small: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """``Setting.method_defaults`` for every registered bi-level method (a `BilevelMethod`): the papers' knobs at ``paper`` scale, `small` overrides, and at ``smoke`` an upper step
    every 2 lower steps with one Neumann term (``lookback=2`` for MAOAL, no warm-up for JTDS), so a few steps exercise the
    upper level. The generic smoke knobs go only to methods whose constructor takes them; a per-method
    `paper`/`small` entry naming an argument the method does not take is an error."""
    from .. import methods

    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in methods.names():
        params = _constructor_params(name) or set()
        if "upper" not in params:
            continue
        # (JTDS's warm-up of 40 lower steps would leave a smoke run without any upper step)
        out[name] = {"smoke": _accepted(name, {"lower_steps": 2, "terms": 1, "lookback": 2, "warmup": 0})}
        for scale, table in (("paper", paper), ("small", small)):
            if table and name in table:
                # a setting's own per-method table must name real arguments: a typo is an error, not a no-op
                unknown = sorted(set(table[name]) - params)
                if unknown:
                    raise ValueError(f"method_defaults for {name!r} at {scale!r} name unknown arguments {unknown}.")
                out[name][scale] = dict(table[name])
    return out


# --------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """A documented protocol variant of a setting (semi-supervised, corrupted labels, few-shot, ...).

    ``run(setting, method, **variant.overrides, method_kwargs=variant.method_kwargs.get(method))``
    reproduces it; `method_kwargs` holds the per-method knobs the paper changed for the variant.
    """

    setting: str
    name: str
    reproduces: str
    overrides: Mapping[str, Any]
    method_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    note: str = ""

    def kwargs(self, method: str) -> dict[str, Any]:
        """Keyword arguments for `auxnb.experiments.run` with this variant for `method`."""
        return {**self.overrides, "method_kwargs": dict(self.method_kwargs.get(method, {}))}


_VARIANTS: dict[tuple[str, str], Variant] = {}


def register_variant(variant: Variant) -> Variant:
    _VARIANTS[(variant.setting, variant.name)] = variant
    return variant


def variants(setting: str | None = None) -> pd.DataFrame:
    """The documented variants (of one setting, or all): setting, name, reproduces, overrides."""
    rows = [
        {"setting": v.setting, "variant": v.name, "reproduces": v.reproduces, "overrides": dict(v.overrides),
         "method_kwargs": {k: dict(m) for k, m in v.method_kwargs.items()}, "note": v.note}
        for v in _VARIANTS.values() if setting is None or v.setting == setting
    ]
    return pd.DataFrame(rows, columns=["setting", "variant", "reproduces", "overrides", "method_kwargs", "note"])


def get_variant(setting: str, name: str) -> Variant:
    try:
        return _VARIANTS[(setting, name)]
    except KeyError:
        known = [f"{s}:{n}" for s, n in _VARIANTS]
        raise ValueError(f"Unknown variant {setting}:{name}; known: {', '.join(known)}.") from None


def fixture_data_note(setting: str, config: dict, root: str | os.PathLike | None = None) -> str | None:
    """What data a run read, when it read fixture files: one line naming them, and whether the real
    dataset under the data root was left unused (``--scale smoke`` never reads it). None otherwise."""
    if not config.get("fixture"):
        return None
    names = ", ".join(SETTING_DATA.get(setting, ())) or setting
    if SETTING_DATA.get(setting) and data_available(setting, root):
        return (f"data: fixture files (the smoke scale); the real {names} under {data_root(root)} was not used: "
                "run with --scale small or --scale paper to train on it")
    return f"data: fixture files (the smoke scale), not the real {names}"
