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

from auxnb.tasks import INDEX_KEY, MISSING_CLASS, PRIMARY_STREAM, Task, TaskSet, check_target_shape

__all__ = [
    "TaskDataset",
    "DataBundle",
    "View",
    "concat_datasets",
    "as_generator",
    "as_task_dataset",
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


def _warn_targets_among_inputs(frame, inputs, targets) -> None:
    from ..checks import warn_targets_among_inputs

    warn_targets_among_inputs(frame, inputs, targets)


def input_spec(dataset, columns=None):
    from ..checks import input_spec as spec

    return spec(dataset, columns)


def _check_finite_inputs(x: Any, names: Sequence[str] | None = None, overflow: bool = False) -> None:
    """A `ValueError` naming the first row and column of `x` (inputs) that is NaN or ±Inf (issue 26).

    NaN / Inf inputs would make every loss and metric over those rows NaN (a val NaN silently
    makes the first evaluation the best; a test NaN prints as a number). With `overflow`, `x` is
    the float32 copy and an Inf there means the value was too large for float32.
    """
    import numpy as np

    if getattr(x, "dtype", None) is None or x.dtype.kind not in "fc" or x.size == 0:
        return
    bad = ~np.isfinite(x)
    if not bad.any():
        return
    pos = tuple(int(p) for p in np.argwhere(bad)[0])
    rows = int(bad.reshape(len(x), -1).any(axis=1).sum())
    if len(pos) == 2:
        where = f"column {names[pos[1]]!r}" if names is not None else f"column {pos[1]}"
    else:
        where = f"position {pos[1:]}"
    what = "too large for float32 (the dtype inputs are stored in)" if overflow else f"{x[pos]}"
    raise ValueError(
        f"inputs row {pos[0]}, {where} is {what}; {int(bad.sum())} non-finite input value(s) in {rows} row(s). "
        "NaN/Inf inputs make every loss and metric over those rows NaN. Fill or drop those rows first "
        "(e.g. frame.dropna(), or np.isfinite(x).all(axis=1) as a row mask), or rescale the column."
    )


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

    #: the input columns' names when the dataset was read from a DataFrame (`from_pandas`), else None
    columns: tuple[str, ...] | None = None

    def __init__(self, inputs: Tensor, targets: Mapping[str, Tensor], index: Tensor | None = None):
        if not isinstance(inputs, Tensor):
            hint = {"ndarray": "TaskDataset.from_numpy(x, {'label': y})", "DataFrame": "TaskDataset.from_pandas(frame, targets='label')"}
            raise TypeError(
                f"inputs must be a torch.Tensor, got {type(inputs).__name__}; use "
                + hint.get(type(inputs).__name__, "TaskDataset.from_numpy (arrays), from_pandas (DataFrames) or from_dataset (a torch Dataset / DataLoader)")
                + "."
            )
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
                raise TypeError(
                    f"Target {name!r} must be a torch.Tensor, got {type(value).__name__}; for numpy arrays use "
                    "TaskDataset.from_numpy(x, {name: y})."
                )
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

    # ------------------------------------------------------------------ ways in
    @classmethod
    def from_numpy(
        cls,
        inputs: Any,
        targets: Mapping[str, Any],
        index: Any = None,
        *,
        tasks: Iterable[Task] | None = None,
    ) -> "TaskDataset":
        """A dataset from numpy arrays (or anything ``numpy.asarray`` reads: lists, tensors).

        The dataset holds its own copy of the arrays: changing them afterwards (or passing a
        read-only array, e.g. a memory map) never changes the dataset.

        Dtype rule (the same for `from_pandas`):

        * inputs: floating (float16/32/64) and bool become **float32**; integers become **int64**
          (field ids, as recommendation backbones expect; convert uint8 images yourself, e.g.
          ``x.astype(np.float32) / 255``); anything else is an error.
        * targets: integers become int64 (class labels, ``-1`` = missing), floating and bool
          become float32 (binary / regression labels, NaN = missing).
        * with `tasks` (the `TaskSet` or a list of `Task`), each target is made to fit its task:
          a classification target given as floats with whole values becomes int64 with NaN ->
          ``MISSING_CLASS`` (-1); a binary / regression target becomes float32; a fractional
          class label is an error. Shapes are never changed.

        Example:
            >>> import numpy as np
            >>> ds = TaskDataset.from_numpy(np.zeros((3, 2)), {"y": np.array([0, 2, 1])})
            >>> ds.inputs.dtype, ds.targets["y"].dtype
            (torch.float32, torch.int64)
        """
        import numpy as np

        x = _numpy_array(inputs, "inputs")
        if x.ndim < 1:
            raise ValueError("inputs must have a sample dimension (got a scalar).")
        _check_finite_inputs(x)  # issue 26: NaN/Inf inputs refused with row and column
        if x.dtype.kind in "fb":
            with np.errstate(over="ignore"):  # an overflow to Inf is refused just below, naming the row
                x_t = torch.from_numpy(np.array(x, dtype=np.float32, order="C"))  # a copy the dataset owns
            _check_finite_inputs(x_t.numpy(), overflow=True)
        elif x.dtype.kind in "iu":
            x_t = torch.from_numpy(np.array(x, dtype=np.int64, order="C"))
        else:
            raise TypeError(
                f"inputs have dtype {x.dtype}; TaskDataset.from_numpy takes numbers (floating -> float32, "
                "integer -> int64). Encode text or objects as numbers first."
            )
        if not isinstance(targets, Mapping) or not targets:
            raise TypeError(
                "targets must be a non-empty dict task name -> array, e.g. {'label': y}; "
                f"got {type(targets).__name__}."
            )
        by_name = {t.name: t for t in (tasks or ())}
        converted = {name: _target_tensor(name, value, by_name.get(name)) for name, value in targets.items()}
        idx = None if index is None else torch.as_tensor(_numpy_array(index, "index"))
        return cls(x_t, converted, idx)

    @classmethod
    def from_pandas(
        cls,
        frame: Any,
        targets: Mapping[str, str] | Sequence[str] | str,
        inputs: Sequence[str] | None = None,
        *,
        tasks: Iterable[Task] | None = None,
        index: str | None = None,
    ) -> "TaskDataset":
        """A dataset from a pandas DataFrame: some columns are inputs, some are targets.

        Args:
            frame: the DataFrame, one row per sample.
            targets: target columns: a column name, a list of names (each task named after its
                column) or a dict task name -> column.
            inputs: input columns, in order (default: every column that is neither a target nor
                `index`). They are stacked into ``inputs [N, len(inputs)]``.
            tasks: as in `from_numpy` (coerce each target to its task's kind).
            index: a column of integer sample ids (default: ``0 … N-1``).

        Dtype rule: ``category`` columns become their integer codes; then the input columns as a
        whole follow `from_numpy`: any floating or bool column -> all float32, else (all integer)
        int64. Nullable integer targets (``Int64`` with ``<NA>``) keep their missing values
        (``-1`` for a classification task given in `tasks`, else NaN as float32). A text /
        object column is an error naming the column.

        Example:
            >>> import pandas as pd
            >>> df = pd.DataFrame({"a": [0.5, 1.0], "b": [1, 2], "label": [1, 0]})
            >>> ds = TaskDataset.from_pandas(df, targets="label")
            >>> tuple(ds.inputs.shape), ds.inputs.dtype, ds.targets["label"].tolist()
            ((2, 2), torch.float32, [1, 0])
        """
        import numpy as np
        import pandas as pd

        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"from_pandas takes a pandas DataFrame, got {type(frame).__name__}; for arrays use from_numpy.")
        if isinstance(targets, str):
            targets = {targets: targets}
        elif not isinstance(targets, Mapping):
            targets = {c: c for c in targets}
        if not targets:
            raise ValueError("from_pandas needs at least one target column, e.g. targets='label'.")
        columns = list(frame.columns)
        wanted = list(targets.values()) + ([index] if index is not None else []) + list(inputs or [])
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise KeyError(f"Column(s) {missing} are not in the DataFrame; its columns are {columns}.")
        if inputs is None:
            used = set(targets.values()) | ({index} if index is not None else set())
            inputs = [c for c in columns if c not in used]
        if not inputs:
            raise ValueError("No input columns left; pass inputs=[...] with the feature columns.")

        def numeric(col: str, role: str):
            series = frame[col]
            if isinstance(series.dtype, pd.CategoricalDtype):
                return series.cat.codes.to_numpy(dtype=np.int64)
            if series.dtype == bool or pd.api.types.is_bool_dtype(series.dtype):
                return series.to_numpy(dtype=np.float32)
            if pd.api.types.is_integer_dtype(series.dtype):
                if series.isna().any():
                    return series.to_numpy(dtype=np.float64, na_value=np.nan)
                return series.to_numpy(dtype=np.int64)
            if pd.api.types.is_float_dtype(series.dtype):
                return series.to_numpy(dtype=np.float64)
            raise TypeError(
                f"{role} column {col!r} has dtype {series.dtype}; from_pandas takes numbers, bool or category "
                f"columns. Encode it first, e.g. frame[{col!r}] = frame[{col!r}].astype('category')."
            )

        parts = [numeric(c, "input") for c in inputs]
        _check_finite_inputs(np.stack([p.astype(np.float64) for p in parts], axis=1), names=list(inputs))  # issue 26
        if any(p.dtype.kind == "f" for p in parts):
            x = np.stack([p.astype(np.float32) for p in parts], axis=1)
        else:
            x = np.stack(parts, axis=1)
        _check_finite_inputs(x, names=list(inputs), overflow=True)  # issue 26: a value too large for float32
        ids = None if index is None else numeric(index, "index")
        _warn_targets_among_inputs(frame, inputs, targets)  # auxnb.checks
        dataset = cls.from_numpy(x, {name: numeric(col, "target") for name, col in targets.items()}, ids, tasks=tasks)
        dataset.columns = tuple(str(c) for c in inputs)  # RunResult.predict matches a DataFrame's columns by name
        return dataset

    @classmethod
    def from_dataset(
        cls,
        dataset: Any,
        targets: str | Sequence[str] | None = None,
        *,
        tasks: Iterable[Task] | None = None,
    ) -> "TaskDataset":
        """Read any map-style torch ``Dataset`` (or a ``DataLoader``'s ``.dataset``) into memory.

        Each item must be ``(x, y)`` or ``(x, y1, y2, ...)``: ``x`` a tensor or array (all of one
        shape), each ``y`` a number, a tensor or an array; ``y`` may also be a dict task name ->
        value. `targets` names the label positions: one name for ``(x, y)``, one per label for
        ``(x, y1, y2, ...)``; default: the primary task of `tasks`, or ``"label"``.

        The items are read once, in order (``len(dataset)`` calls), and stacked, then converted by
        the `from_numpy` dtype rule. A random augmentation inside the dataset is therefore
        applied once and frozen: give augmentation as ``DataBundle.transform`` instead.

        Example:
            >>> from torch.utils.data import TensorDataset
            >>> ds = TaskDataset.from_dataset(TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 1])), "digit")
            >>> ds
            TaskDataset(n=3, inputs=(2,), targets=[digit])
        """
        import numpy as np
        from torch.utils.data import DataLoader

        if isinstance(dataset, DataLoader):
            dataset = dataset.dataset
        if isinstance(dataset, TaskDataset):
            return dataset
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(
                f"from_dataset takes a map-style torch Dataset (with __len__ and __getitem__) or a DataLoader "
                f"over one, got {type(dataset).__name__}. An IterableDataset has no length: collect it into "
                "arrays and use TaskDataset.from_numpy."
            )
        n = len(dataset)
        if n == 0:
            raise ValueError("The dataset is empty.")
        task_list = list(tasks or ())
        if targets is None:
            primary = [t.name for t in task_list if t.primary]
            targets = primary[0] if primary else "label"
        names = [targets] if isinstance(targets, str) else list(targets)
        xs: list[Any] = []
        ys: dict[str, list[Any]] = {}
        for i in range(n):
            item = dataset[i]
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise TypeError(
                    f"Item {i} of {type(dataset).__name__} is a {type(item).__name__}; from_dataset expects "
                    "(x, y), (x, y1, y2, ...) or (x, {task: y})."
                )
            x, labels = item[0], item[1:]
            if len(labels) == 1 and isinstance(labels[0], Mapping):
                label_map = dict(labels[0])
                label_map.pop(INDEX_KEY, None)
            else:
                if len(labels) != len(names):
                    raise ValueError(
                        f"Item {i} carries {len(labels)} label(s) but targets names {len(names)} ({names}); "
                        "pass one name per label position, e.g. targets=['label', 'attribute']."
                    )
                label_map = dict(zip(names, labels))
            xs.append(_to_numpy(x))
            for name, value in label_map.items():
                ys.setdefault(name, []).append(_to_numpy(value))
        shapes = {a.shape for a in xs}
        if len(shapes) > 1:
            raise ValueError(
                f"Items have inputs of different shapes {sorted(shapes)[:3]}; resize them to one shape in the "
                "dataset (e.g. a torchvision Resize + CenterCrop transform)."
            )
        return cls.from_numpy(np.stack(xs), {k: np.stack(v) for k, v in ys.items()}, tasks=task_list)

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


def _to_numpy(value: Any):
    import numpy as np

    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _numpy_array(value: Any, what: str):
    import numpy as np

    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    try:
        out = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} could not be read as an array ({err}).") from None
    if out.dtype == object:
        raise TypeError(f"{what} is an object array (mixed types or ragged rows); give a numeric array of one shape.")
    return out


def _target_tensor(name: str, value: Any, task: Task | None) -> Tensor:
    import numpy as np

    y = _numpy_array(value, f"target {name!r}")
    if y.ndim < 1:
        raise ValueError(f"Target {name!r} must have a sample dimension (got a scalar).")
    if y.dtype.kind not in "iufb":
        raise TypeError(f"Target {name!r} has dtype {y.dtype}; give numbers (class ids as integers).")
    if task is not None and task.kind == "classification" and y.dtype.kind in "fb":
        y = y.astype(np.float64)
        finite = np.isfinite(y)
        if not np.all(y[finite] == np.round(y[finite])) or np.isinf(y).any():
            raise ValueError(
                f"Target {name!r}: task {task.name!r} is a classification task but its labels have fractional or "
                "infinite values; give class ids 0 … C-1 (NaN or -1 for a missing label)."
            )
        y = np.where(finite, y, MISSING_CLASS).astype(np.int64)
    elif task is not None and task.kind in ("binary", "regression"):
        y = y.astype(np.float32)
    elif y.dtype.kind in "iu":
        y = y.astype(np.int64)
    else:
        y = y.astype(np.float32)
    out = torch.from_numpy(np.ascontiguousarray(y))
    if task is not None:
        check_target_shape(task, out)  # a [N, 1] column is refused here too, never squeezed (issue 12)
    return out


def as_task_dataset(source: Any, tasks: Iterable[Task] | None = None) -> "TaskDataset":
    """`source` as a `TaskDataset`: a TaskDataset passes through; a torch ``Dataset`` or
    ``DataLoader`` goes through `TaskDataset.from_dataset` (labels named after the primary task).

    Raises:
        TypeError: any other type; the message lists the accepted forms.
    """
    from torch.utils.data import DataLoader

    if isinstance(source, TaskDataset):
        return source
    if isinstance(source, (Dataset, DataLoader)):
        return TaskDataset.from_dataset(source, tasks=tasks)
    raise TypeError(
        f"Expected a TaskDataset, got {type(source).__name__}. Accepted: a TaskDataset; a map-style torch "
        "Dataset or DataLoader (TaskDataset.from_dataset); numpy arrays (TaskDataset.from_numpy(x, {'label': y})); "
        "a pandas DataFrame (TaskDataset.from_pandas(frame, targets='label'))."
    )


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

    def for_method(self, uses_dev: bool, dev_in_train: bool = False) -> "DataBundle":
        """The bundle a method trains on.

        A method that does not use D_dev gets it back in D_train (the papers' fair-comparison
        rule: every method sees the same labelled data); a method that uses it needs a
        non-empty one. With `dev_in_train` (a method that uses D_dev, see
        `auxnb.methods.UpperLevel`) D_train is D_train ∪ D_dev, exactly the training set of a
        method that does not use it, and D_dev stays the upper level's.
        """
        if uses_dev:
            if self.dev is None or len(self.dev) == 0:
                raise ValueError(
                    "This method needs D_dev but the bundle has an empty dev split; "
                    "set dev_size > 0 when building the data."
                )
            if dev_in_train:
                shared = dataclasses.replace(self.for_method(False), dev=self.dev)
                shared.info["sizes"] = shared.describe()
                return shared
            return self
        if self.dev is None:
            return self
        merged = dataclasses.replace(self, train=concat_datasets(self.train, self.dev), dev=None, info=dict(self.info))
        merged.info["sizes"] = merged.describe()
        return merged

    def for_run(self, method: Any) -> "DataBundle":
        """The bundle `method` (an `auxnb.methods.Method`) trains on: `for_method` with its ``uses_dev`` and, when
        it uses D_dev, its upper level's ``dev_in_train``."""
        uses_dev = bool(method.uses_dev)
        return self.for_method(uses_dev, dev_in_train=uses_dev and bool(getattr(method, "dev_in_train", False)))

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
        sizes["inputs"] = input_spec(self.train, self.info.get("input_columns"))  # what predict checks
        return sizes
