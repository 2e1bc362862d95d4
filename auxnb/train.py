"""One Trainer for every method: lower steps on D_train, upper steps on D_dev, selection on D_val.

The test split is evaluated exactly once, at the best-on-val checkpoint. The Trainer never
branches on the method and never prints; it reports through a tqdm bar and callbacks.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from . import checkpoint as ckpt_io
from .checks import check_model, check_splits, check_trainer_args
from .data.core import DataBundle, TaskDataset
from .methods.base import Batch, LossTerms, Method, SetupInfo, compute_terms
from .runtime import check_device, resolve_threads, with_threads
from .results import RunResult  # re-exported: auxnb.train.RunResult keeps working
from .tasks import INDEX_KEY, PRIMARY_STREAM, TaskSet, metric

__all__ = [
    "Trainer", "RunResult", "BatchStream", "UpperContext", "LowerContext", "resolve_device", "evaluate", "scaled_direction", "TrainingDiverged",
]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else ``$AUXNB_DEVICE``, else CUDA when available, else CPU."""
    if device is None:
        device = os.environ.get("AUXNB_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"Device {device} was asked for but CUDA is not available on this machine; use the CPU: "
                "device='cpu' in Python, --device cpu or AUXNB_DEVICE=cpu on the command line."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"Device {device} was asked for but this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 … cuda:{torch.cuda.device_count() - 1}); pick one of those or 'cpu'."
            )
    return check_device(device)  # mps, xpu, ...: available here?


class BatchStream:
    """Endless shuffled batches over one dataset, reproducible from (seed, epoch) alone.

    Epoch e uses the permutation drawn from a generator seeded with ``seed + 7919·e``; the
    position inside the epoch is a plain counter, so a stream can be checkpointed as two
    integers and resumed exactly.
    """

    def __init__(self, dataset: TaskDataset, batch_size: int, seed: int, *, shuffle: bool = True, device=None):
        if len(dataset) == 0:
            raise ValueError("Cannot draw batches from an empty dataset.")
        self.dataset, self.batch_size, self.seed, self.shuffle = dataset, int(batch_size), int(seed), shuffle
        self.device = device
        self.epoch, self.position = 0, 0
        self._order: Tensor | None = None

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.dataset) / self.batch_size)

    def _permutation(self) -> Tensor:
        if self._order is None:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + 7919 * self.epoch)
                self._order = torch.randperm(len(self.dataset), generator=g)
            else:
                self._order = torch.arange(len(self.dataset))
        return self._order

    def next(self) -> tuple[Tensor, dict[str, Tensor]]:
        order = self._permutation()
        idx = order[self.position : self.position + self.batch_size]
        self.position += len(idx)
        if self.position >= len(order):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return _to_device(self.dataset.gather(idx), self.device)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None


def _to_device(item, device):
    if device is None:
        return item
    x, targets = item
    device = torch.device(device)
    if x.device.type == device.type and (device.index is None or x.device.index == device.index):
        return item  # resident dataset: the batch was gathered on the device, no pinning or copy
    non_blocking = device.type == "cuda"
    if non_blocking:
        x = x.pin_memory()
    return x.to(device, non_blocking=non_blocking), {k: v.to(device, non_blocking=non_blocking) for k, v in targets.items()}


#: Fraction of the device's free memory a run's training data may take to be kept resident on it.
RESIDENT_FRACTION = 0.25


def resident_data(data: DataBundle, device: torch.device, fraction: float = RESIDENT_FRACTION) -> DataBundle:
    """`data` with its training streams (train, dev, aux_train) moved to `device` once, when it
    is a CUDA device and they fit in `fraction` of its free memory (CIFAR as uint8: 150 MB).

    Batches are then gathered on the device and the bundle's transform (augmentation, Z-score)
    runs there too: no per-batch pinning or host-to-device copy. val / test stay where they are
    (evaluated once per interval). On a CPU, or when they do not fit, `data` is returned as is;
    either way the batches and the numbers are the same.
    """
    if device.type != "cuda" or fraction <= 0:
        return data
    streams = {"train": data.train, "dev": data.dev, **{f"aux:{k}": v for k, v in data.aux_train.items()}}
    size = sum(_dataset_bytes(ds) for ds in streams.values() if ds is not None)
    free, _ = torch.cuda.mem_get_info(device)
    if size > fraction * free:
        return data
    return replace(
        data, train=data.train.to(device), dev=None if data.dev is None else data.dev.to(device),
        aux_train={k: v.to(device) for k, v in data.aux_train.items()},
    )


def _dataset_bytes(ds: TaskDataset) -> int:
    tensors = [ds.inputs, ds.index, *ds.targets.values()]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


@dataclass
class UpperContext:
    """What a bi-level method's upper step receives from the Trainer (nothing else is read off it)."""

    params: tuple[nn.Parameter, ...]
    tasks: TaskSet
    train_batch: Callable[[], Batch]
    dev_batch: Callable[[], Batch]
    lr: float
    step: int
    terms: Callable[..., LossTerms]
    #: a primary-only batch from the upper step's training stream through the evaluation transform:
    #: the upper objective's batch when a method measures it on training data (``upper_data="train"``),
    #: so no augmentation is applied and no auxiliary stream or view is advanced for it
    primary_train_batch: Callable[[], Batch] | None = None


@dataclass
class LowerContext:
    """What `Method.after_lower` receives after each lower update (ForkMerge trains its other branches
    there): how the Trainer steps θ, so that a method can step tensors of its own the same way."""

    #: the Trainer's lower optimiser (read its current learning rates; never step it)
    optimizer: torch.optim.Optimizer
    #: a new optimiser of the Trainer's kind and settings over the given tensors
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    grad_clip: float | None
    freeze_aux_buffers: bool
    #: the lower step's autocast context (a no-op without amp)
    autocast: Callable[[], Any]
    step: int


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: TaskDataset, tasks: TaskSet, *, batch_size: int = 512, device=None, transform=None
) -> dict[str, float]:
    """Metric and mean loss of the primary task on `dataset` (model in eval mode, no state change).

    `transform` (e.g. a bundle's ``eval_transform``) is applied to each batch's inputs on `device`.
    """
    primary = tasks.primary
    was_training = model.training
    model.eval()
    outs, tgts = [], []
    try:
        for start in range(0, len(dataset), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(dataset)))
            x, t = _to_device(dataset.gather(idx), device)
            if transform is not None:
                x = transform(x)
            _, out = model(x, [primary.name])
            outs.append(out[primary.name].float().cpu())
            tgts.append(t[primary.name].cpu())
    finally:
        model.train(was_training)
    output, target = torch.cat(outs), torch.cat(tgts)
    loss = primary.loss(output, target)
    mask = primary.labelled(target)
    return {"metric": metric(primary, output, target), "loss": float(loss[mask].mean()) if mask.any() else math.nan}


def scaled_direction(method: Method, terms: LossTerms, params: Sequence[Tensor], scale: float) -> tuple[Tensor, ...]:
    """A lower step's direction under fp16 loss scaling: the method's final objective is multiplied
    by `scale` (`Method.scaled`) and the direction divided by it, so the result equals the unscaled
    direction whatever losses the objective holds (generated, mixed, extra). A method that never
    applies the scale gets its direction back as it is (correct, only unprotected from underflow).
    """
    method._loss_scale, method._scale_applied = float(scale), False
    try:
        grads = method.direction(terms, params)
        applied = method._scale_applied
    finally:
        method._loss_scale, method._scale_applied = 1.0, False
    return tuple(g / scale for g in grads) if applied else tuple(grads)


def _build_model(model: nn.Module | Callable[[], nn.Module], seed: int, warm_start: bool) -> nn.Module:
    """The run's model: `model` itself, or ``model()`` built under `seed` when it is a model_fn."""
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise TypeError(
                f"model must be an nn.Module or a function of no arguments that builds one (model_fn), "
                f"got {type(model).__name__}."
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the initialisation is the seed's, and the caller's RNG is untouched
            built = model()
        if not isinstance(built, nn.Module):
            raise TypeError(f"model_fn returned a {type(built).__name__}, not an nn.Module.")
        return built
    fitted = getattr(model, "_auxnb_fitted", None)
    if fitted and not warm_start:
        raise ValueError(
            f"This model was already trained by an earlier fit() (method {fitted!r}); a second run would start "
            "from those weights. Pass a fresh model, or a model_fn (a function that builds the model, e.g. "
            "Trainer(lambda: MultiHeadModel.wrap(...), ...)) so each run initialises its own; or pass "
            "warm_start=True to continue on purpose."
        )
    return model


def _check_finite(terms: LossTerms, step: int) -> None:
    losses = list(terms.losses.values())
    if len(losses) > 8 and bool(torch.isfinite(torch.cat([loss.detach().reshape(-1) for loss in losses])).all()):
        return  # many tasks (CUB's 312): one check of all losses; the loop below names a culprit
    for name, loss in terms.losses.items():
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"Non-finite loss for task {name!r} at lower step {step}; lower the learning rate, "
                "check the inputs for NaN/inf, or enable gradient clipping (grad_clip=...)."
            )


class Trainer:
    """Train `model` with `method` on a `DataBundle`.

    Args:
        model: a `MultiHeadModel` with one head per task (or any module keeping the contract in
            `auxnb.checks.MODEL_CONTRACT`), or a `model_fn`: a function of no arguments that
            builds one; it is called under ``torch.manual_seed(seed)``, so each seed gets its own
            initialisation. The model is checked against the tasks here, with a dry run on two
            training samples. `fit()` trains it in place and leaves it in eval mode with the
            best-on-val weights; passing an already fitted model again is an error unless
            ``warm_start=True`` (use a `model_fn` to start every run afresh).
        method: a `Method` instance or registry name.
        data: the `DataBundle` (train / dev / val / test, auxiliary streams and views).
        epochs: passes over the primary D_train (or give `steps`).
        steps: total lower steps (overrides `epochs`).
        batch_size: batch size of every stream.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``, or a callable ``params -> Optimizer``.
        lr, momentum, weight_decay: lower optimiser settings.
        scheduler: ``None`` or ``"cosine"`` (annealed over all steps).
        eval_every: evaluate on val every this many lower steps (default: once per epoch).
        grad_clip: clip the lower direction's norm (None: off).
        freeze_aux_buffers: auxiliary streams leave BatchNorm running statistics alone.
        seed: every random choice of the run derives from it. A bi-level method's upper steps draw
            from random streams of their own (training batches, views, auxiliary streams, and torch's
            global state for augmentation and dropout), so they never move the lower level's: with the
            same seed a method and its baseline train on the same batches, crops and dropout masks
            (common random numbers), and their difference is the method's, not two draws of the noise.
            So do a method's `setup` (building its own modules) and an auxiliary dataset's transform:
            each runs on a random state of its own, and STL's primary batches are every method's.
            (Dropout in the forward pass of an auxiliary stream still draws from the lower level's.)
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``; default ``$AUXNB_DEVICE`` or CUDA when available.
        threads: CPU threads while fitting (`auxnb.runtime`): default ``$AUXNB_THREADS``, else 1; 0: torch's default.
        amp: ``None`` or ``"bf16"`` / ``"fp16"``: autocast for lower steps (upper steps stay fp32).
        compile: `torch.compile` the model for lower steps.
        checkpoint_dir: write a checkpoint (``checkpoint.pt``) at each evaluation, with the run's
            identity (method and its configuration, trainer knobs, seed, the `config` given,
            a hash of the split ids, auxnb version) and every random state.
        resume: ``True``: continue from the checkpoint in `checkpoint_dir`, which must exist (a
            missing one is an error: a misspelled directory never silently starts over);
            ``"auto"``: continue when a checkpoint exists, else start from scratch; ``False``:
            start from scratch (an existing checkpoint is overwritten). A checkpoint of a
            different run (another seed, method, configuration, data split, ...) is refused
            with a `auxnb.checkpoint.CheckpointError` that lists what differs; a resumed run is
            bit-identical to an uninterrupted one (metrics, best step, history, trace).
        divergence: ``None`` (off) or ``(k, n)``: stop with `TrainingDiverged` when the mean
            primary training loss over an evaluation interval exceeds k times its value at
            the first lower step for n evaluations in a row (a run that diverges without ever
            reaching NaN). `auxnb.experiments.sweep` turns it on by default.
        progress: show a tqdm progress bar.
        callbacks: called as ``cb(event, info)`` with event in {"eval", "upper", "refit", "end"}.
        warm_start: allow a model that an earlier `fit()` already trained (continue from its weights).
        guard: ``None`` (default: this run is `method` alone), ``"stl"`` or ``"stl+equal"``: `fit()`
            hands the run to the selection layer (`auxnb.selection`), which trains `method`, STL
            (and Equal) as candidates, each one run through a Trainer like this one, and keeps the
            simplest that no more complex one beats on D_val by more than `guard_margin`.
        guard_margin: the guard's margin in D_val metric units (default
            `auxnb.selection.DEFAULT_MARGIN`, 0.01).
        guard_drop: ``None`` (default: every candidate trains to the end), ``"auto"`` or a number:
            the guard trains its candidates in lockstep, evaluated on D_val at the same steps, and
            stops one that trails the leader by more than this bound in the second half of the run
            (`auxnb.selection.drop_bound`; ``"auto"``: the margin plus two standard deviations of
            D_val accuracy's sampling noise).
        reuse: finished runs (``{"stl": result, "equal": result}``) the guard takes as its candidates
            instead of training them, each only when it is exactly that candidate's run (the same
            identity: method and configuration, seed, trainer knobs, run config, split ids).

    A search method (HPO-tune: it has ``search_runs``) is handed to the selection layer the same way.
    A bi-level method with ``refit=f`` (see `auxnb.methods.BilevelMethod`) is trained as usual
    for the first f of the lower steps; from then on no upper step is taken (φ stays as learned)
    and the lower steps draw from D_train ∪ D_dev. Selection is on D_val throughout.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method | str,
        data: DataBundle,
        *,
        epochs: int | None = 10,
        steps: int | None = None,
        batch_size: int = 64,
        optimizer: str | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = "adam",
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        eval_every: int | None = None,
        grad_clip: float | None = None,
        freeze_aux_buffers: bool = False,
        seed: int = 0,
        device: str | torch.device | None = None,
        amp: str | None = None,
        compile: bool = False,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool | str = False,
        progress: bool = True,
        callbacks: Sequence[Callable[[str, dict], None]] = (),
        config: Mapping[str, Any] | None = None,
        warm_start: bool = False,
        divergence: tuple[float, int] | None = None,
        threads: int | None = None,
        guard: str | None = None,
        guard_margin: float | None = None,
        reuse: Mapping[str, RunResult] | None = None,
        guard_drop: float | str | None = None,
    ):
        from .methods import get as get_method
        from .selection import DEFAULT_MARGIN, check_guard, check_margin

        self.method = get_method(method)
        check_trainer_args(epochs=epochs, steps=steps, batch_size=batch_size, optimizer=optimizer, lr=lr,
                           momentum=momentum, weight_decay=weight_decay, eval_every=eval_every,
                           grad_clip=grad_clip, seed=seed)
        if not isinstance(data, DataBundle):
            raise TypeError(
                f"data must be a DataBundle, got {type(data).__name__}; build one with "
                "auxnb.data.build_bundle(TaskDataset.from_numpy(x, {'label': y}), tasks, val_size=..., test_size=..., dev_size=...)."
            )
        check_splits(data)
        self.model = _build_model(model, seed, warm_start)
        self.data = data
        self.tasks = data.tasks
        check_model(self.model, data)
        if amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {amp!r}.")
        if scheduler not in (None, "cosine"):
            raise ValueError(f"scheduler must be None or 'cosine', got {scheduler!r}.")
        self.epochs, self.steps, self.batch_size = epochs, steps, int(batch_size)
        self.optimizer_spec, self.lr, self.momentum, self.weight_decay = optimizer, float(lr), float(momentum), float(weight_decay)
        self.scheduler_spec, self.eval_every, self.grad_clip = scheduler, eval_every, grad_clip
        self.freeze_aux_buffers = bool(freeze_aux_buffers)
        self.seed, self.device = int(seed), resolve_device(device)
        self.amp, self.compile = amp, bool(compile)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if resume not in (True, False, "auto"):
            raise ValueError(f"resume must be True, False or 'auto' (resume when a checkpoint exists), got {resume!r}.")
        self.resume, self.progress, self.callbacks = resume, bool(progress), list(callbacks)
        self.extra_config = dict(config or {})
        self.warm_start = bool(warm_start)
        if self.resume and self.checkpoint_dir is None:
            raise ValueError(f"resume={resume!r} needs checkpoint_dir.")
        self.divergence = _check_divergence(divergence)
        self.threads = resolve_threads(threads)
        self.guard = check_guard(guard)
        self.guard_margin = DEFAULT_MARGIN if guard_margin is None else check_margin(guard_margin)
        self.reuse = dict(reuse or {})
        if guard_drop is not None and not (guard_drop == "auto" or (
                isinstance(guard_drop, (int, float)) and not isinstance(guard_drop, bool) and guard_drop >= 0)):
            raise ValueError(f"guard_drop must be None (train every candidate to the end), 'auto' or a number >= 0, got {guard_drop!r}.")
        self.guard_drop = guard_drop
        #: The identity of the selection this Trainer is a candidate of (the selection layer sets it).
        self.selection_identity: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public
    @with_threads
    def fit(self) -> RunResult:
        """Train one run, select its checkpoint on val, read test once; returns a `RunResult`.

        With a `guard` (or a search method such as HPO-tune) the run is handed to the selection
        layer (`auxnb.selection.fit_selection`), which trains each candidate as one run like this.
        """
        fitted = getattr(self.model, "_auxnb_fitted", None)
        if fitted and not self.warm_start:
            raise ValueError(
                f"This Trainer's model was already trained by fit() (method {fitted!r}); a second fit() would start "
                "from those weights. Build a new Trainer with a fresh model or a model_fn, or pass warm_start=True."
            )
        from .selection import fit_selection, needs_selection

        guard, margin = self.guard, self.guard_margin
        legacy = getattr(self.method, "_legacy_guard", None)  # MAOAL(fallback=...): the old spelling
        if guard is None and legacy is not None:
            guard, margin = legacy
        with ckpt_io.folder_lock(self.checkpoint_dir):  # one writer per folder; refused up front (issue 26)
            if needs_selection(self.method, guard):
                return fit_selection(self, guard, margin)
            return self._fit_one()

    def _fit_one(self, stop_at: int | None = None) -> RunResult:
        """Exactly one run of `self.method` (what a candidate of a selection is, too); `stop_at`: see `_start`."""
        self._check_resumable()
        return self._fit(self.method, stop_at)

    # ----------------------------------------------------------------- internals
    def _setup_info(self, total_steps: int | None = None) -> SetupInfo:
        return SetupInfo(
            tasks=self.tasks,
            device=self.device,
            num_train=len(self.data.train) + (len(self.data.dev) if self.data.dev is not None else 0),
            seed=self.seed,
            generator=torch.Generator().manual_seed(self.seed + 1),
            extra={"bundle_info": self.data.info, "aux_datasets": sorted(self.data.aux_train),
                   "input_dtype": self._input_dtype(), "amp": self.amp,
                   "total_steps": total_steps},
        )

    def _input_dtype(self) -> torch.dtype | None:
        """The dtype the model's inputs have (None when an input transform decides it): lets a method
        refuse data it cannot use before training, e.g. input MixUp on integer field ids."""
        if self.data.transform is not None:
            return None
        return getattr(getattr(self.data.train, "inputs", None), "dtype", None)

    def _make_optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        spec = self.optimizer_spec
        if callable(spec):
            return spec(params)
        # foreach: one call per update op over every tensor instead of a Python loop (torch picks it
        # on CUDA; on a CPU it gives the same bits, tests/test_train.py, and halves the step with
        # hundreds of parameter tensors, e.g. CUB's 312 heads)
        if spec == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, foreach=True)
        if spec == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay, foreach=True)
        if spec == "adamw":
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, foreach=True)
        raise ValueError(f"Unknown optimizer {spec!r}; use 'sgd', 'adam', 'adamw' or a callable.")

    def _fit(self, method: Method, stop_at: int | None = None) -> RunResult:
        """One run: `_start` (seeds, data, model, optimiser, streams, a resumed checkpoint), the step
        loop (`_steps`), `_finish` (D_test once, the `RunResult`)."""
        run = self._start(method, stop_at)
        for _ in self._steps(run):
            pass
        return self._finish(run)

    def _steps(self, run: "_Run") -> Iterator[dict[str, Any]]:
        """The step loop; yields each evaluation's history row (so the selection layer can train
        candidates in lockstep). Each concern is a named room: `lower_update` (one lower step's
        update), `_upper` (a bi-level method's upper step), `_evaluate` (D_val, the best checkpoint,
        the checkpoint itself)."""
        method, state, data = run.method, run.state, run.data
        guard = _DivergenceGuard(self.divergence, self.tasks.primary.name, state)
        from tqdm.auto import tqdm

        bar = tqdm(total=run.total, initial=state["step"], disable=not self.progress, desc=f"{method.name}", leave=False)
        run.model.train()
        try:
            with self._no_donation():
                while state["step"] < run.total:
                    t0 = time.perf_counter()
                    step = state["step"]
                    if run.refit_step is not None and step >= run.refit_step and not state["refit"]:
                        state["refit"] = True  # φ frozen from here; D_dev joins D_train for θ
                        data.switch_to_refit()
                        self._emit("refit", {"step": step})
                    with run.autocast():
                        terms = compute_terms(run.lower_model, data.batch(), self.tasks, names=run.needed,
                                              freeze_aux_buffers=self.freeze_aux_buffers)
                    _check_finite(terms, step)
                    guard.observe(terms)
                    scale = float(state["loss_scale"]) if self.amp == "fp16" else None
                    finite = lower_update(method, terms, run.params, run.optimizer, loss_scale=scale, grad_clip=self.grad_clip)
                    method.after_lower(terms, LowerContext(run.optimizer, self._make_optimizer, self.grad_clip,
                                                           self.freeze_aux_buffers, run.autocast, step + 1))
                    if scale is not None:
                        state["loss_scale"], state["good_steps"] = next_loss_scale(scale, state["good_steps"], finite)
                    if run.scheduler is not None:
                        run.scheduler.step()
                    state["step"] = step = step + 1
                    state["lower_s"] += time.perf_counter() - t0
                    if method.lower_steps and step % method.lower_steps == 0 and not state["refit"]:
                        self._upper(run, step)
                    if step % run.eval_every == 0 or step == run.total:
                        row = self._evaluate(run, step, terms, guard)
                        bar.set_postfix({f"val_{self.tasks.primary.metric}": f"{row[f'val_{self.tasks.primary.metric}']:.4f}"})
                        bar.update(1)
                        yield row
                    else:
                        bar.update(1)
        finally:
            bar.close()

    # ------------------------------------------------------------- the rooms of a run
    def _emit(self, event: str, info: dict) -> None:
        for cb in self.callbacks:
            cb(event, info)

    def _no_donation(self):
        """A compiled model's backward may not donate its buffers: MAOAL's per-loss gradients and the
        upper step differentiate the same graph more than once (retain_graph / create_graph)."""
        if self.compile:
            functorch_config = getattr(getattr(torch, "_functorch", None), "config", None)
            if functorch_config is not None and hasattr(functorch_config, "donated_buffer"):
                return functorch_config.patch(donated_buffer=False)
        return nullcontext()

    def _start(self, method: Method, stop_at: int | None = None) -> "_Run":
        """Everything a run needs before its first step, from the seed alone (or its checkpoint).

        `stop_at` ends the run after that many lower steps, its learning-rate schedule still that of
        the whole run (ForkMerge's ranking runs: the authors' short runs on the full schedule)."""
        t_start = time.perf_counter()
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % (2**32))
        data = resident_data(self.data.for_run(method), self.device)
        model = self.model.to(self.device)
        # the run's length, known before set-up (a method may size its schedule by it: ForkMerge's Δt)
        steps = self._run_length(len(data.train))
        # a method's set-up (building its modules: nn.Linear's default initialisation, its own starting values)
        # runs on a global random state of its own, seeded from the run's seed, so it never moves the lower
        # level's stream (a transform's crops, dropout): every method's batches are STL's of the same seed
        with _on_state(_fresh_state(self.seed + 60_013), self.device):
            method.setup(model, self._setup_info(total_steps=steps))
        lower_model = torch.compile(model) if self.compile else model
        model_params = [p for p in model.parameters() if p.requires_grad]
        params = model_params + list(method.lower_parameters())
        optimizer = self._make_optimizer(params)
        streams = _RunData(self, data, method)
        per_epoch = streams.train.batches_per_epoch
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1)) if self.scheduler_spec == "cosine" else None
        total = steps if stop_at is None else min(steps, int(stop_at))  # the run's length (per_epoch batches an epoch)
        # refit (a bi-level method's switch, issue 8): after `refit` of the run φ is frozen (no more
        # upper steps) and D_dev joins D_train for θ; selection stays on D_val
        refit = getattr(method, "refit", None) if method.uses_dev and method.lower_steps else None
        refit_step = None if refit is None else min(total, max(1, int(round(float(refit) * total))))
        run = _Run(
            method=method, model=model, lower_model=lower_model, model_params=model_params, params=params,
            optimizer=optimizer, scheduler=scheduler, data=streams, needed=method.task_names(self.tasks),
            total=total, per_epoch=per_epoch, eval_every=self.eval_every or per_epoch, refit_step=refit_step,
            state=_new_state(), t_start=t_start, checkpoint=self._checkpoint_path(),
            identity=self._identity(method),
            autocast=(lambda: torch.autocast(self.device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16))
            if self.amp else nullcontext, clock=time.perf_counter,
        )
        if self.resume and run.checkpoint is not None and run.checkpoint.exists():
            _restore(run)
        run.elapsed_before = float(run.state["elapsed_s"])
        return run

    def _run_length(self, n_train: int) -> int:
        """Lower steps of a run on `n_train` training samples: `steps`, or `epochs` of batches."""
        return self.steps if self.steps is not None else int(self.epochs) * math.ceil(n_train / self.batch_size)

    def _upper(self, run: "_Run", step: int) -> None:
        """A bi-level method's upper step, on what `UpperContext` gives it (nothing else)."""
        t1 = time.perf_counter()
        model, data = run.model, run.data
        context = UpperContext(
            params=tuple(run.model_params), tasks=self.tasks, train_batch=data.upper_batch,
            dev_batch=data.dev_batch, lr=run.optimizer.param_groups[0]["lr"], step=step,
            terms=lambda b, **kw: compute_terms(model, b, self.tasks, **kw), primary_train_batch=data.primary_train_batch,
        )
        with data.upper_random():  # the lower level's random streams are left exactly where they were
            info = run.method.upper_step(model, context)
        run.state["upper_s"] += time.perf_counter() - t1
        self._emit("upper", {"step": step, **info})

    def _evaluate(self, run: "_Run", step: int, terms: LossTerms, guard: "_DivergenceGuard") -> dict[str, Any]:
        """D_val at `step`: the history row, the trace, the best-on-val weights, then the checkpoint
        (before the callbacks, so a callback that stops the run loses nothing)."""
        state, data = run.state, run.data.data
        val = evaluate(run.model, data.val, self.tasks, device=self.device, transform=data.eval_transform)
        row = {
            "step": step, "epoch": step / run.per_epoch,
            **{f"train_loss/{k}": float(terms.mean(k).detach()) for k in terms.losses},
            "val_loss": val["loss"], "refit": state["refit"], f"val_{self.tasks.primary.metric}": val["metric"],
            "seconds": run.elapsed_before + time.perf_counter() - run.t_start,
        }
        guard.check(step)
        state["history"].append(row)
        state["trace"].append({"step": step, **run.method.trace()})
        # select on the val metric; ties (common once val accuracy saturates) go to the lower val loss
        sign = 1.0 if self.tasks.primary.higher_is_better else -1.0
        score = (sign * val["metric"], -val["loss"])
        if state["best_metric"] is None or (not math.isnan(score[0]) and tuple(score) > tuple(state["best_metric"])):
            state["best_metric"], state["best_step"] = score, step
            state["best"] = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
        if run.checkpoint is not None:
            state["elapsed_s"] = run.elapsed_before + time.perf_counter() - run.t_start
            _save(run)
        self._emit("eval", row)
        return row

    def _finish(self, run: "_Run") -> RunResult:
        """The best-on-val weights back in the model, D_test read once, the `RunResult`."""
        state, data, model, method = run.state, run.data.data, run.model, run.method
        model.load_state_dict(state["best"])
        val = evaluate(model, data.val, self.tasks, device=self.device, transform=data.eval_transform)
        # a bundle without a test split (test=None) is allowed: test_metric is NaN
        test = (
            evaluate(model, data.test, self.tasks, device=self.device, transform=data.eval_transform)
            if data.test is not None else {"metric": math.nan, "loss": math.nan}
        )
        model.eval()  # documented: after fit() the model holds the best-on-val weights, in eval mode
        model._auxnb_fitted = method.name
        total_s = run.elapsed_before + time.perf_counter() - run.t_start  # summed over every resumed part
        lower_s = state["lower_s"]
        memory = {}
        if self.device.type == "cuda":
            memory["peak_allocated_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        config = {
            "method": method.name, "method_config": method.config(), "epochs": self.epochs, "steps": run.total,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer_spec if isinstance(self.optimizer_spec, str) else repr(self.optimizer_spec),
            "lr": self.lr, "weight_decay": self.weight_decay, "scheduler": self.scheduler_spec,
            "freeze_aux_buffers": self.freeze_aux_buffers, "refit_step": run.refit_step, "device": str(self.device),
            "amp": self.amp, "data": data.describe(), **self.extra_config,
            # what makes this run this run (the checkpoint identity): a selection reuses a finished
            # run as its candidate only when the identities agree (`auxnb.selection`)
            "identity": run.identity,
        }
        result = RunResult(
            val_metric=val["metric"], test_metric=test["metric"], metric_name=self.tasks.primary.metric,
            history=pd.DataFrame(state["history"]), trace=state["trace"], config=config, seed=self.seed,
            timings={"total_s": total_s, "lower_s": lower_s, "upper_s": state["upper_s"], "per_step_s": lower_s / max(run.total, 1)},
            best_step=state["best_step"], memory=memory, model=model, tasks=self.tasks, transform=data.transform,
            eval_transform=data.eval_transform, phi=method.state_dict(), weights=state["best"],
        )
        self._emit("end", result.summary())
        return result

    # ------------------------------------------------------------- checkpoints
    def _checkpoint_path(self) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / "checkpoint.pt"

    def _check_resumable(self) -> None:
        """Before any work: ``resume=True`` with no checkpoint is an error (a misspelled directory), and
        a folder holding a selection's checkpoints (a guarded run, a search) is never a single run's."""
        if not self.resume or self.checkpoint_dir is None:
            return
        from .selection import STATE_FILE

        state = self.checkpoint_dir / STATE_FILE
        if state.exists():
            saved = (ckpt_io.load(state).get("identity") or {})
            what = {"search": "a search's", "ranking": "a ForkMerge pruning stage's"}.get(
                saved.get("kind"), f"a run guarded with guard={saved.get('guard')!r}")
            raise ckpt_io.CheckpointError(
                f"{self.checkpoint_dir} holds {what} checkpoints ({STATE_FILE}: method {saved.get('run', {}).get('method')!r}, "
                f"candidates {saved.get('candidates')}), not those of this single run of {self.method.name!r} (guard None); "
                + ("resume it with the same topk (ForkMerge(topk=...))" if saved.get("kind") == "ranking"
                   else "resume it with the same guard (guard=..., CLI --guard ...)") + ", or choose another checkpoint_dir."
            )
        if self.resume is True and not (self.checkpoint_dir / "checkpoint.pt").exists():
            raise ckpt_io.CheckpointError(
                f"resume=True but there is no checkpoint in {self.checkpoint_dir} (a misspelled directory?); "
                "check the path, or pass resume='auto' (CLI: --resume --allow-fresh) to start from scratch "
                "when no checkpoint exists, or resume=False."
            )

    def _identity(self, method: Method) -> dict[str, Any]:
        """What makes a run this run: a checkpoint of any other run is never resumed from."""
        import auxnb

        extras = {
            k: ckpt_io.describe_value(v)
            for k, v in vars(method).items()
            if not k.startswith("_") and (dataclasses.is_dataclass(v) or callable(v)) and not isinstance(v, (nn.Module, Tensor))
        }
        identity = {
            "method": method.name,
            "method_config": ckpt_io.describe_value({**method.config(), **extras}),
            "seed": self.seed,
            "trainer": {
                "epochs": self.epochs, "steps": self.steps, "batch_size": self.batch_size,
                "optimizer": ckpt_io.describe_value(self.optimizer_spec), "lr": self.lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "scheduler": self.scheduler_spec, "eval_every": self.eval_every,
                "grad_clip": self.grad_clip, "freeze_aux_buffers": self.freeze_aux_buffers, "amp": self.amp,
            },
            "run": ckpt_io.describe_value(self.extra_config),
            "splits": ckpt_io.split_hash(self.data),
            "auxnb": auxnb.__version__,
        }
        if self.selection_identity is not None:  # a candidate of a selection: the selection is part of it
            identity["selection"] = self.selection_identity
        return identity


def lower_update(method: Method, terms: LossTerms, params: Sequence[Tensor], optimizer: torch.optim.Optimizer, *,
                 loss_scale: float | None = None, grad_clip: float | None = None) -> bool:
    """One lower update from `terms`: the method's direction (under fp16, with its objective scaled by
    `loss_scale`, a value, and the direction unscaled: `scaled_direction`), clipped to norm
    `grad_clip`, written to ``.grad`` (first-order: never a graph-carrying ``.grad``) and stepped.

    Returns False when a scaled direction overflowed: the update is skipped (the step still counts).
    """
    if loss_scale is not None:
        grads = scaled_direction(method, terms, params, loss_scale)
        if not all(torch.isfinite(g).all() for g in grads):
            return False
    else:
        grads = method.direction(terms, params)
    if grad_clip is not None:
        norm = torch.sqrt(sum((g.detach().float() ** 2).sum() for g in grads))
        factor = min(1.0, grad_clip / (float(norm) + 1e-12))
        grads = tuple(g * factor for g in grads)
    for p, g in zip(params, grads):
        p.grad = g.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return True


def next_loss_scale(scale: float, good_steps: int, finite: bool) -> tuple[float, int]:
    """fp16's dynamic loss scale (ours: torch's GradScaler wants to own the backward and the optimiser
    step; here the method computes the direction): halved on an overflow, doubled after 2,000 finite
    steps in a row (at most 2²⁴, at least 1). Returns ``(scale, good_steps)``."""
    if not finite:
        return max(scale / 2.0, 1.0), 0
    good_steps += 1
    if good_steps >= 2000:
        return min(scale * 2.0, 2.0**24), 0
    return scale, good_steps


def _new_state() -> dict[str, Any]:
    """A run's state: what a checkpoint stores besides the model, optimiser, method and streams."""
    return {
        "step": 0, "best": None, "best_metric": None, "best_step": -1, "history": [], "trace": [], "upper_s": 0.0,
        "refit": False, "lower_s": 0.0, "elapsed_s": 0.0, "loss_scale": 2.0**16, "good_steps": 0,
    }


def _fresh_state(seed: int) -> dict[str, Any]:
    """A global random state of its own, seeded by `seed` (CPU now; a CUDA device's on first use)."""
    return {"seed": seed, "cpu": torch.Generator().manual_seed(seed).get_state()}


@contextmanager
def _on_state(state: dict[str, Any], device: torch.device) -> Iterator[None]:
    """Run the block on torch's global random state `state` (a `_fresh_state`, updated in place) and give
    the state from before back afterwards, exactly, even after an exception (CPU, and `device` when it is
    a CUDA device)."""
    cuda = device.type == "cuda"
    before_cpu = torch.get_rng_state()
    before_cuda = torch.cuda.get_rng_state(device) if cuda else None
    torch.set_rng_state(state["cpu"])
    if cuda:
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], device)
        else:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(state["seed"])
    try:
        yield
    finally:
        state["cpu"] = torch.get_rng_state()
        torch.set_rng_state(before_cpu)
        if cuda:
            state["cuda"] = torch.cuda.get_rng_state(device)
            torch.cuda.set_rng_state(before_cuda, device)


class _RunData:
    """A run's batch streams, each reproducible from (seed, epoch, position), and how batches are made.

    The bundle's input transform (augmentation, Z-score) runs on the device, before views; D_dev
    and the upper level's primary-only training batches go through the evaluation transform.

    The upper level has random streams of its own: its training batches (`upper_batch`) come from
    their own shuffles, auxiliary streams and view generator, and while a method's upper step runs
    (`upper_random`) torch's global random state (a transform's crops and flips, dropout) is the
    upper level's, not the lower level's. So an upper step never moves the lower level's randomness:
    a bi-level method whose upper step leaves its hyperparameters where they were trains θ exactly as
    the same method with no upper step would, and a method and its baseline see the same batches,
    crops and dropout masks (common random numbers: their paired difference is the method's effect,
    not two different draws of the augmentation). Each auxiliary dataset's transform runs on a random
    state of its own too (`aux_rng`), so drawing an auxiliary batch, which STL never does, leaves the
    primary stream's crops where they were.
    """

    def __init__(self, trainer: "Trainer", data: DataBundle, method: Method):
        seed, size, device = trainer.seed, trainer.batch_size, trainer.device
        self.data = data
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.train = BatchStream(data.train, size, seed, device=device)
        self.aux = {
            name: BatchStream(ds, size, seed + 101 * (i + 1), device=device)
            for i, (name, ds) in enumerate(sorted(data.aux_train.items()))
        }
        self.upper_train = BatchStream(data.train, size, seed + 50_021, device=device)
        self.upper_aux = {
            name: BatchStream(ds, size, seed + 50_021 + 101 * (i + 1), device=device)
            for i, (name, ds) in enumerate(sorted(data.aux_train.items()))
        }
        self.dev = BatchStream(data.dev, size, seed + 70_001, device=device) if method.uses_dev else None
        self.view = torch.Generator().manual_seed(seed + 3)
        self.upper_view = torch.Generator().manual_seed(seed + 50_023)
        # the global random state the upper steps run on (CPU; a CUDA device's is seeded on first use)
        self.upper_rng: dict[str, Any] = _fresh_state(seed + 50_029)
        # the global random states each auxiliary dataset's transform runs on (lower and upper level): an
        # auxiliary stream's crops never move the primary stream's, so STL, which draws no auxiliary batch,
        # sees the primary batches of every method of the same seed
        self.aux_rng = {name: _fresh_state(seed + 60_031 + 101 * (i + 1)) for i, name in enumerate(sorted(self.aux))}
        self.upper_aux_rng = {name: _fresh_state(seed + 60_037 + 101 * (i + 1)) for i, name in enumerate(sorted(self.aux))}
        self.needed_streams = {trainer.tasks[n].stream for n in method.task_names(trainer.tasks)}
        # refit: D_train ∪ D_dev of the whole bundle, on a stream of its own
        self._refit = lambda: BatchStream(trainer.data.for_method(False).train, size, seed + 90_001, device=device)

    @staticmethod
    def transformed(item, transform):
        return item if transform is None else (transform(item[0]), item[1])

    def batch(self, *, upper: bool = False) -> Batch:
        """The next lower-level batch (``upper=True``: the upper level's, from its own streams)."""
        primary, views, aux = (self.upper_train, self.upper_view, self.upper_aux) if upper else (self.train, self.view, self.aux)
        x, t = self.transformed(primary.next(), self.data.transform)
        batch: dict[str, Any] = {PRIMARY_STREAM: (x, t)}
        for name, view in self.data.views.items():
            if name in self.needed_streams:
                batch[name] = view(x, t, generator=views)
        rngs = self.upper_aux_rng if upper else self.aux_rng
        for name, s in aux.items():
            if name in self.needed_streams:
                item = s.next()
                with _on_state(rngs[name], self.device):
                    batch[name] = self.transformed(item, self.data.transform)
        return batch

    def upper_batch(self) -> Batch:
        """A training batch for the upper step (its look-back replays): the upper level's own streams."""
        return self.batch(upper=True)

    def upper_random(self):
        """Run the block on the upper level's global random state and give the lower level's back after,
        exactly, even after an exception (CPU, and the run's CUDA device when it is one)."""
        return _on_state(self.upper_rng, self.device)

    def dev_batch(self) -> Batch:
        assert self.dev is not None
        return {PRIMARY_STREAM: self.transformed(self.dev.next(), self.data.eval_transform)}

    def primary_train_batch(self) -> Batch:
        return {PRIMARY_STREAM: self.transformed(self.upper_train.next(), self.data.eval_transform)}

    def switch_to_refit(self) -> None:
        self.train = self._refit()

    def state_dict(self) -> dict[str, Any]:
        return {
            "train": self.train.state_dict(), "upper_train": self.upper_train.state_dict(),
            "dev": self.dev.state_dict() if self.dev is not None else None,
            "aux": {k: s.state_dict() for k, s in self.aux.items()}, "view_rng": self.view.get_state(),
            "upper": {"aux": {k: s.state_dict() for k, s in self.upper_aux.items()}, "view_rng": self.upper_view.get_state(),
                      "rng": dict(self.upper_rng)},
            "aux_rng": {k: dict(v) for k, v in self.aux_rng.items()},
            "upper_aux_rng": {k: dict(v) for k, v in self.upper_aux_rng.items()},
        }

    def load_state_dict(self, saved: Mapping[str, Any], refit: bool) -> None:
        if refit:
            self.switch_to_refit()
        self.train.load_state_dict(saved["train"])
        self.upper_train.load_state_dict(saved["upper_train"])
        if self.dev is not None:
            self.dev.load_state_dict(saved["dev"])
        for name, s in self.aux.items():
            s.load_state_dict(saved["aux"][name])
        self.view.set_state(saved["view_rng"])
        upper = saved.get("upper")
        if upper is not None:  # checkpoints written before the upper level had streams of its own lack it
            for name, s in self.upper_aux.items():
                s.load_state_dict(upper["aux"][name])
            self.upper_view.set_state(upper["view_rng"])
            self.upper_rng = {"seed": self.upper_rng["seed"], **upper["rng"]}
        # checkpoints written before the auxiliary transforms had random states of their own lack these
        for key in ("aux_rng", "upper_aux_rng"):
            for name, state in (saved.get(key) or {}).items():
                getattr(self, key)[name] = dict(state)


@dataclass
class _Run:
    """One run's objects, handed between the Trainer's rooms (`Trainer._start` builds it)."""

    method: Method
    model: nn.Module
    lower_model: nn.Module
    model_params: list[nn.Parameter]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: _RunData
    needed: list[str]
    total: int
    per_epoch: int
    eval_every: int
    refit_step: int | None
    state: dict[str, Any]
    t_start: float
    checkpoint: Path | None
    identity: dict[str, Any] | None
    autocast: Callable[[], Any]
    elapsed_before: float = 0.0
    #: the clock the run's seconds are read from (the module's ``time.perf_counter`` when it started)
    clock: Callable[[], float] = time.perf_counter


def _restore(run: _Run) -> None:
    """Load the run's checkpoint into its objects (refused when it is another run's: `check_identity`)."""
    path = run.checkpoint
    saved = ckpt_io.load(path)
    ckpt_io.check_identity(path, saved.get("identity"), run.identity)
    ckpt_io.check_model_layout(path, saved["model"], run.model)  # e.g. per-head vs batched heads (issue 23)
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(saved["scheduler"])
    run.method.load_state_dict(saved["method"])
    ckpt_io.restore_generators(run.method, saved.get("method_rng", {}))
    run.data.load_state_dict({**{k: saved[k] for k in ("train", "upper_train", "dev", "aux")}, "view_rng": saved["view_rng"],
                              "upper": saved.get("upper"), "aux_rng": saved.get("aux_rng"),
                              "upper_aux_rng": saved.get("upper_aux_rng")},
                             refit=bool(saved["state"].get("refit")))
    ckpt_io.restore_rng(saved["rng"])
    run.state.update(saved["state"])


def _save(run: _Run) -> None:
    """Write the run's checkpoint (atomic: a killed run never leaves a half-written one)."""
    streams = run.data.state_dict()
    payload = {
        "identity": run.identity,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict() if run.scheduler is not None else None,
        "method": run.method.state_dict(),
        "method_rng": ckpt_io.generator_states(run.method),
        "train": streams["train"],
        "upper_train": streams["upper_train"],
        "dev": streams["dev"],
        "aux": streams["aux"],
        "rng": ckpt_io.capture_rng(),
        "view_rng": streams["view_rng"],
        "upper": streams["upper"],
        "aux_rng": streams["aux_rng"],
        "upper_aux_rng": streams["upper_aux_rng"],
        "state": run.state,
    }
    ckpt_io.save(run.checkpoint, payload)


class TrainingDiverged(FloatingPointError):
    """The divergence guard stopped a run (see `Trainer`'s ``divergence``)."""


def _check_divergence(divergence):
    if divergence is None:
        return None
    try:
        k, n = divergence
        k, n = float(k), int(n)
    except (TypeError, ValueError):
        raise ValueError(f"divergence must be None or (k, n), e.g. (10.0, 2), got {divergence!r}.") from None
    if not k > 1 or n < 1:
        raise ValueError(f"divergence=(k, n) needs k > 1 and n >= 1, got {divergence!r}.")
    return k, n


class _DivergenceGuard:
    """Stops a run whose mean primary training loss stays above k × its first value for n evaluations.

    Its counters live in the run's `state` (checkpointed); the loss sum is a device tensor, so
    it adds no synchronisation per step.
    """

    def __init__(self, divergence, task: str, state: dict):
        self.divergence, self.task, self.state = divergence, task, state
        self.total: Tensor | None = None
        self.count = 0
        if divergence is not None:
            state.setdefault("guard", {"initial": None, "strikes": 0})

    def observe(self, terms: LossTerms) -> None:
        if self.divergence is None:
            return
        loss = terms.mean(self.task).detach().float()
        if self.state["guard"]["initial"] is None:
            self.state["guard"]["initial"] = float(loss)
        self.total = loss if self.total is None else self.total + loss
        self.count += 1

    def check(self, step: int) -> None:
        if self.divergence is None or self.total is None:
            return
        k, n = self.divergence
        mean, initial = float(self.total) / self.count, float(self.state["guard"]["initial"])
        self.total, self.count = None, 0
        guard = self.state["guard"]
        guard["strikes"] = guard["strikes"] + 1 if mean > k * max(initial, 1e-12) else 0
        if guard["strikes"] >= n:
            raise TrainingDiverged(
                f"Training diverged: the mean training loss of the primary task {self.task!r} was {mean:.4g} in the "
                f"evaluation interval ending at lower step {step}, above {k:g} x its initial value {initial:.4g} for "
                f"{n} evaluation(s) in a row; lower the learning rate (or turn the guard off: divergence=None)."
            )
