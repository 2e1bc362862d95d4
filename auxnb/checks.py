"""Checks the Trainer runs in its constructor, before any work: its arguments and the model contract.

Each failure is one error that names the problem and the fix. The model check is a dry run on
two training samples in eval mode without gradients: it never changes the model (weights,
buffers, mode) or the global random state.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from .tasks import PRIMARY_STREAM, Task, TaskSet

__all__ = ["MODEL_CONTRACT", "check_trainer_args", "check_model", "OPTIMIZERS", "check_dev_leaves_training",
           "input_spec", "predict_inputs", "warn_targets_among_inputs", "TargetAmongInputsWarning"]

OPTIMIZERS = ("sgd", "adam", "adamw")

#: The model contract, as the errors state it.
MODEL_CONTRACT = (
    "auxnb's model contract: model(x, task_names) -> (features, outputs), where x is a batch of inputs "
    "[B, ...] as stored in the TaskDataset (after the bundle's transform), features is a float tensor "
    "[B, d] and outputs a dict task name -> float tensor: [B, classes] logits for a classification task, "
    "[B] or [B, 1] for a binary (logit) or regression task. Wrap a plain backbone (x -> [B, d]) with "
    "MultiHeadModel.wrap(backbone, tasks)."
)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))


def check_trainer_args(
    *,
    epochs: Any,
    steps: Any,
    batch_size: Any,
    optimizer: Any,
    lr: Any,
    momentum: Any,
    weight_decay: Any,
    eval_every: Any,
    grad_clip: Any,
    seed: Any,
) -> None:
    """Raise a `ValueError` / `TypeError` naming the first bad Trainer argument and its fix."""
    if epochs is None and steps is None:
        raise ValueError("Give epochs (passes over D_train) or steps (lower steps), e.g. epochs=10.")
    for name, value in (("epochs", epochs), ("steps", steps)):
        if value is None:
            continue
        if not _is_int(value):
            raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__}).")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}; give a positive number of {name}.")
    if not _is_int(batch_size):
        raise TypeError(f"batch_size must be a positive int, got {batch_size!r} ({type(batch_size).__name__}); e.g. batch_size=64.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not callable(optimizer) and optimizer not in OPTIMIZERS:
        raise ValueError(
            f"Unknown optimizer {optimizer!r}; use one of {', '.join(map(repr, OPTIMIZERS))} or a callable "
            "params -> torch.optim.Optimizer."
        )
    for name, value, low, strict in (("lr", lr, 0.0, True), ("momentum", momentum, 0.0, False),
                                     ("weight_decay", weight_decay, 0.0, False)):
        if not _is_real(value):
            raise TypeError(f"{name} must be a finite number, got {value!r} ({type(value).__name__}); e.g. lr=1e-3.")
        if value < low or (strict and value == low):
            raise ValueError(f"{name} must be {'>' if strict else '>='} {low:g}, got {value}.")
    if eval_every is not None:
        if not _is_int(eval_every):
            raise TypeError(f"eval_every must be a positive int (lower steps) or None, got {eval_every!r}.")
        if eval_every < 1:
            raise ValueError(f"eval_every must be >= 1 lower step (or None: once per epoch), got {eval_every}.")
    if grad_clip is not None:
        if not _is_real(grad_clip):
            raise TypeError(f"grad_clip must be a number >= 0 or None (no clipping), got {grad_clip!r}.")
        if grad_clip < 0:
            raise ValueError(
                f"grad_clip must be >= 0 (the largest norm of the update direction) or None, got {grad_clip}; "
                "a negative value would reverse the gradient."
            )
    if not _is_int(seed):
        raise TypeError(f"seed must be an int in 0 … 2**63-1, got {seed!r} ({type(seed).__name__}).")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must lie in 0 … 2**63-1, got {seed}.")


def check_splits(data: Any) -> None:
    """D_train and D_val must be non-empty; D_test may be ``None`` (then `test_metric` is NaN)."""
    if data.train is None or len(data.train) == 0:
        raise ValueError("The bundle's training split is empty; give build_bundle a dataset with more samples.")
    if data.val is None or len(data.val) == 0:
        raise ValueError(
            "The bundle has no validation split, which selects the best weights; build it with val_size > 0 "
            "(CLI: --set val_size=N with N >= 1)."
        )
    if data.test is not None and len(data.test) == 0:
        raise ValueError(
            "The bundle's test split is empty; build it with test_size > 0, or pass test=None to train "
            "without a test split (test_metric is then NaN)."
        )


def _two(dataset: Any) -> tuple[Tensor, dict[str, Tensor]]:
    idx = torch.arange(min(2, len(dataset)))
    return dataset.gather(idx)


def _expected(task: Task, n: int) -> str:
    return f"[{n}, {task.out_dim}]" if task.kind == "classification" else f"[{n}] or [{n}, 1]"


def check_model(model: nn.Module, data: Any) -> None:
    """Dry-run `model` on two samples of every stream and check the outputs against the tasks.

    Raises:
        TypeError / ValueError: the model breaks the contract (`MODEL_CONTRACT`); the message says
            which task or which part and how.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch nn.Module, got {type(model).__name__}. {MODEL_CONTRACT}")
    tasks: TaskSet = data.tasks
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError(f"The model has no parameters to train. {MODEL_CONTRACT}")
    device = param.device
    batches: dict[str, tuple[Tensor, dict[str, Tensor]]] = {}
    primary = _two(data.train)
    batches[PRIMARY_STREAM] = primary
    for stream in tasks.streams:
        if stream == PRIMARY_STREAM:
            continue
        if stream in data.aux_train:
            batches[stream] = _two(data.aux_train[stream])
        elif stream in data.views:
            batches[stream] = None  # made from the primary batch below
    transform: Callable | None = data.eval_transform
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            for stream in tasks.streams:
                names = [t.name for t in tasks.on_stream(stream)]
                if stream == PRIMARY_STREAM or stream in data.aux_train:
                    x, _ = batches[stream]
                    x = x.to(device)
                    if transform is not None:
                        x = transform(x)
                else:
                    x0, t0 = primary
                    x0 = x0.to(device)
                    if transform is not None:
                        x0 = transform(x0)
                    x, _ = data.views[stream](x0, {k: v.to(device) for k, v in t0.items()},
                                               generator=torch.Generator().manual_seed(0))
                _check_forward(model, x, names, tasks, stream, param.dtype)
    finally:
        model.train(was_training)


def _check_forward(model: nn.Module, x: Tensor, names: list[str], tasks: TaskSet, stream: str, dtype: torch.dtype) -> None:
    where = f"on stream {stream!r}" if stream != PRIMARY_STREAM else "on the training inputs"
    if x.is_floating_point() and dtype.is_floating_point and x.dtype != dtype and x.dtype == torch.float64:
        raise TypeError(
            f"The inputs {where} are float64 but the model's parameters are {dtype}; convert the inputs with "
            "x.float() (TaskDataset.from_numpy does this for you) or the model with model.double()."
        )
    try:
        result = model(x, names)
    except TypeError as err:
        raise TypeError(
            f"Calling model(x, {names}) failed {where} with inputs {tuple(x.shape)} {x.dtype}: {err}."
            f"{integer_inputs_hint(x)} {MODEL_CONTRACT}"
        ) from None
    except (RuntimeError, ValueError, KeyError, IndexError, AttributeError) as err:
        raise ValueError(
            f"The model failed on two samples {where} (inputs {tuple(x.shape)} {x.dtype}): {type(err).__name__}: "
            f"{err}. Check that the model accepts these inputs.{integer_inputs_hint(x)} {MODEL_CONTRACT}"
        ) from None
    if not (isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[1], dict)):
        got = type(result).__name__ + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        raise TypeError(f"model(x, {names}) returned a {got}, not (features, {{task: output}}). {MODEL_CONTRACT}")
    features, outputs = result
    n = x.shape[0]
    if not isinstance(features, Tensor) or features.dim() != 2 or features.shape[0] != n:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(
            f"The model's features {where} have shape {shape}; expected [{n}, d] (flatten them, e.g. "
            f"nn.Flatten() at the end of the backbone). {MODEL_CONTRACT}"
        )
    for name in names:
        task = tasks[name]
        if name not in outputs:
            raise KeyError(f"The model returned no output for task {name!r} (it returned {sorted(outputs)}). {MODEL_CONTRACT}")
        out = outputs[name]
        if not isinstance(out, Tensor) or not out.is_floating_point():
            raise TypeError(f"Task {name!r}: the output must be a float tensor, got {getattr(out, 'dtype', type(out).__name__)}.")
        if task.kind == "classification":
            ok = out.dim() == 2 and tuple(out.shape) == (n, task.out_dim)
        else:
            ok = tuple(out.shape) in ((n,), (n, 1))
        if not ok:
            fix = (
                f"give task {name!r} a head with {task.out_dim} outputs (or set Task(out_dim=...) to the head's size)"
                if task.kind == "classification" and out.dim() == 2 and out.shape[0] == n
                else "make the head return one value per sample"
            )
            raise ValueError(
                f"Task {name!r} ({task.kind}, out_dim={task.out_dim}): the model's output {where} has shape "
                f"{list(out.shape)}, expected {_expected(task, n)}; {fix}. {MODEL_CONTRACT}"
            )


# ------------------------------------------------------------------ the labelled budget
def check_dev_leaves_training(train: Any, dev: Any, task: Task, *, dev_size: int, shots: int | None = None,
                              label_fraction: float | None = None) -> None:
    """After D_dev is carved: D_train must keep labelled samples of the primary `task`.

    Raises a `ValueError` that says D_dev took every labelled sample and which `dev_size` would
    leave some (few-shot: at least one shot of every class in D_train; the carving is
    class-balanced).
    """
    if dev is None or len(dev) == 0:
        return
    left = int(task.labelled(train.targets[task.name]).sum()) if len(train) and task.name in train.targets else 0
    if left > 0:
        return
    in_dev = int(task.labelled(dev.targets[task.name]).sum())
    total = left + in_dev
    cli = "(CLI: --set dev_size=N; Python: build_bundle(..., dev_size=N) or experiments.run(..., dev_size=N))"
    if shots is not None and task.kind == "classification":
        keep = (shots - 1) * task.out_dim
        fix = (f"use dev_size <= {keep} ({shots - 1} per class for D_dev, at least one shot per class left to "
               f"train on) {cli}, or more shots" if keep > 0 else
               f"with 1 shot per class there is nothing to spare: use shots >= 2 (then dev_size <= {task.out_dim} "
               f"leaves a shot per class), or dev_size=0 for methods without D_dev (stl, equal, ...) {cli}")
        raise ValueError(
            f"{shots}-shot keeps {total} labelled samples of {task.name!r} ({shots} per class) and D_dev "
            f"(dev_size={dev_size}) takes all {in_dev} of them, so the training split has no labelled sample; {fix}."
        )
    budget = f" after label_fraction={label_fraction}" if label_fraction is not None else ""
    raise ValueError(
        f"D_dev (dev_size={dev_size}) takes all {total} labelled samples of {task.name!r}{budget}, so the training "
        f"split has no labelled sample; use dev_size < {total} (e.g. {max(total // 5, 1) if total > 1 else 0}) {cli}"
        + (", or a larger label_fraction" if label_fraction is not None else "") + "."
    )


# ------------------------------------------------------------------ predict's inputs
def input_spec(dataset: Any, columns: Any = None) -> dict[str, Any]:
    """What `RunResult.predict` checks new inputs against: one sample's shape, the dtype, the
    column names (a table read by `TaskDataset.from_pandas`)."""
    spec: dict[str, Any] = {"shape": [int(s) for s in dataset.inputs.shape[1:]],
                            "dtype": str(dataset.inputs.dtype).replace("torch.", "")}
    if columns is not None:
        spec["columns"] = [str(c) for c in columns]
    return spec


def predict_inputs(inputs: Any, spec: Mapping[str, Any] | None) -> Any:
    """`inputs` for `RunResult.predict`, checked against the training inputs' `spec`.

    A DataFrame is matched to the training columns by name (order does not matter; a missing or
    an extra column is an error naming it) and becomes an array in the training order. Arrays
    and tensors must have the training sample shape. Without a `spec` (a result of an older
    auxnb) nothing is checked.
    """
    if spec is None:
        return inputs
    columns = spec.get("columns")
    shape = tuple(spec.get("shape") or ())
    if _is_frame(inputs):
        names = [str(c) for c in inputs.columns]
        if columns is None:
            raise TypeError(
                "predict got a DataFrame, but the model was trained on arrays, not on named columns; give "
                f"an array or tensor [N, {', '.join(map(str, shape))}] in the training order (frame.to_numpy())."
            )
        missing = [c for c in columns if c not in names]
        extra = [c for c in names if c not in columns]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing column(s) {missing}")
            if extra:
                parts.append(f"column(s) {extra} that training did not use")
            raise ValueError(
                f"predict's DataFrame has {' and '.join(parts)}; the model was trained on the columns {columns} "
                "(matched by name, in any order): add the missing ones"
                + (f", drop the others (frame.drop(columns={extra}))" if extra else "") + "."
            )
        if len(set(names)) != len(names):
            dup = sorted({c for c in names if names.count(c) > 1})
            raise ValueError(f"predict's DataFrame has duplicate column name(s) {dup}; give each column once.")
        floating = spec.get("dtype", "").startswith(("float", "bfloat"))
        # the from_pandas rule again: a table trained as floats is read as floats
        return inputs[list(columns)].to_numpy(dtype="float32" if floating else None, copy=True)
    dtype = str(getattr(inputs, "dtype", "")).replace("torch.", "")
    if dtype.startswith(("int", "uint")) and str(spec.get("dtype", "")).startswith("float"):
        raise TypeError(
            f"predict's inputs are {dtype} but the model was trained on {spec['dtype']} inputs; convert them "
            "first: x.astype(np.float32) (numpy) or x.float() (torch)."
        )
    if hasattr(inputs, "shape") and len(getattr(inputs, "shape", ())) >= 1 and shape:
        got = tuple(int(s) for s in inputs.shape[1:])
        if got != shape:
            what = f" ({len(columns)} columns, from a DataFrame: pass one to match them by name)" if columns is not None else ""
            raise ValueError(
                f"predict's inputs have samples of shape {list(got)} but the model was trained on {list(shape)}"
                f"{what}; give inputs [N, {', '.join(map(str, shape))}] prepared like the training inputs."
            )
    return inputs


def _is_frame(value: Any) -> bool:
    return type(value).__name__ == "DataFrame" and hasattr(value, "columns") and hasattr(value, "to_numpy")


def integer_inputs_hint(x: Tensor) -> str:
    """The fix to add when a model fails on integer inputs (an all-integer feature table)."""
    if x.is_floating_point():
        return ""
    return (
        f" The inputs are {str(x.dtype).replace('torch.', '')}: from_numpy / from_pandas keep an all-integer table "
        "as integer field ids (for embedding models such as auxnb.models.AutoInt). If the columns are numeric "
        "features, convert them first: frame.astype(float) or x.astype(np.float32)."
    )


class TargetAmongInputsWarning(UserWarning):
    """A target column is also an input (the model would read the answer)."""


def warn_targets_among_inputs(frame: Any, inputs: Any, targets: Mapping[str, str]) -> None:
    """Warn when a target column is also an input column of `from_pandas`, by name or as an
    identical copy under another name: the model would read the answer, and its scores on D_val
    and D_test would say nothing about new data."""
    import warnings

    inputs = list(inputs)
    for task, col in targets.items():
        same = [c for c in inputs if c == col]
        if not same:
            target = frame[col]
            same = [c for c in inputs if frame[c].dtype == target.dtype and frame[c].equals(target)]
        if same:
            warnings.warn(
                f"Input column(s) {same} hold the target {col!r} of task {task!r}: the model would read the answer "
                f"and its validation and test scores would mean nothing; leave them out of inputs=[...] "
                f"(or drop them: frame.drop(columns={same})).",
                TargetAmongInputsWarning,
                stacklevel=4,
            )
