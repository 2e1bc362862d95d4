"""The data contract: `TaskDataset` (inputs + per-task targets + stable sample ids) and `DataBundle`.

A sample's id (``index``) is fixed when the dataset is made and survives every subset and
concatenation; a missing label is marked (``MISSING_CLASS`` or NaN), never dropped silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from auxnb.tasks import INDEX_KEY, MISSING_CLASS, PRIMARY_STREAM, Task, TaskSet

__all__ = [
    "TaskDataset",
    "DataBundle",
    "View",
    "concat_datasets",
    "as_generator",
]

#: A derived stream: maps a primary-stream batch ``(x, targets)`` to the stream's batch.
View = Callable[[Tensor, dict[str, Tensor]], tuple[Tensor, dict[str, Tensor]]]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def as_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """A CPU `torch.Generator` from a generator or an int seed (``None`` means seed 0).

    A generator passed in is used as is (its state advances); an int gives a fresh,
    reproducible one, so the same seed always gives the same draws.
    """
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        generator = 0
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}.")
    return torch.Generator().manual_seed(generator)


def _as_index(idx: Tensor | Sequence[int] | slice, n: int) -> Tensor | slice:
    if isinstance(idx, slice):
        return idx
    idx = torch.as_tensor(idx)
    if idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise ValueError(f"Boolean subset mask has shape {tuple(idx.shape)}; expected ({n},).")
        return idx.nonzero().flatten()
    if idx.dtype not in _INT_DTYPES:
        raise TypeError(f"Subset indices must be integers or a boolean mask, got dtype {idx.dtype}.")
    return idx.long().flatten()


def _take(t: Tensor, pos: Tensor | slice) -> Tensor:
    return t[pos.to(t.device) if isinstance(pos, Tensor) else pos]


class TaskDataset(Dataset):
    """A map-style dataset of inputs with one target tensor per task and a stable sample id.

    Args:
        inputs: one tensor whose first dimension is the sample dimension: images
            ``[N, C, H, W]`` (float) or field ids ``[N, fields]`` (long) for recommendation.
        targets: task name -> tensor with first dimension ``N``. Class labels are long with
            ``MISSING_CLASS`` (-1) for a missing label; binary / regression labels are float
            with NaN for a missing label; soft labels are ``[N, classes]``.
        index: stable sample ids, long ``[N]``; defaults to ``arange(N)``. Subsets keep the
            ids of the dataset they were taken from, so per-sample state (N-JTDS weights,
            corruption flags) can be looked up by id.

    ``dataset[i]`` is ``(inputs[i], {task: targets[task][i], ..., "index": index[i]})``, so
    torch's default collate yields ``(x [B, ...], {task: [B], "index": [B]})``.

    Example:
        >>> ds = TaskDataset(torch.zeros(4, 1, 2, 2), {"digit": torch.tensor([0, 1, 2, -1])})
        >>> x, t = ds.subset([3, 1])[0]
        >>> int(t["digit"]), int(t["index"])
        (-1, 3)
    """

    def __init__(self, inputs: Tensor, targets: Mapping[str, Tensor], index: Tensor | None = None):
        if not isinstance(inputs, Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(inputs).__name__}.")
        if inputs.dim() < 1:
            raise ValueError("inputs must have a sample dimension (got a 0-d tensor).")
        n = inputs.shape[0]
        checked: dict[str, Tensor] = {}
        for name, value in targets.items():
            if name == INDEX_KEY:
                raise ValueError(
                    f"Target name {INDEX_KEY!r} is reserved for sample ids; pass ids as index=..., "
                    "not as a target."
                )
            if not isinstance(value, Tensor):
                raise TypeError(f"Target {name!r} must be a torch.Tensor, got {type(value).__name__}.")
            if value.dim() < 1 or value.shape[0] != n:
                got = value.shape[0] if value.dim() else "a 0-d tensor"
                raise ValueError(f"Target {name!r} has length {got} but inputs have length {n}.")
            checked[name] = value
        if index is None:
            index = torch.arange(n, device=inputs.device)
        else:
            index = torch.as_tensor(index)
            if index.dtype not in _INT_DTYPES:
                raise TypeError(f"index must hold integer sample ids, got dtype {index.dtype}.")
            if index.dim() != 1 or index.shape[0] != n:
                raise ValueError(f"index has shape {tuple(index.shape)} but inputs have length {n}.")
            index = index.long()
        self.inputs = inputs
        self.targets: dict[str, Tensor] = checked
        self.index = index

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        sample = {name: t[i] for name, t in self.targets.items()}
        sample[INDEX_KEY] = self.index[i]
        return self.inputs[i], sample

    def gather(self, idx: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """A whole batch at positions `idx` in one indexing op (what a collate of items would give)."""
        pos = _as_index(idx, len(self))
        sample = {name: _take(t, pos) for name, t in self.targets.items()}
        sample[INDEX_KEY] = _take(self.index, pos)
        return _take(self.inputs, pos), sample

    def __repr__(self) -> str:
        keys = ", ".join(self.targets)
        return f"TaskDataset(n={len(self)}, inputs={tuple(self.inputs.shape[1:])}, targets=[{keys}])"

    @property
    def task_names(self) -> list[str]:
        return list(self.targets)

    def subset(self, idx: Tensor | Sequence[int] | slice) -> "TaskDataset":
        """The samples at positions `idx` (ints or a boolean mask); their ids are kept."""
        pos = _as_index(idx, len(self))
        return TaskDataset(
            _take(self.inputs, pos),
            {name: _take(t, pos) for name, t in self.targets.items()},
            _take(self.index, pos),
        )

    def concat(self, other: "TaskDataset") -> "TaskDataset":
        """This dataset followed by `other` (same target names, dtypes and input shape)."""
        return concat_datasets(self, other)

    def with_targets(self, **updates: Tensor | None) -> "TaskDataset":
        """A copy with targets replaced or added; ``name=None`` removes a target."""
        targets = dict(self.targets)
        for name, value in updates.items():
            if value is None:
                targets.pop(name, None)
            else:
                targets[name] = value
        return TaskDataset(self.inputs, targets, self.index)

    def to(self, device: torch.device | str) -> "TaskDataset":
        return TaskDataset(
            self.inputs.to(device), {k: v.to(device) for k, v in self.targets.items()}, self.index.to(device)
        )

    def positions_of(self, ids: Tensor) -> Tensor:
        """Positions of the samples whose ids are `ids` (each id must be present)."""
        ids = torch.as_tensor(ids).long().flatten()
        order = torch.argsort(self.index)
        sorted_ids = self.index[order]
        pos = torch.searchsorted(sorted_ids, ids).clamp_max(max(len(self) - 1, 0))
        if len(self) == 0 or not torch.equal(sorted_ids[pos], ids):
            raise KeyError("Some sample ids are not in this dataset.")
        return order[pos]

    def validate_targets(self, tasks: Iterable[Task], *, require: bool = True) -> None:
        """Check every task's targets (label range, dtype); with `require`, each must be present."""
        for task in tasks:
            if task.name not in self.targets:
                if require:
                    raise KeyError(
                        f"Task {task.name!r} has no targets in this dataset; targets are {list(self.targets)}."
                    )
                continue
            target = self.targets[task.name]
            if task.kind == "classification" and target.dim() == 1 and target.dtype not in _INT_DTYPES:
                raise TypeError(
                    f"Task {task.name!r}: class labels must be an integer tensor (MISSING_CLASS={MISSING_CLASS} "
                    f"for a missing label), got dtype {target.dtype}."
                )
            if task.kind in ("binary", "regression") and not target.is_floating_point():
                raise TypeError(
                    f"Task {task.name!r}: {task.kind} labels must be a float tensor (NaN for a missing label), "
                    f"got dtype {target.dtype}."
                )
            task.check_targets(target)


def concat_datasets(*datasets: TaskDataset) -> TaskDataset:
    """Concatenate datasets with the same target names; sample ids are kept as they are."""
    if not datasets:
        raise ValueError("concat_datasets needs at least one dataset.")
    first = datasets[0]
    for other in datasets[1:]:
        if set(other.targets) != set(first.targets):
            raise ValueError(
                f"Cannot concatenate datasets with different targets: {sorted(first.targets)} vs "
                f"{sorted(other.targets)}."
            )
        if other.inputs.shape[1:] != first.inputs.shape[1:] or other.inputs.dtype != first.inputs.dtype:
            raise ValueError(
                f"Cannot concatenate inputs of shape {tuple(first.inputs.shape[1:])} ({first.inputs.dtype}) and "
                f"{tuple(other.inputs.shape[1:])} ({other.inputs.dtype})."
            )
        for name, t in first.targets.items():
            o = other.targets[name]
            if o.dtype != t.dtype or o.shape[1:] != t.shape[1:]:
                raise ValueError(f"Cannot concatenate target {name!r}: dtype/shape {t.dtype} vs {o.dtype}.")
    return TaskDataset(
        torch.cat([d.inputs for d in datasets]),
        {name: torch.cat([d.targets[name] for d in datasets]) for name in first.targets},
        torch.cat([d.index for d in datasets]),
    )


def _labelled_count(dataset: TaskDataset | None, task: Task) -> int:
    if dataset is None or task.name not in dataset.targets:
        return 0
    return int(task.labelled(dataset.targets[task.name]).sum())


@dataclass
class DataBundle:
    """Everything a run trains and evaluates on, with the papers' three data roles kept apart.

    Attributes:
        tasks: the task set; tasks on the ``"primary"`` stream read `train` (and `dev`,
            `val`, `test`), every other stream is either a view or an `aux_train` dataset.
        train: D_train on the primary stream (D_dev removed).
        dev: D_dev, carved from the training split, for the upper level of bi-level
            methods; ``None`` when no dev split was made.
        val: model selection only. test: read once, at the best-on-val checkpoint.
        aux_train: Different-Input streams (stream name -> dataset), e.g. ``"mnist"``.
        views: derived streams (stream name -> ``(x, targets) -> (x, targets)``) applied to
            the primary training batch, e.g. ``"rotation"``.
        info: provenance: ``source``, ``seed``, ``label_fraction``, ``shots``,
            ``label_noise``, ``corrupted`` (bool tensor indexed by sample id, True where the
            training label was corrupted; ``None`` without noise), sizes.
        transform: input transform ``x -> x`` the Trainer applies, on the batch's device, to
            training batches of every dataset stream (primary and `aux_train`) before the
            views, e.g. random crop + flip + Z-score of uint8 images; ``None``: inputs as stored.
        eval_transform: input transform for D_dev, D_val and D_test batches (e.g. centre crop +
            Z-score); ``None``: inputs as stored.
    """

    tasks: TaskSet
    train: TaskDataset
    dev: TaskDataset | None = None
    val: TaskDataset | None = None
    test: TaskDataset | None = None
    aux_train: dict[str, TaskDataset] = field(default_factory=dict)
    views: dict[str, View] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    transform: Callable[[Tensor], Tensor] | None = None
    eval_transform: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tasks, TaskSet):
            self.tasks = TaskSet(self.tasks)
        both = sorted(set(self.aux_train) & set(self.views))
        if both:
            raise ValueError(f"Stream(s) {both} are given both as a view and as an aux_train dataset; pick one.")
        for name in (*self.aux_train, *self.views):
            if name == PRIMARY_STREAM:
                raise ValueError(f"{PRIMARY_STREAM!r} is the primary stream; it cannot be a view or aux dataset.")
        for stream in self.tasks.streams:
            if stream != PRIMARY_STREAM and stream not in self.aux_train and stream not in self.views:
                readers = [t.name for t in self.tasks.on_stream(stream)]
                raise ValueError(
                    f"Task(s) {readers} read stream {stream!r}, but the bundle has neither a view nor an "
                    f"aux_train dataset named {stream!r} (views: {list(self.views)}, aux_train: "
                    f"{list(self.aux_train)})."
                )
        for stream, view in self.views.items():
            # a view may declare the targets it adds (RotationView does): catch a name mismatch now
            declared = getattr(view, "task_names", None)
            if declared is not None:
                produced = set(declared) | set(self.train.targets)  # views carry the original targets too
                missing = [t.name for t in self.tasks.on_stream(stream) if t.name not in produced]
                if missing:
                    raise ValueError(
                        f"Task(s) {missing} read view {stream!r}, which only produces targets {sorted(produced)}."
                    )
        primary_tasks = self.tasks.on_stream(PRIMARY_STREAM)
        self.train.validate_targets(primary_tasks)
        for split in (self.dev, self.val, self.test):
            if split is not None:
                split.validate_targets(primary_tasks)
        for stream, dataset in self.aux_train.items():
            dataset.validate_targets(self.tasks.on_stream(stream))

    def for_method(self, uses_dev: bool) -> "DataBundle":
        """The bundle a method trains on.

        A method that does not use D_dev gets it back in D_train (the papers' fair-comparison
        rule: every method sees the same labelled data); a method that uses it needs a
        non-empty one.
        """
        if uses_dev:
            if self.dev is None or len(self.dev) == 0:
                raise ValueError(
                    "This method needs D_dev but the bundle has an empty dev split; "
                    "set dev_size > 0 when building the data."
                )
            return self
        if self.dev is None:
            return self
        merged = dataclasses.replace(self, train=concat_datasets(self.train, self.dev), dev=None, info=dict(self.info))
        merged.info["sizes"] = merged.describe()
        return merged

    def describe(self) -> dict[str, Any]:
        """Split sizes (and labelled counts of the primary task) as a plain dict."""
        primary = self.tasks.primary
        sizes: dict[str, Any] = {}
        for name in ("train", "dev", "val", "test"):
            split = getattr(self, name)
            sizes[name] = 0 if split is None else len(split)
        sizes["train_labelled"] = _labelled_count(self.train, primary)
        sizes["dev_labelled"] = _labelled_count(self.dev, primary)
        sizes["aux_train"] = {name: len(d) for name, d in self.aux_train.items()}
        sizes["views"] = list(self.views)
        return sizes
