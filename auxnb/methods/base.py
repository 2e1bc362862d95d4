"""The method protocol: how a method turns per-task losses into the lower update direction.

A method never touches the optimiser, the data pipeline or `.grad`; the Trainer owns those.
Lower directions are first-order: `direction(..., create_graph=False)` builds no second-order graph.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _ops
from ..tasks import INDEX_KEY, PRIMARY_STREAM, TaskSet

__all__ = ["Method", "LossTerms", "compute_terms", "Batch", "SetupInfo"]

#: A training batch: stream name -> (inputs, targets); targets map task name -> tensor.
Batch = Mapping[str, tuple[Tensor, Mapping[str, Tensor]]]


@dataclass
class LossTerms:
    """Per-sample losses of every task on one batch, with what methods need to weight them.

    `losses[name]` has one entry per sample of the task's stream and is exactly 0 where the
    task's label is missing (`masks[name]` is False there). `features[stream]` is the
    backbone output for that stream (graph attached); `index[stream]` the samples' stable ids.
    """

    tasks: TaskSet
    losses: dict[str, Tensor]
    masks: dict[str, Tensor]
    outputs: dict[str, Tensor]
    features: dict[str, Tensor]
    targets: dict[str, Mapping[str, Tensor]]
    index: dict[str, Tensor] = field(default_factory=dict)
    #: the inputs of each stream (for methods that build new samples, e.g. MixUp, DTG)
    inputs: dict[str, Tensor] = field(default_factory=dict)
    #: The binary tasks whose losses were computed together, as a map from their names to
    #: ``(losses [B, K], masks [B, K])``; ``losses[name]`` is a column of it (`stacked` reuses it
    #: instead of stacking K columns).
    grouped: dict[tuple[str, ...], tuple[Tensor, Tensor]] = field(default_factory=dict)

    def stacked(self, names: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(losses [B, T], masks [B, T])`` of tasks `names` (one stream), columns in that order: the
        values of ``torch.stack([losses[n] for n in names], 1)``, as one node (`auxnb._ops.stack`),
        and runs of tasks whose losses were computed together (`grouped`) taken whole."""
        names = list(names)
        losses, masks = [], []
        k = 0
        while k < len(names):
            run = next((key for key in self.grouped if key and key[0] == names[k] and tuple(names[k:k + len(key)]) == key), None)
            if run is not None and all(getattr(self.losses[n], "_base", None) is self.grouped[run][0] for n in run):
                loss, mask = self.grouped[run]
                losses.append(loss)
                masks.append(mask)
                k += len(run)
            else:
                losses.append(self.losses[names[k]][:, None])
                masks.append(self.masks[names[k]][:, None])
                k += 1
        if len(losses) == len(names):  # nothing grouped: the columns stacked
            return _ops.stack([self.losses[n] for n in names], 1), torch.stack([self.masks[n] for n in names], 1)
        return _ops.cat(losses, 1), torch.cat(masks, 1)

    def mean(self, name: str) -> Tensor:
        """Mean loss of task `name` over its labelled samples (0 when none is labelled)."""
        count = self.masks[name].sum().clamp_min(1)
        return self.losses[name].sum() / count

    def means(self) -> dict[str, Tensor]:
        return {name: self.mean(name) for name in self.losses}

    @property
    def primary(self) -> str:
        return self.tasks.primary.name

    @property
    def auxiliary(self) -> list[str]:
        """Auxiliary task names present in this batch, in task order."""
        return [t.name for t in self.tasks.auxiliary if t.name in self.losses]


@contextmanager
def no_running_stats(model: nn.Module) -> Iterator[None]:
    """Forward passes inside leave every normalisation layer's running statistics untouched.

    Each BatchNorm-like layer (``torch.nn.modules.batchnorm._NormBase`` with
    ``track_running_stats``) normalises with the batch's own statistics, as in training, but
    neither updates ``running_mean`` / ``running_var`` nor counts the batch. Nothing is written
    in place, so graphs already built on those buffers (the primary stream's forward, whose
    backward comes later) stay valid; other buffers are left to the model. Restored on exit.

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> with no_running_stats(bn):
        ...     _ = bn(torch.randn(4, 2))
        >>> bn.running_mean.tolist(), int(bn.num_batches_tracked), bn.track_running_stats
        ([0.0, 0.0], 0, True)
    """
    from torch.nn.modules.batchnorm import _NormBase

    switched = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats and m.training]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


#: With at least this many binary tasks on one stream, their per-sample losses are computed as one
#: [batch, K] operation (same elementwise formula as `auxnb.tasks.per_sample_loss`, so the same
#: numbers) and split into columns: a few autograd nodes instead of several per task.
BATCH_LOSSES = 8
#: `_binary_losses`'s entry for the group as a whole (names, losses [B, K], masks [B, K]); not a task name
GROUP_KEY = ".group"


def _binary_losses(stream_tasks, outs: Mapping[str, Tensor], tgt: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    group = [t for t in stream_tasks if t.kind == "binary" and t.name in tgt and t.name in outs
             and outs[t.name].dim() == 2 and outs[t.name].shape[1] == 1 and tgt[t.name].dim() == 1]
    if len(group) < BATCH_LOSSES:
        return {}
    # `_ops.cat`: torch.cat's values, and one node in a second-order graph instead of a slice per
    # task whose backward fills a [batch, K] zero tensor (K² work with 312 tasks); heads stored as
    # one `LinearBank` give their joint output already (the same values: no split, no cat)
    joint = getattr(outs, "joint", {}).get(tuple(t.name for t in group))
    out = joint if joint is not None else _ops.cat([outs[t.name] for t in group], dim=1)
    if out.dtype in (torch.float16, torch.bfloat16):
        out = out.float()
    y = torch.stack([tgt[t.name] for t in group], dim=1)
    mask = ~torch.isnan(y.float())
    y = y.to(out.dtype)
    safe = torch.where(mask, y, torch.zeros_like(y))
    loss = F.binary_cross_entropy_with_logits(out, safe, reduction="none")
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    grouped = {t.name: (col, m) for t, col, m in zip(group, loss.unbind(1), mask.unbind(1))}
    grouped[GROUP_KEY] = (tuple(t.name for t in group), loss, mask)  # type: ignore[assignment]
    return grouped


def compute_terms(
    model: nn.Module,
    batch: Batch,
    tasks: TaskSet,
    *,
    names: Sequence[str] | None = None,
    freeze_aux_buffers: bool = False,
) -> LossTerms:
    """Forward each stream of `batch` once and compute the per-sample loss of each task on it.

    Args:
        model: a `MultiHeadModel` (``model(x, tasks) -> (features, outputs)``).
        batch: stream name -> (inputs, targets).
        tasks: the task set.
        names: restrict to these tasks (default: every task whose stream is in the batch).
        freeze_aux_buffers: forward non-primary streams without changing BatchNorm running
            statistics (they still normalise with their own batch statistics).
    """
    wanted = set(tasks.names if names is None else names)
    losses: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    features: dict[str, Tensor] = {}
    targets: dict[str, Mapping[str, Tensor]] = {}
    index: dict[str, Tensor] = {}
    inputs: dict[str, Tensor] = {}
    together: dict[tuple[str, ...], tuple[Tensor, Tensor]] = {}
    for stream in tasks.streams:
        stream_tasks = [t for t in tasks.on_stream(stream) if t.name in wanted]
        if not stream_tasks or stream not in batch:
            continue
        x, tgt = batch[stream]
        task_names = [t.name for t in stream_tasks]
        if freeze_aux_buffers and stream != PRIMARY_STREAM:
            with no_running_stats(model):
                feats, outs = model(x, task_names)
        else:
            feats, outs = model(x, task_names)
        features[stream] = feats
        targets[stream] = tgt
        inputs[stream] = x
        if INDEX_KEY in tgt:
            index[stream] = tgt[INDEX_KEY]
        grouped = _binary_losses(stream_tasks, outs, tgt)
        if GROUP_KEY in grouped:
            group_names, group_loss, group_mask = grouped.pop(GROUP_KEY)  # type: ignore[misc]
            together[group_names] = (group_loss, group_mask)
        for task in stream_tasks:
            if task.name not in tgt:
                raise KeyError(
                    f"Batch stream {stream!r} has no targets for task {task.name!r}; "
                    f"it carries {sorted(k for k in tgt if k != INDEX_KEY)}."
                )
            y = tgt[task.name]
            outputs[task.name] = outs[task.name]
            if task.name in grouped:
                losses[task.name], masks[task.name] = grouped[task.name]
                continue
            masks[task.name] = task.labelled(y)
            out = outs[task.name]
            # losses in at least float32 (AMP outputs are half precision); float64 stays float64
            losses[task.name] = task.loss(out.float() if out.dtype in (torch.float16, torch.bfloat16) else out, y)
    if tasks.primary.name in wanted and tasks.primary.name not in losses:
        raise KeyError(f"The batch has no {PRIMARY_STREAM!r} stream; it has {sorted(batch)}.")
    return LossTerms(tasks, losses, masks, outputs, features, targets, index, inputs, together)


@dataclass
class SetupInfo:
    """What a method may know about the run when it is set up (passed explicitly, never read off a host)."""

    tasks: TaskSet
    device: torch.device
    num_train: int
    seed: int
    generator: torch.Generator | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class of every method; subclasses override what they change.

    The Trainer calls, in order: `setup` once, then for every lower step
    `terms = compute_terms(model, batch, tasks, names=method.task_names(tasks))` and
    `method.direction(terms, params)`; bi-level methods (``lower_steps`` set) also get
    `upper_step(...)` every `lower_steps` steps (ForkMerge: its merge). After each lower update
    `after_lower(terms, context)` (default: nothing). `trace()` is recorded at every evaluation.

    Every method takes ``aux_losses={name: fn(model, terms) -> scalar}`` (e.g.
    ``Equal(aux_losses={"l2": l2_penalty()})``): extra auxiliary losses that are not tasks.
    MAOAL and AuxL learn their weights like a task's; every other method adds them to its lower
    objective with weight ``aux_loss_weight`` (default 1), in its lower direction g(θ, φ) and
    therefore in a bi-level method's hypergradient too, so a baseline can get exactly the same
    extra losses as the method it is compared with.
    """

    #: Registry name (``auxnb.methods.get(name)``).
    name: ClassVar[str] = "method"
    #: Whether the method trains hyper-parameters on D_dev (otherwise D_dev joins D_train).
    uses_dev: ClassVar[bool] = False
    #: Upper step every this many lower steps; None for a single-level method.
    lower_steps: int | None = None

    def __init__(self, *, aux_losses: Mapping[str, Callable] | None = None, aux_loss_weight: float = 1.0) -> None:
        _set_extra_losses(self, aux_losses, aux_loss_weight)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # every method takes aux_losses: a class whose constructor does not handle them itself
        # (MAOAL and AuxL learn their weights) gets them added with a fixed weight to its direction
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "_auxnb_extra", False):
            import inspect

            if "aux_losses" not in inspect.signature(init).parameters:
                cls.__init__ = _init_with_extra_losses(init)
        direction = cls.__dict__.get("direction")
        if direction is not None and not getattr(direction, "_auxnb_extra", False):
            if "aux_losses" not in inspect_params(cls.__init__):
                cls.direction = _direction_with_extra_losses(direction)

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        """Create the method's own state for `model` and `info.tasks`.

        The model is handed over here, explicitly; methods that build new samples (MixUp,
        DTG) keep it to run heads on generated features.
        """
        self.tasks = info.tasks
        self._model = model

    def task_names(self, tasks: TaskSet) -> list[str]:
        """Tasks whose losses this method needs in a lower step (default: all)."""
        return tasks.names

    def lower_parameters(self) -> list[nn.Parameter]:
        """Extra parameters trained by the lower optimiser together with the model (e.g. Uncert)."""
        return []

    def weights(self, terms: LossTerms) -> dict[str, Tensor | float]:
        """Weight of each task's mean loss in the lower objective (primary included)."""
        return {name: 1.0 for name in terms.losses}

    def objective(self, terms: LossTerms) -> Tensor:
        """Scalar lower objective; by default the weighted sum of task mean losses."""
        weights = self.weights(terms)
        total = terms.mean(terms.primary) * 0.0
        done: set[str] = set()
        for run, (loss, mask) in terms.grouped.items():  # banked heads: K means as one weighted sum
            if all(n in weights and getattr(terms.losses[n], "_base", None) is loss for n in run):
                w = [weights[n] for n in run]
                w = torch.stack([torch.as_tensor(x, dtype=loss.dtype, device=loss.device) for x in w]) if any(
                    isinstance(x, Tensor) for x in w) else torch.tensor(w, dtype=loss.dtype, device=loss.device)
                total = total + (loss.sum(0) / mask.sum(0).clamp_min(1)) @ w
                done.update(run)
        for name, w in weights.items():
            if name not in done:
                total = total + w * terms.mean(name)
        return total

    #: fp16 loss scale the Trainer sets around a lower step's `direction` (1: none). A method applies
    #: it to its final objective with `scaled`; the Trainer divides the direction by it only then.
    _loss_scale: float = 1.0
    _scale_applied: bool = False

    def scaled(self, loss: Tensor) -> Tensor:
        """`loss` times the current fp16 loss scale: apply it to the method's *final* objective (or to
        each loss of a per-loss direction) right before differentiating, so every term — generated,
        mixed or extra losses included — is scaled once (issue 12, defect 3)."""
        if self._loss_scale == 1.0:
            return loss
        self._scale_applied = True
        return loss * self._loss_scale

    def direction(self, terms: LossTerms, params: Sequence[Tensor], *, create_graph: bool = False) -> tuple[Tensor, ...]:
        """Lower update direction g(θ, φ) for `params` (the gradient of the objective by default)."""
        loss = self.scaled(self.objective(terms))
        grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))

    def upper_step(self, model: nn.Module, context: Any) -> dict[str, float]:
        """Bi-level methods update their hyper-parameters here; returns diagnostics."""
        return {}

    def after_lower(self, terms: LossTerms, context: Any) -> None:
        """Called after every lower update with that step's `terms` and an `auxnb.train.LowerContext`
        (the Trainer's optimiser factory, learning rates, clipping, autocast): for a method that trains
        tensors of its own beside the model, as ForkMerge trains its other branches. Default: nothing."""
        return None

    def trace(self) -> dict[str, Any]:
        """The method's current learned state, recorded at every evaluation (floats or arrays)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None

    def config(self) -> dict[str, Any]:
        """Constructor arguments, for the run's config record."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and _plain(v)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


def inspect_params(fn: Callable) -> Mapping[str, Any]:
    import inspect

    return inspect.signature(getattr(fn, "__wrapped_init__", fn)).parameters


def _set_extra_losses(method: "Method", aux_losses: Mapping[str, Callable] | None, weight: float) -> None:
    if aux_losses is None:
        return
    if not isinstance(aux_losses, Mapping):
        raise TypeError(
            f"{type(method).__name__}: aux_losses must be a dict name -> fn(model, terms) -> scalar, "
            f"e.g. {{'l2': auxnb.methods.l2_penalty()}}; got {type(aux_losses).__name__}."
        )
    for name, fn in aux_losses.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{type(method).__name__}: aux_losses names must be non-empty strings, got {name!r}.")
        if not callable(fn):
            raise TypeError(f"{type(method).__name__}: aux_losses[{name!r}] must be callable fn(model, terms) -> scalar.")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise ValueError(f"{type(method).__name__}: aux_loss_weight must be a number >= 0, got {weight!r}.")
    method._extra_losses = dict(aux_losses)
    method.aux_losses = list(aux_losses)  # names only (config); the callables are private
    method.aux_loss_weight = float(weight)


def _init_with_extra_losses(init: Callable) -> Callable:
    import functools

    @functools.wraps(init)
    def __init__(self, *args: Any, aux_losses: Mapping[str, Callable] | None = None, aux_loss_weight: float = 1.0, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if aux_losses is not None:
            _set_extra_losses(self, aux_losses, aux_loss_weight)

    __init__._auxnb_extra = True  # type: ignore[attr-defined]
    __init__.__wrapped_init__ = init  # type: ignore[attr-defined]
    return __init__


def extra_losses_value(method: "Method", terms: LossTerms) -> Tensor | None:
    """``aux_loss_weight · Σ fn(model, terms)`` over the method's fixed-weight extra losses (None: none)."""
    fns = getattr(method, "_extra_losses", None)
    if not fns:
        return None
    total = None
    for name, fn in fns.items():
        value = fn(method._model, terms)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"{type(method).__name__}: aux_losses[{name!r}] must return a scalar tensor, got {value!r}.")
        value = value.reshape(())
        total = value if total is None else total + value
    return method.aux_loss_weight * total


def _direction_with_extra_losses(direction: Callable) -> Callable:
    import functools

    @functools.wraps(direction)
    def wrapped(self, terms: LossTerms, params: Sequence[Tensor], *, create_graph: bool = False) -> tuple[Tensor, ...]:
        if getattr(self, "_in_direction", False) or not getattr(self, "_extra_losses", None):
            return direction(self, terms, params, create_graph=create_graph)
        self._in_direction = True  # a subclass's direction calling super() adds the extra losses once
        try:
            grads = direction(self, terms, params, create_graph=create_graph)
        finally:
            self._in_direction = False
        extra = extra_losses_value(self, terms)
        more = torch.autograd.grad(extra, list(params), create_graph=create_graph, allow_unused=True)
        return tuple(g if e is None else g + e for g, e in zip(grads, more))

    wrapped._auxnb_extra = True  # type: ignore[attr-defined]
    return wrapped


def _plain(value: Any) -> bool:
    if isinstance(value, (int, float, str, bool, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


Method.direction = _direction_with_extra_losses(Method.direction)  # type: ignore[method-assign]
