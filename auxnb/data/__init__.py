"""Data for auxnb: datasets with per-task targets, the papers' splits, views and sources.

Real loaders fail loudly when their data is missing; nothing here swaps in fake data.
"""

from auxnb.data.core import DataBundle, TaskDataset, View, as_generator, as_task_dataset, concat_datasets
from auxnb.data.sources import (
    SOURCES,
    SYNTHETIC_AUX,
    SyntheticSource,
    build_bundle,  # the splits' protocol, also taking a registered source name
    data_root,
    get_source,
    load_digits_source,
    load_mnist_as_digits,
    make_synthetic,
    missing_dataset_error,
    mnist_to_digits,
)
from auxnb.data.splits import (
    apply_label_fraction,
    apply_shots,
    carve_dev,
    corrupt_labels,
    round_half_up,
    split_indices,
)
from auxnb.data.views import ROTATION_MODES, RotationView

# paper datasets (issue 7): real loaders, batch transforms, fixture writers
from auxnb.data.amazon import load_amazon
from auxnb.data.augment import ImageTransform, channel_stats
from auxnb.data.cifar import CifarSplit, load_cifar10, load_cifar100
from auxnb.data.cub import CubData, load_cub
from auxnb.data.fashion import load_fashion_mnist
from auxnb.data.movielens import RatingsData, load_movielens_100k, load_movielens_1m
from auxnb.data.pet import PetData, load_pet
from auxnb.data import fixtures

__all__ = [
    "TaskDataset",
    "DataBundle",
    "View",
    "as_generator",
    "as_task_dataset",
    "concat_datasets",
    "split_indices",
    "carve_dev",
    "apply_label_fraction",
    "apply_shots",
    "corrupt_labels",
    "build_bundle",
    "round_half_up",
    "RotationView",
    "ROTATION_MODES",
    "SOURCES",
    "SYNTHETIC_AUX",
    "SyntheticSource",
    "make_synthetic",
    "data_root",
    "missing_dataset_error",
    "get_source",
    "load_digits_source",
    "load_mnist_as_digits",
    "mnist_to_digits",
    "ImageTransform",
    "channel_stats",
    "CifarSplit",
    "load_cifar10",
    "load_cifar100",
    "CubData",
    "load_cub",
    "PetData",
    "load_pet",
    "load_fashion_mnist",
    "RatingsData",
    "load_movielens_100k",
    "load_movielens_1m",
    "load_amazon",
    "fixtures",
]
