"""Tasks: what is predicted, from which input stream, with which per-sample loss and metric.

A `Task` never reduces a loss over the batch and never drops a sample: missing labels
are marked (``MISSING_CLASS`` for class labels, NaN for real-valued labels) and masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "Task",
    "TaskSet",
    "KINDS",
    "MISSING_CLASS",
    "INDEX_KEY",
    "PRIMARY_STREAM",
    "labelled_mask",
    "per_sample_loss",
    "check_target_shape",
    "metric",
]

KINDS = ("classification", "binary", "regression")
#: Class label that marks "no label" (semi-supervised primary task). Never a valid class.
MISSING_CLASS = -1
#: Key under which every sample's stable index travels in its target dict.
INDEX_KEY = "index"
#: Name of the stream that carries the primary dataset.
PRIMARY_STREAM = "primary"
_RESERVED = {INDEX_KEY}
_DEFAULT_METRIC = {"classification": "accuracy", "binary": "auc", "regression": "rmse"}
_METRICS = {"accuracy", "auc", "rmse", "mae", "bce", "logloss"}
#: The metrics each kind of task can be scored with (`metric` reads a binary task's single logit).
_KIND_METRICS = {"classification": ("accuracy",), "binary": ("auc", "logloss", "bce"), "regression": ("rmse", "mae")}
#: Metrics where larger is better.
HIGHER_IS_BETTER = {"accuracy": True, "auc": True, "rmse": False, "mae": False, "logloss": False, "bce": False}


@dataclass(frozen=True, init=False)
class Task:
    """One prediction task of a multi-task model.

    Args:
        name: unique name; also the key of the task's head and of its targets.
        kind: ``"classification"`` (integer labels in ``[0, out_dim)``; cross-entropy),
            ``"binary"`` (labels in {0, 1}, float; logistic loss on one logit) or
            ``"regression"`` (real labels; squared error).
        out_dim: output size of the task's head (classes for classification, 1 otherwise).
        primary: whether this is the primary task. A `TaskSet` has exactly one.
        stream: the input stream the task reads (``"primary"`` unless the task's inputs
            differ from the primary task's, e.g. rotated images or another dataset).
        metric_name: ``accuracy`` (classification), ``auc`` | ``logloss`` (binary), ``rmse`` |
            ``mae`` (regression); default by kind (accuracy, auc, rmse). ``Task(..., metric="auc")`` is the same (the property
            ``task.metric`` reads the metric in use).
        soft_targets: classification only; targets may be probability vectors
            (used for generated labels and MixUp).

    Example:
        >>> t = Task("digit", "classification", 10, primary=True)
        >>> t.loss(torch.zeros(2, 10), torch.tensor([3, MISSING_CLASS])).tolist()
        [2.3025851249694824, 0.0]
    """

    name: str
    kind: str
    out_dim: int = 1
    primary: bool = False
    stream: str = PRIMARY_STREAM
    metric_name: str | None = None
    label_range: tuple[float, float] | None = None
    extra: Mapping[str, object] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Task name must be a non-empty string, got {self.name!r}.")
        if self.name in _RESERVED:
            raise ValueError(f"Task name {self.name!r} is reserved for sample indices; choose another name.")
        if self.kind not in KINDS:
            raise ValueError(f"Task {self.name!r}: unknown kind {self.kind!r}; use one of {', '.join(KINDS)}.")
        if not isinstance(self.out_dim, int) or self.out_dim < 1:
            raise ValueError(f"Task {self.name!r}: out_dim must be a positive int, got {self.out_dim!r}.")
        if self.kind == "classification" and self.out_dim < 2:
            raise ValueError(f"Task {self.name!r}: a classification task needs out_dim >= 2 classes.")
        if self.kind in ("binary", "regression") and self.out_dim != 1:
            raise ValueError(f"Task {self.name!r}: a {self.kind} task has out_dim 1, got {self.out_dim}.")
        if self.metric_name is not None and self.metric_name not in _METRICS:
            raise ValueError(
                f"Task {self.name!r}: unknown metric {self.metric_name!r}; use one of {sorted(_METRICS)}."
            )
        if self.metric_name is not None and self.metric_name not in _KIND_METRICS[self.kind]:
            raise ValueError(
                f"Task {self.name!r}: metric {self.metric_name!r} does not apply to a {self.kind} task (it would be "
                f"computed on the wrong output); use one of {list(_KIND_METRICS[self.kind])}."
            )

    def __init__(self, name: str, kind: str, out_dim: int = 1, primary: bool = False, stream: str = PRIMARY_STREAM,
                 metric_name: str | None = None, label_range: tuple[float, float] | None = None,
                 extra: Mapping[str, object] | None = None, *, metric: str | None = None):
        if metric is not None:
            if metric_name is not None and metric_name != metric:
                raise ValueError(f"Task {name!r}: metric={metric!r} and metric_name={metric_name!r} disagree; give one.")
            metric_name = metric
        for key, value in (("name", name), ("kind", kind), ("out_dim", out_dim), ("primary", primary),
                           ("stream", stream), ("metric_name", metric_name), ("label_range", label_range),
                           ("extra", {} if extra is None else extra)):
            object.__setattr__(self, key, value)
        self.__post_init__()

    @property
    def metric(self) -> str:
        """Name of the evaluation metric."""
        return self.metric_name or _DEFAULT_METRIC[self.kind]

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.metric]

    def labelled(self, target: torch.Tensor) -> torch.Tensor:
        """Boolean mask of samples that carry a label for this task."""
        return labelled_mask(self, target)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (no reduction); exactly 0 where the label is missing."""
        return per_sample_loss(self, output, target)

    def check_targets(self, target: torch.Tensor) -> None:
        """Raise a clear error for labels of the wrong shape or outside the task's range."""
        check_target_shape(self, target)
        if self.kind == "classification" and target.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
            valid = target[target != MISSING_CLASS]
            if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= self.out_dim):
                bad = int(valid.min()) if int(valid.min()) < 0 else int(valid.max())
                raise ValueError(
                    f"Task {self.name!r}: label {bad} is out of range [0, {self.out_dim}); "
                    f"use {MISSING_CLASS} for a missing label or fix out_dim."
                )
        elif self.kind == "binary":
            valid = target[~torch.isnan(target.float())]
            if valid.numel() and not torch.all((valid == 0) | (valid == 1)):
                raise ValueError(f"Task {self.name!r}: binary labels must be 0 or 1 (NaN for missing).")


def labelled_mask(task: Task, target: torch.Tensor) -> torch.Tensor:
    if task.kind == "classification":
        if target.dim() == 2:  # soft labels are always present
            return torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
        return target != MISSING_CLASS
    return ~torch.isnan(target.float())


def check_target_shape(task: Task, target: torch.Tensor) -> None:
    """Targets are ``[N]`` (``[N, classes]`` for soft class labels); anything else is an error, never reshaped.

    A column vector ``[N, 1]`` (what ``df[["col"]].values`` gives) would otherwise broadcast a
    per-sample loss to ``[N, N]`` (issue 12, defect 6).

    Example:
        >>> check_target_shape(Task("r", "regression"), torch.zeros(3, 1))
        Traceback (most recent call last):
        ...
        ValueError: Task 'r': regression targets must have shape [N], got [3, 1]; pass a 1-d column (df['col'].values, not df[['col']].values) or squeeze it (y.squeeze(1)).
    """
    shape = list(target.shape)
    if target.dim() == 1:
        return
    if task.kind == "classification" and target.dim() == 2 and target.is_floating_point() and shape[1] == task.out_dim:
        return  # soft labels: one distribution over the classes per sample
    expected = "[N] (integer class ids) or [N, classes] (float soft labels)" if task.kind == "classification" else "[N]"
    fix = (" pass a 1-d column (df['col'].values, not df[['col']].values) or squeeze it (y.squeeze(1))."
           if target.dim() == 2 and shape[1] == 1 else " give one label per sample.")
    raise ValueError(f"Task {task.name!r}: {task.kind} targets must have shape {expected}, got {shape};{fix}")


def per_sample_loss(task: Task, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample loss of `task`; masked samples get exactly zero (and zero gradient).

    `target` is ``[B]`` (``[B, classes]`` for soft class labels); other shapes are an error.
    """
    check_target_shape(task, target)
    mask = labelled_mask(task, target)
    if task.kind == "classification":
        if target.dim() == 2:  # soft labels (distributions over classes)
            return -(target * F.log_softmax(output, dim=-1)).sum(-1)
        safe = torch.where(mask, target, torch.zeros_like(target))
        loss = F.cross_entropy(output, safe.long(), reduction="none")
    else:
        out = output.reshape(output.shape[0], -1)[:, 0]
        tgt = target.reshape(target.shape[0]).to(out.dtype)
        safe = torch.where(mask, tgt, torch.zeros_like(tgt))
        if task.kind == "binary":
            loss = F.binary_cross_entropy_with_logits(out, safe, reduction="none")
        else:
            loss = (out - safe) ** 2
    return torch.where(mask, loss, torch.zeros_like(loss))


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    # Mann-Whitney U statistic with mid-ranks for ties.
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = torch.argsort(scores)
    ranks = torch.empty_like(scores, dtype=torch.float64)
    sorted_scores = scores[order]
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse, counts = torch.unique(sorted_scores, return_inverse=True, return_counts=True)
    if len(uniq) < len(scores):
        sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks[order])
        ranks[order] = (sums / counts.double())[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def metric(task: Task, outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Evaluate `task`'s metric over all labelled samples (outputs and targets concatenated)."""
    mask = labelled_mask(task, targets)
    outputs, targets = outputs[mask], targets[mask]
    if targets.numel() == 0:
        return math.nan
    name = task.metric
    if name == "accuracy":
        return float((outputs.argmax(-1) == targets).float().mean())
    out = outputs.reshape(outputs.shape[0], -1)[:, 0].double()
    tgt = targets.reshape(-1).double()
    if name == "auc":
        return _auc(out, tgt)
    if name in ("logloss", "bce"):
        return float(F.binary_cross_entropy_with_logits(out, tgt))
    if name == "rmse":
        return float(((out - tgt) ** 2).mean().sqrt())
    if name == "mae":
        return float((out - tgt).abs().mean())
    raise AssertionError(name)


class TaskSet(Sequence[Task]):
    """An ordered set of tasks with exactly one primary task; auxiliary tasks keep their order.

    Example:
        >>> ts = TaskSet([Task("digit", "classification", 10, primary=True),
        ...               Task("rotation", "classification", 4, stream="rotation")])
        >>> ts.primary.name, [t.name for t in ts.auxiliary], ts.streams
        ('digit', ['rotation'], ('primary', 'rotation'))
    """

    def __init__(self, tasks: Iterable[Task]):
        tasks = list(tasks)
        for t in tasks:
            if not isinstance(t, Task):
                raise TypeError(f"TaskSet takes Task objects, got {type(t).__name__}.")
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"Duplicate task names {dup}; every task needs its own name.")
        primaries = [t.name for t in tasks if t.primary]
        if len(primaries) != 1:
            raise ValueError(
                f"Exactly one task must be primary (primary=True); found {len(primaries)}"
                + (f": {primaries}" if primaries else "")
                + "."
            )
        if tasks[[t.primary for t in tasks].index(True)].stream != PRIMARY_STREAM:
            raise ValueError(f"The primary task must read the {PRIMARY_STREAM!r} stream.")
        self._tasks = tasks
        self._by_name = {t.name: t for t in tasks}

    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            try:
                return self._by_name[key]
            except KeyError:
                raise KeyError(f"Unknown task {key!r}; tasks are {list(self._by_name)}.") from None
        return self._tasks[key]

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self):
        return iter(self._tasks)

    def __contains__(self, name) -> bool:  # type: ignore[override]
        return name in self._by_name

    def __repr__(self) -> str:
        return f"TaskSet({self._tasks!r})"

    @property
    def names(self) -> list[str]:
        return [t.name for t in self._tasks]

    @property
    def primary(self) -> Task:
        return next(t for t in self._tasks if t.primary)

    @property
    def auxiliary(self) -> list[Task]:
        return [t for t in self._tasks if not t.primary]

    @property
    def streams(self) -> tuple[str, ...]:
        """Input streams in first-use order (the primary stream first)."""
        seen: list[str] = [PRIMARY_STREAM]
        for t in self._tasks:
            if t.stream not in seen:
                seen.append(t.stream)
        return tuple(seen)

    def on_stream(self, stream: str) -> list[Task]:
        return [t for t in self._tasks if t.stream == stream]
