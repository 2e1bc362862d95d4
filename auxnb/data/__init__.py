"""Data for auxnb: datasets with per-task targets, the papers' splits, views and sources.

Real loaders fail loudly when their data is missing; nothing here swaps in fake data.
"""

from auxnb.data.core import DataBundle, TaskDataset, View, as_generator, concat_datasets
from auxnb.data.sources import (
    SOURCES,
    SYNTHETIC_AUX,
    SyntheticSource,
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
    build_bundle,
    carve_dev,
    corrupt_labels,
    round_half_up,
    split_indices,
)
from auxnb.data.views import ROTATION_MODES, RotationView

__all__ = [
    "TaskDataset",
    "DataBundle",
    "View",
    "as_generator",
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
]
