"""A run's results out: `predict` on new inputs and `RunResult.save` / `load` in one file.

The file is an auxnb checkpoint (`auxnb.checkpoint`: atomic, only tensors and plain values, read
back with ``weights_only=True``) of kind ``auxnb.RunResult``; it never pickles code. Nothing here trains or prints.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from .tasks import Task, TaskSet

__all__ = ["RunResult", "predict", "save", "load", "FORMAT"]

FORMAT = "auxnb.RunResult"
VERSION = 1


@dataclass
class RunResult:
    """Everything a run produced: metrics at the best-on-val checkpoint, history, trace, config."""

    val_metric: float
    test_metric: float
    metric_name: str
    history: pd.DataFrame
    trace: list[dict[str, Any]]
    config: dict[str, Any]
    seed: int
    #: In seconds, ``total_s`` is everything this result cost (when a selection trained several runs,
    #: HPO-tune's trials or the do-no-harm guard's candidates, their sum; then ``fits`` is their
    #: number and ``run_total_s`` the kept run's own); ``lower_s``, ``upper_s`` and ``per_step_s``
    #: are the kept run's lower and upper steps.
    timings: dict[str, float]
    best_step: int
    memory: dict[str, float] = field(default_factory=dict)
    trace_trials: list[dict[str, Any]] | None = None
    #: the trained model (best-on-val weights, eval mode); None after `load` without a model
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    #: the run's tasks and the bundle's input transforms (what `predict` applies: `eval_transform`)
    tasks: TaskSet | None = field(default=None, repr=False, compare=False)
    transform: Callable[[Tensor], Tensor] | None = field(default=None, repr=False, compare=False)
    eval_transform: Callable[[Tensor], Tensor] | None = field(default=None, repr=False, compare=False)
    #: the method's learned φ at the end of training (`method.state_dict()`: importances, schedule, ...)
    phi: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    #: the best-on-val weights (a CPU state_dict)
    weights: dict[str, Tensor] | None = field(default=None, repr=False, compare=False)
    #: a selected run (`auxnb.selection`: the do-no-harm guard, HPO-tune's search): every candidate's
    #: own RunResult by name (``result.candidates["maoal"].phi``, its history and trace); which one
    #: was kept and every candidate's D_val metric are in ``config["selection"]``. Empty for a single
    #: run; not written by `save` (save a candidate on its own).
    candidates: dict[str, "RunResult"] = field(default_factory=dict, repr=False, compare=False)

    def predict(self, inputs: Any, task: str | None = None, *, batch_size: int = 512, device=None) -> Tensor:
        """The model's outputs for new `inputs` (eval mode, no gradients, `eval_transform` applied).

        Args:
            inputs: a tensor or numpy array ``[N, ...]`` shaped like the training inputs (numpy
                follows `TaskDataset.from_numpy`'s dtype rule: floating -> float32).
            task: which head (default: the primary task).
            batch_size: inputs per forward pass.
            device: where to compute (default: where the model is).

        Returns:
            a CPU tensor: ``[N, classes]`` logits for a classification task (``.argmax(1)`` gives
            the class), the head's raw output otherwise.
        """
        return predict(self, inputs, task, batch_size=batch_size, device=device)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the best weights, tasks, φ, transforms, metrics, history, trace and config to one file.

        The file holds only tensors and plain values, so `RunResult.load` reads it with
        ``torch.load(weights_only=True)``. Transforms are stored when they are auxnb's
        `ImageTransform` (or None); another callable is recorded by name only (give it to
        `load`).
        """
        return save(self, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike, model: nn.Module | Callable[[], nn.Module] | None = None, *,
        transform=None, eval_transform=None,
    ) -> "RunResult":
        """Read a file written by `save`; with `model` (a module of the same architecture, or a
        function that builds one) the best weights are loaded into it and it is put in eval mode,
        so `predict` works (a `MultiHeadModel`'s task heads load whether the file and the model store
        them one module each or batched: `MultiHeadModel.adapt_head_layout`). `transform` /
        `eval_transform` replace transforms that were not stored."""
        return load(path, model, transform=transform, eval_transform=eval_transform)

    def trace_frame(self) -> pd.DataFrame:
        """The trace as a wide DataFrame (one row per evaluation; array values kept as objects)."""
        return pd.DataFrame(self.trace)

    def summary(self) -> dict[str, Any]:
        return {
            "method": self.config.get("method"),
            "seed": self.seed,
            f"val_{self.metric_name}": self.val_metric,
            f"test_{self.metric_name}": self.test_metric,
            "best_step": self.best_step,
            "seconds": self.timings.get("total_s"),
        }

    def __repr__(self) -> str:
        return (
            f"RunResult(method={self.config.get('method')!r}, seed={self.seed}, "
            f"val_{self.metric_name}={self.val_metric:.4f}, test_{self.metric_name}={self.test_metric:.4f}, "
            f"best_step={self.best_step})"
        )



# ------------------------------------------------------------------ predict
@torch.no_grad()
def predict(result: Any, inputs: Any, task: str | None = None, *, batch_size: int = 512, device=None) -> Tensor:
    """`RunResult.predict`: outputs of one head for new inputs (eval mode, no grad, eval transform)."""
    model = result.model
    if model is None:
        raise ValueError(
            "This RunResult has no model (it was loaded without one); load it with "
            "RunResult.load(path, model=...) passing a model of the same architecture."
        )
    tasks: TaskSet | None = result.tasks
    name = task if task is not None else (tasks.primary.name if tasks is not None else None)
    if name is None:
        raise ValueError("Give task=... (this result does not know its tasks).")
    if tasks is not None and name not in tasks.names:
        raise KeyError(f"Unknown task {name!r}; this run's tasks are {tasks.names}.")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    from .checks import predict_inputs

    x = _as_inputs(predict_inputs(inputs, (result.config.get("data") or {}).get("inputs")))  # columns, shape, dtype
    param = next(model.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    was_training = model.training
    model.eval()
    outs = []
    try:
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size].to(device)
            if result.eval_transform is not None:
                xb = result.eval_transform(xb)
            _, out = model(xb, [name])
            outs.append(out[name].detach().float().cpu())
    finally:
        model.train(was_training)
    if not outs:
        raise ValueError("predict got no inputs (0 samples).")
    return torch.cat(outs)


def _as_inputs(inputs: Any) -> Tensor:
    if isinstance(inputs, Tensor):
        x = inputs
    else:
        try:
            arr = np.asarray(inputs)
        except (TypeError, ValueError) as err:
            raise TypeError(f"inputs must be a tensor or a numpy array, got {type(inputs).__name__} ({err}).") from None
        if arr.dtype.kind in "fb":
            x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        elif arr.dtype.kind in "iu":
            x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.int64))
        else:
            raise TypeError(f"inputs have dtype {arr.dtype}; give numbers (a float array for images / features).")
    if x.dim() < 1:
        raise ValueError("inputs must have a sample dimension [N, ...].")
    if x.dtype == torch.float64:
        x = x.float()  # the from_numpy rule: floating inputs are float32
    return x


# ------------------------------------------------------------------ save / load
def _plain(value: Any) -> Any:
    """Tensors, numpy values, numbers, strings and containers of them (anything else as its repr),
    encoded the way auxnb checkpoints are (`auxnb.checkpoint.encode`)."""
    from .checkpoint import encode

    def safe(v: Any) -> Any:
        if isinstance(v, (Tensor, np.ndarray, np.generic, bool, int, float, str, bytes)) or v is None:
            return v.detach().cpu() if isinstance(v, Tensor) else v
        if isinstance(v, dict):
            return {str(k): safe(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(safe(x) for x in v)
        return repr(v)

    return encode(safe(value))


def _unplain(value: Any) -> Any:
    from .checkpoint import decode

    return decode(value)


def _transform_spec(transform: Callable | None) -> dict[str, Any] | None:
    from .data.augment import ImageTransform

    if transform is None:
        return None
    if type(transform) is ImageTransform:
        t = transform
        return {"kind": "ImageTransform", "mean": list(t.mean), "std": list(t.std), "crop": t.crop, "pad": t.pad,
                "flip": t.flip, "random": t.random}
    return {"kind": "unsaved", "repr": repr(transform)}


def _transform_from(spec: dict[str, Any] | None, given: Callable | None, which: str, strict: bool) -> Callable | None:
    from .data.augment import ImageTransform

    if given is not None:
        return given
    if spec is None:
        return None
    if spec.get("kind") == "ImageTransform":
        return ImageTransform(spec["mean"], spec["std"], crop=spec["crop"], pad=spec["pad"], flip=spec["flip"],
                              random=spec["random"])
    if not strict:
        return None
    raise ValueError(
        f"The run used a custom {which} ({spec.get('repr')}) that a results file cannot store; pass it again: "
        f"RunResult.load(path, model, {which}=...)."
    )


def _task_dict(task: Task) -> dict[str, Any]:
    return {"name": task.name, "kind": task.kind, "out_dim": task.out_dim, "primary": task.primary,
            "stream": task.stream, "metric_name": task.metric_name,
            "label_range": None if task.label_range is None else list(task.label_range)}


def save(result: Any, path: str | os.PathLike) -> Path:
    """`RunResult.save` (see there)."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file name such as run.pt.")
    if not path.parent.exists():
        raise FileNotFoundError(f"Folder {path.parent} does not exist; create it first.")
    weights = result.weights
    if weights is None and result.model is not None:
        weights = result.model.state_dict()
    history = result.history if isinstance(result.history, pd.DataFrame) else pd.DataFrame(result.history)
    payload = {
        "kind": FORMAT,
        "version": VERSION,
        "val_metric": float(result.val_metric),
        "test_metric": float(result.test_metric),
        "metric_name": result.metric_name,
        "seed": int(result.seed),
        "best_step": int(result.best_step),
        "weights": None if weights is None else {k: v.detach().cpu() for k, v in weights.items()},
        "tasks": None if result.tasks is None else [_task_dict(t) for t in result.tasks],
        "phi": _plain(result.phi),
        "transform": _transform_spec(result.transform),
        "eval_transform": _transform_spec(result.eval_transform),
        "history": {"columns": [str(c) for c in history.columns],
                    "rows": [[_plain(v) for v in row] for row in history.itertuples(index=False)]},
        "trace": _plain(result.trace),
        "trace_trials": _plain(result.trace_trials),
        "config": _plain(result.config),
        "timings": _plain(result.timings),
        "memory": _plain(result.memory),
    }
    from . import checkpoint

    checkpoint.save(path, payload)  # atomic, in the checkpoint format (weights_only=True readable)
    return path


def load(path: str | os.PathLike, model: nn.Module | Callable[[], nn.Module] | None = None, *,
         transform: Callable | None = None, eval_transform: Callable | None = None) -> Any:
    """`RunResult.load` (see there)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No results file at {path}; write one with result.save(path).")
    from . import checkpoint

    try:
        payload = checkpoint.load(path, remedy="pass a file written by result.save(path)")
    except checkpoint.CheckpointError as err:
        raise ValueError(f"{path} is not a results file written by RunResult.save: {err}") from None
    if payload.get("kind") != FORMAT:
        raise ValueError(
            f"{path} is not a results file written by RunResult.save (it is a training checkpoint: continue that run "
            "with Trainer(..., checkpoint_dir=..., resume=True))."
        )
    if payload.get("version", 0) > VERSION:
        raise ValueError(f"{path} was written by a newer auxnb (format version {payload['version']}); upgrade auxnb.")
    tasks = None
    if payload["tasks"] is not None:
        tasks = TaskSet([Task(**{**t, "label_range": None if t["label_range"] is None else tuple(t["label_range"])})
                         for t in payload["tasks"]])
    weights = payload["weights"]
    if model is not None:
        if not isinstance(model, nn.Module):
            if not callable(model):
                raise TypeError(f"model must be an nn.Module or a function that builds one, got {type(model).__name__}.")
            model = model()
        if weights is None:
            raise ValueError(f"{path} holds no weights.")
        from .models import MultiHeadModel

        if isinstance(model, MultiHeadModel):
            # heads saved one module each load into a model that banks them, and the reverse (issue 23)
            try:
                weights = model.adapt_head_layout(weights)
            except ValueError as err:
                raise ValueError(f"The weights in {path} do not fit this model: {err} Pass a model of the architecture "
                                 "the run trained.") from None
        try:
            model.load_state_dict(weights)
        except RuntimeError as err:
            raise ValueError(
                f"The weights in {path} do not fit this model ({str(err).splitlines()[0]} …); pass a model of the "
                "architecture the run trained."
            ) from None
        model.eval()
    history = pd.DataFrame(payload["history"]["rows"], columns=payload["history"]["columns"])
    return RunResult(
        val_metric=payload["val_metric"],
        test_metric=payload["test_metric"] if payload["test_metric"] is not None else math.nan,
        metric_name=payload["metric_name"],
        history=history,
        trace=_unplain(payload["trace"]),
        config=_unplain(payload["config"]),
        seed=payload["seed"],
        timings=payload["timings"],
        best_step=payload["best_step"],
        memory=payload["memory"],
        trace_trials=_unplain(payload["trace_trials"]),
        model=model,
        tasks=tasks,
        transform=_transform_from(payload["transform"], transform, "transform", strict=False),
        # predict applies the evaluation transform: without it, predictions would be silently wrong
        eval_transform=_transform_from(payload["eval_transform"], eval_transform, "eval_transform", strict=model is not None),
        phi=_unplain(payload["phi"]),
        weights=weights,
    )
