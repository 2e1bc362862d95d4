"""ForkMerge (Jiang, Chen, Pan, Wang, Liu, Jiang, Long, NeurIPS 2023): fork the model into branches with different task
weights, train them side by side, and merge their parameters with weights chosen on D_dev.

The Trainer still trains one run and holds one model: the *host* branch. The method owns the
other branches (their parameters, buffers and optimiser states), trains them after each of the
host's lower updates on the same batch (`ForkMerge.after_lower`, the Trainer's per-step hook), and
merges every ``interval`` lower steps in its `upper_step`, after which the model the Trainer holds
is the merged one.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..tasks import PRIMARY_STREAM, TaskSet, metric
from .base import LossTerms, Method, SetupInfo, _set_extra_losses, compute_terms
from .guard import _EqualOn
from .presets import FORKMERGE_AUTHORS

__all__ = ["ForkMerge", "SEARCHES", "CRITERIA", "FORKMERGE_AUTHORS", "topk_branches", "rank_tasks"]

#: how the merge weights are searched (see `ForkMerge`)
SEARCHES = ("greedy", "grid")
#: what the merge weights are chosen on: the primary task's D_dev loss or its metric
CRITERIA = ("loss", "metric")

#: the branch specifications that are names
_NAMED = ("primary", "all")
_DEFAULT_BRANCHES = ("all", "primary")
#: the ranking runs' length when `topk` is given: a share of the run (the authors' DomainNet code: 1 of 20 epochs)
DEFAULT_PRUNE = 0.05


def topk_branches(ranking: Sequence[str], topk: Sequence[int], primary: str) -> list[str | dict[str, float]]:
    """The branches of the authors' pruning stage, in `topk`'s order: ``k = 0`` is the primary task
    alone (``"primary"``); ``k >= 1`` the primary task with weight 1 and the first k auxiliary tasks of
    `ranking` (best first) with weight 1/k each.

    Example:
        >>> topk_branches(["b", "a", "c"], (0, 1, 2), "y")
        ['primary', {'y': 1.0, 'b': 1.0}, {'y': 1.0, 'b': 0.5, 'a': 0.5}]
    """
    if max(topk) > len(ranking):
        raise ValueError(f"topk={tuple(topk)} asks for the top {max(topk)} auxiliary tasks, but this run has "
                         f"{len(ranking)} ({', '.join(ranking) or 'none'}); give topk values <= {len(ranking)}.")
    return ["primary" if k == 0 else {primary: 1.0, **{t: 1.0 / k for t in ranking[:k]}} for k in topk]


def rank_tasks(scores: Mapping[str, float], higher_is_better: bool) -> list[str]:
    """The auxiliary tasks, best first, by their ranking run's D_val metric (`scores`, task -> metric).
    A non-finite score ranks last; ties keep `scores`' order (the task order).

    Example:
        >>> rank_tasks({"a": 0.80, "b": 0.90, "c": float("nan"), "d": 0.80}, higher_is_better=True)
        ['b', 'a', 'd', 'c']
    """
    sign = 1.0 if higher_is_better else -1.0
    # sorted() is stable: equal keys keep the tasks' order
    return sorted(scores, key=lambda t: (0, -sign * scores[t]) if math.isfinite(scores[t]) else (1, 0.0))


class _RankingRun(_EqualOn):
    """One ranking run of ForkMerge's pruning stage: the primary task and one auxiliary task, weight 1
    each (and ForkMerge's extra losses), trained on D_train without D_dev, as ForkMerge's branches are."""

    name = "forkmerge-rank"
    uses_dev = True


class _BranchModel:
    """A branch's view of the shared model: the module's code with the branch's own tensors.

    Calls run ``torch.func.functional_call`` with the branch's parameters and buffers, so a
    forward in training mode updates the branch's BatchNorm statistics, not the model's.
    `modules` is the model's (normalisation switches, `auxnb.methods.base.no_running_stats`, act on
    the module objects the call runs through); `named_parameters` / `parameters` are the branch's
    trainable tensors, for extra losses that read the parameters (``l2_penalty``).
    """

    def __init__(self, model: nn.Module, tensors: dict[str, Tensor], trainable: Sequence[str]):
        self.model, self.tensors, self.trainable = model, tensors, list(trainable)

    def __call__(self, x: Tensor, names: Sequence[str]):
        return torch.func.functional_call(self.model, self.tensors, (x, names))

    def modules(self):
        return self.model.modules()

    def named_parameters(self):
        return ((n, self.tensors[n]) for n in self.trainable)

    def parameters(self):
        return (self.tensors[n] for n in self.trainable)


#: Δt of ``interval="auto"`` (or a fraction) when the method is set up without the run's length (outside a Trainer).
AUTO_INTERVAL = 100


class ForkMerge(Method):
    """ForkMerge (Jiang et al., "ForkMerge: Mitigating Negative Transfer in Auxiliary-Task Learning", NeurIPS 2023).

    Every `interval` lower steps the model is forked into B branches that differ only in their task
    weights (one is the primary task alone); each branch trains `interval` steps with its own
    optimiser, then the branches' parameters are merged, ``θ = Σ_b Λ_b θ_b`` with ``Σ_b Λ_b = 1``,
    and every branch continues from θ. Λ is the candidate that scores best on the primary task's
    D_dev (`criterion`): its mean loss (default) or its metric (the authors' code).

    **How it fits the Trainer.** The model the Trainer holds is the *host* branch: the first branch
    whose weights use every task any branch uses (the joint branch by default), trained by the
    Trainer's own lower step (``direction`` is its weighted gradient) and optimiser. The method
    owns the other B − 1 branches — a copy of every trainable parameter and every buffer, and an
    optimiser each, built by the Trainer's own factory (same kind, learning rate, momentum, weight
    decay; the learning rate follows the Trainer's schedule) — and trains each after the host's
    update on the *same* batch (`after_lower`), with the same gradient clipping and autocast. The
    merge is the `upper_step` the Trainer calls every `interval` (``lower_steps``) steps: it writes
    θ into the model's tensors in place (the Trainer's optimiser keeps pointing at them) and into
    every branch. Each branch keeps its optimiser state across merges, as the authors' code does.
    Between merges the Trainer's evaluations on D_val see the host branch; with ``eval_every`` a
    multiple of `interval` every evaluation (and so the best-on-val checkpoint) is of a merged model.
    Frozen parameters (``requires_grad=False``) are shared, never copied.

    **Buffers.** Each branch has its own BatchNorm statistics (a branch forward updates only its
    own). A merge averages every floating-point buffer with the same weights Λ as the parameters;
    integer buffers (``num_batches_tracked``) are taken from the branch with the largest weight.
    Candidates are scored in evaluation mode (running statistics, no dropout) and change nothing.

    **Cost.** A lower step is the host's forward and backward plus one forward and backward per
    other branch (each on the streams its tasks need: a primary-only branch forwards the primary
    stream alone): about B × Equal's lower step (``benchmarks/step_cost.py``). Memory: B − 1 more
    copies of the trainable parameters, the buffers and the optimiser state. A merge scores, on
    `dev_batches` D_dev batches drawn once per merge, each branch alone and then the candidate
    mixtures: B + (B − 1)(``len(alphas)`` − 1) forwards of those batches for ``search="greedy"``,
    ``len(alphas) ** (B − 1)`` (those summing to at most 1) for ``"grid"``. An `interval` longer than
    the run is refused at set-up (the run would never merge: its result would be the host branch alone).

    Args:
        branches: one entry per branch: ``"primary"`` (the primary task alone, weight 1),
            ``"all"`` (every task with weight 1, as Equal), or a dict ``{task: weight}`` (tasks not
            named get 0). Default: ``("all", "primary")``, the paper's two-branch ForkMerge.
        interval: Δt, lower steps between merges (an integer); a fraction of the run in (0, 1)
            (e.g. ``0.125``: eight merges; resolved at set-up from the run's length, rounded, at least
            1); or ``"auto"`` (default) = ``0.25``: a quarter of the run's lower steps (the authors'
            DomainNet schedule, a fork every 5 of 20 epochs), so that a short run merges too.
        alphas: the merge grid (the authors' 0, 0.2, …, 1).
        search: ``"greedy"`` (the authors' code: branches ranked by their own D_dev score; the best
            gets weight 1, each next one in turn the α·(Σ weights so far)/(its rank) that scores best,
            kept only when it beats the current mixture; then normalised to sum 1) or ``"grid"`` (every
            Λ = (1 − λ, λ) for λ in `alphas`, without the code's ranking; with more branches every
            α-vector for branches 2..B whose sum is at most 1, branch 1 getting the rest). Ties go to
            the candidate met first; a candidate with a non-finite score never wins.
        criterion: ``"loss"`` (the primary task's mean D_dev loss, lower is better) or
            ``"metric"`` (its metric, better by the metric's own direction).
        dev_batches: D_dev batches each candidate is scored on (the same batches for all).
        aux_losses, aux_loss_weight: extra losses (`Method`), added with their weight to every
            branch but ``"primary"`` (the primary task alone); the extra loss reads that branch's
            tensors. ``["primary", {primary: 1}]`` with ``aux_losses`` forks the primary task with
            and without the extra losses (e.g. an L2 regulariser as the only auxiliary loss).
        topk: the authors' pruning stage (their ``--topk``; None: off, the branches are `branches`).
            Before the run, one short *ranking run* per auxiliary task trains the primary task and that
            task (weight 1 each, plus the extra losses; Equal on the pair, on D_train without D_dev, from
            the run's initial weights and seed) for `prune_steps` lower steps on the whole run's
            learning-rate schedule; the tasks are ranked by each ranking run's best D_val metric
            (`rank_tasks`), and the branches are `topk_branches`: ``k = 0`` the primary task alone,
            ``k >= 1`` the primary task with weight 1 and the k best-ranked tasks with 1/k each. The
            ranking runs are the selection layer's (`auxnb.selection`: ``Trainer.fit`` and
            ``experiments.run`` do them); ``result.config["selection"]`` records the ranking, each
            ranking run's D_val and the branches, and ``result.candidates`` the ranking runs.
        prune_steps: lower steps of each ranking run: an integer, or a fraction of the run in (0, 1)
            (default 0.05: the authors' DomainNet code ranks on 1 of its 20 epochs).

    Presets: ``ForkMerge.paper("domainnet", steps_per_epoch=...)`` (also ``"nyuv2"``; the same as
    ``ForkMerge.authors``: the values of the authors' code, `auxnb.methods.presets.FORKMERGE_AUTHORS`).
    The constructor's defaults are the recommendation (the D_dev loss, less noisy than accuracy on a
    small D_dev, and Δt a quarter of the run). The authors' pruning stage is `topk` (with
    ``pruning=True`` in the presets). Not implemented: their reverting each branch to its
    best-on-validation epoch before a merge (see the book page on the papers and the authors' code).
    """

    name = "forkmerge"
    uses_dev = True

    def __init__(
        self,
        branches: Sequence[str | Mapping[str, float]] = ("all", "primary"),
        *,
        interval: int | float | str = "auto",
        alphas: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        search: str = "greedy",
        criterion: str = "loss",
        dev_batches: int = 4,
        aux_losses: Mapping[str, Callable] | None = None,
        aux_loss_weight: float = 1.0,
        topk: Sequence[int] | None = None,
        prune_steps: int | float = DEFAULT_PRUNE,
    ) -> None:
        self.branches = _check_branches(branches)
        if topk is not None:
            if isinstance(topk, (str, bytes)) or not isinstance(topk, Sequence) or not topk or any(
                    isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in topk) or len(set(topk)) != len(topk):
                raise ValueError(f"topk must be a non-empty list of distinct integers >= 0 (0: the primary task alone; "
                                 f"k: the primary task with the k best-ranked auxiliary tasks), e.g. (0, 1, 2); got {topk!r}.")
            if tuple(branches) != _DEFAULT_BRANCHES:
                raise ValueError("Give either branches or topk, not both: topk builds the branches from the ranking "
                                 f"runs (the authors' pruning stage); got branches={branches!r} and topk={topk!r}.")
            topk = [int(k) for k in topk]
        prune_fraction = isinstance(prune_steps, float) and 0.0 < prune_steps < 1.0
        if not prune_fraction and (isinstance(prune_steps, bool) or not isinstance(prune_steps, int) or prune_steps < 1):
            raise ValueError(f"prune_steps must be an integer >= 1 (lower steps of each ranking run) or a fraction of "
                             f"the run in (0, 1) such as 0.05, got {prune_steps!r}.")
        self.topk, self.prune_steps = topk, prune_steps
        fraction = isinstance(interval, float) and 0.0 < interval < 1.0
        if interval != "auto" and not fraction and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ValueError(f"interval must be an integer >= 1 (lower steps between merges, Δt), a fraction of the run "
                             f"in (0, 1) such as 0.125, or 'auto' (a quarter of the run), got {interval!r}.")
        try:
            grid = [float(a) for a in alphas]
        except (TypeError, ValueError):
            raise ValueError(f"alphas must be a sequence of numbers in [0, 1] (the merge grid), got {alphas!r}.") from None
        if not grid or any(not (0.0 <= a <= 1.0) for a in grid) or isinstance(alphas, (str, bytes)):
            raise ValueError(f"alphas must be a non-empty sequence of numbers in [0, 1] (the merge grid), got {alphas!r}.")
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {SEARCHES}, got {search!r}.")
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA} (the primary task's D_dev loss or metric), got {criterion!r}.")
        if isinstance(dev_batches, bool) or not isinstance(dev_batches, int) or dev_batches < 1:
            raise ValueError(f"dev_batches must be an integer >= 1, got {dev_batches!r}.")
        self.interval, self.alphas, self.search, self.criterion, self.dev_batches = interval, grid, search, criterion, dev_batches
        _set_extra_losses(self, aux_losses, aux_loss_weight)

    # ------------------------------------------------------------------ presets
    @classmethod
    def authors(cls, experiment: str = "domainnet", *, steps_per_epoch: int, pruning: bool = False,
                **overrides: Any) -> "ForkMerge":
        """The authors' configuration for `experiment` (`FORKMERGE_AUTHORS`): Δt = their epochs per fork
        times `steps_per_epoch` (this run's lower steps per epoch), their grid, greedy search on the
        validation metric, the two-branch form (primary alone, all tasks). With ``pruning=True`` their
        pruning stage instead: their ``--topk`` branches from ranking runs of their ``--pruning_epochs``
        (a run needs at least max(topk) auxiliary tasks: 5 for DomainNet, 2 for NYUv2). `overrides`
        replace fields."""
        if experiment not in FORKMERGE_AUTHORS:
            raise ValueError(f"Unknown ForkMerge experiment {experiment!r}; the authors' are {', '.join(FORKMERGE_AUTHORS)}.")
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be an integer >= 1 (this run's lower steps per epoch), got {steps_per_epoch!r}.")
        spec = FORKMERGE_AUTHORS[experiment]
        kwargs = {"branches": ("all", "primary"), "interval": spec["interval_epochs"] * steps_per_epoch,
                  "alphas": spec["alphas"], "search": "greedy", "criterion": spec["criterion"]}
        if pruning:
            kwargs.update(topk=spec["topk"], prune_steps=spec["pruning_epochs"] * steps_per_epoch)
        return cls(**{**kwargs, **overrides})

    @classmethod
    def paper(cls, experiment: str = "domainnet", *, steps_per_epoch: int, pruning: bool = False,
              **overrides: Any) -> "ForkMerge":
        """The ``paper`` preset: the values of the authors' public code for `experiment` (`authors`)."""
        return cls.authors(experiment, steps_per_epoch=steps_per_epoch, pruning=pruning, **overrides)

    # ------------------------------------------------------------------ the pruning stage (topk)
    def prune_steps_for(self, total: int) -> int:
        """The ranking runs' lower steps in a run of `total` lower steps (`prune_steps` resolved)."""
        if isinstance(self.prune_steps, float):
            return max(1, round(total * self.prune_steps))
        if self.prune_steps > total:
            raise ValueError(f"ForkMerge's ranking runs would be longer than the run: prune_steps={self.prune_steps} "
                             f"lower steps, but this run has {total}; give prune_steps <= {total} or a fraction such as 0.05.")
        return self.prune_steps

    def ranking_runs(self, tasks: TaskSet) -> dict[str, Method] | None:
        """The pruning stage's ranking runs, ``"rank-<task>"`` -> the run of the primary task and that
        auxiliary task (None without `topk`). Each is one run of the selection layer (`auxnb.selection`)."""
        if self.topk is None:
            return None
        runs: dict[str, Method] = {}
        for task in tasks.auxiliary:
            run = _RankingRun([task.name])
            if getattr(self, "_extra_losses", None):
                _set_extra_losses(run, dict(self._extra_losses), self.aux_loss_weight)
            runs[f"rank-{task.name}"] = run
        return runs

    def from_ranking(self, ranking: Sequence[str]) -> "ForkMerge":
        """This configuration with the branches `topk_branches` builds from `ranking` (best first): the
        run the pruning stage trains."""
        primary = self.tasks.primary.name if getattr(self, "tasks", None) is not None else None
        if primary is None:
            raise RuntimeError("from_ranking needs the run's tasks: call it after setup().")
        extra = getattr(self, "_extra_losses", None)
        return ForkMerge(topk_branches(list(ranking), self.topk, primary), interval=self.interval, alphas=self.alphas,
                         search=self.search, criterion=self.criterion, dev_batches=self.dev_batches,
                         aux_losses=dict(extra) if extra else None, aux_loss_weight=getattr(self, "aux_loss_weight", 1.0))

    def config(self) -> dict[str, Any]:
        """Constructor arguments; without the pruning stage (``topk=None``) its two keywords are left
        out, so a run's identity (and its checkpoints) is what it was before the stage existed."""
        out = super().config()
        if self.topk is None:
            out.pop("topk", None)
            out.pop("prune_steps", None)
        return out

    @property
    def merges(self) -> int:
        """Merges taken so far in this run (state, not configuration)."""
        return getattr(self, "_merges", 0)

    # ------------------------------------------------------------------ the schedule
    @property
    def lower_steps(self) -> int:  # type: ignore[override]
        """The Trainer calls `upper_step` (the merge) every this many lower steps: `interval` (with
        ``"auto"`` or a fraction, resolved from the run's length at set-up; None before)."""
        return getattr(self, "_auto_interval", None) if self._relative() else self.interval

    @lower_steps.setter
    def lower_steps(self, value: int) -> None:
        self.interval = int(value)

    def _relative(self) -> bool:
        """Whether `interval` is a share of the run (``"auto"`` or a fraction), resolved at set-up."""
        return self.interval == "auto" or isinstance(self.interval, float)

    # ------------------------------------------------------------------ set-up
    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        if info.extra.get("amp") == "fp16":
            raise ValueError("ForkMerge trains its other branches without fp16 loss scaling; use amp='bf16' or amp=None.")
        total = info.extra.get("total_steps")
        if self.topk is not None:  # the pruning stage: checked here, before any ranking run trains
            topk_branches([t.name for t in info.tasks.auxiliary], self.topk, info.tasks.primary.name)
            if total is not None:
                self.prune_steps_for(total)
            self._ranking_only = True
            return
        self._ranking_only = False
        if self._relative():
            share = 0.25 if self.interval == "auto" else self.interval
            self._auto_interval = max(1, round(total * share)) if total else AUTO_INTERVAL
        elif total is not None and self.interval > total:
            raise ValueError(
                f"ForkMerge would never merge: interval={self.interval} lower steps, but this run has {total}; "
                f"give interval <= {total}, or interval='auto' (a merge every quarter of the run)."
            )
        tasks = info.tasks
        self._weights = [_resolve(spec, tasks) for spec in self.branches]
        self._labels = [spec if isinstance(spec, str) else f"branch{i}" for i, spec in enumerate(self.branches)]
        self._needed = [[n for n in tasks.names if w.get(n, 0.0) != 0.0] for w in self._weights]
        union = [n for n in tasks.names if any(n in need for need in self._needed)]
        self._union = union
        self._host = next((b for b, need in enumerate(self._needed) if need == union), 0)
        self._uses_aux = [spec != "primary" for spec in self.branches]  # who gets the extra losses
        self._trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        self._tensors: list[dict[str, Tensor]] = []
        for b in range(len(self.branches)):
            if b == self._host:
                self._tensors.append(live)
                continue
            own: dict[str, Tensor] = {}
            for name, t in live.items():
                if name in self._trainable:
                    own[name] = nn.Parameter(t.detach().clone())
                elif isinstance(t, nn.Parameter):  # frozen: shared, never trained
                    own[name] = t
                else:
                    own[name] = t.detach().clone()
            self._tensors.append(own)
        self._optimizers: list[torch.optim.Optimizer | None] | None = None
        self._pending_optimizers: list[Any] | None = None
        self._merges = 0
        self._last_merge: dict[str, Any] = {}

    def task_names(self, tasks: TaskSet) -> list[str]:
        """Every task some branch uses (the host forwards them; the other branches only their own)."""
        weights = [_resolve(spec, tasks) for spec in self.branches]
        return [n for n in tasks.names if any(w.get(n, 0.0) != 0.0 for w in weights)]

    # ------------------------------------------------------------------ the lower step
    def _branch_loss(self, b: int, terms: LossTerms, model: Any) -> Tensor:
        weights = self._weights[b]
        total = terms.mean(terms.primary) * 0.0 if terms.primary in terms.losses else None
        for name in terms.losses:
            w = weights.get(name, 0.0)
            if w != 0.0:
                term = w * terms.mean(name)
                total = term if total is None else total + term
        fns = getattr(self, "_extra_losses", None)
        if fns and self._uses_aux[b]:
            extra = None
            for key, fn in fns.items():
                value = fn(model, terms)
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise ValueError(f"ForkMerge: aux_losses[{key!r}] must return a scalar tensor, got {value!r}.")
                extra = value.reshape(()) if extra is None else extra + value.reshape(())
            total = total + self.aux_loss_weight * extra
        return total

    def weights(self, terms: LossTerms) -> dict[str, Tensor | float]:
        """The host branch's task weights (what the Trainer's lower step trains)."""
        self._check_trainable()
        weights = self._weights[self._host]
        return {n: weights[n] for n in terms.losses if weights.get(n, 0.0) != 0.0}

    def _check_trainable(self) -> None:
        if getattr(self, "_ranking_only", False):
            raise RuntimeError("ForkMerge(topk=...) ranks its auxiliary tasks in runs of their own before it trains: "
                               "train it with Trainer.fit() or auxnb.experiments.run (the selection layer runs the "
                               "pruning stage), or give its branches yourself (branches=[...]).")

    def direction(self, terms: LossTerms, params: Sequence[Tensor], *, create_graph: bool = False) -> tuple[Tensor, ...]:
        """The host branch's gradient: its weighted task losses (and extra losses) on this batch."""
        self._check_trainable()
        loss = self.scaled(self._branch_loss(self._host, terms, self._model))
        grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))

    def after_lower(self, terms: LossTerms, context: Any) -> None:
        """Train every other branch one step on the batch the host just trained on (`terms`' inputs).

        `context` is the Trainer's `auxnb.train.LowerContext`: the optimiser factory, the current
        learning rates, gradient clipping, autocast and whether auxiliary streams leave BatchNorm
        statistics alone — all applied to each branch as to the host."""
        optimizers = self._branch_optimizers(context)
        lrs = [g["lr"] for g in context.optimizer.param_groups]
        for b, opt in enumerate(optimizers):
            if opt is None:
                continue
            model = _BranchModel(self._model, self._tensors[b], self._trainable)
            streams = {self.tasks[n].stream for n in self._needed[b]}
            batch = {s: (terms.inputs[s], terms.targets[s]) for s in terms.inputs if s in streams}
            with context.autocast():
                own = compute_terms(model, batch, self.tasks, names=self._needed[b],
                                    freeze_aux_buffers=context.freeze_aux_buffers)
            for name, loss in own.losses.items():
                if not torch.isfinite(loss).all():
                    raise FloatingPointError(
                        f"Non-finite loss for task {name!r} in ForkMerge branch {self._labels[b]!r} at lower step "
                        f"{context.step}; lower the learning rate or enable gradient clipping (grad_clip=...).")
            params = [self._tensors[b][n] for n in self._trainable]
            grads = torch.autograd.grad(self._branch_loss(b, own, model), params, allow_unused=True)
            grads = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))
            if context.grad_clip is not None:  # as the Trainer clips the host's direction
                norm = torch.sqrt(sum((g.detach().float() ** 2).sum() for g in grads))
                factor = min(1.0, context.grad_clip / (float(norm) + 1e-12))
                grads = tuple(g * factor for g in grads)
            for p, g in zip(params, grads):
                p.grad = g.detach()
            if len(opt.param_groups) == len(lrs):  # the Trainer's schedule, group by group
                for group, lr in zip(opt.param_groups, lrs):
                    group["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)

    def _branch_optimizers(self, context: Any) -> list[torch.optim.Optimizer | None]:
        if self._optimizers is None:
            self._optimizers = [
                None if b == self._host else context.make_optimizer([self._tensors[b][n] for n in self._trainable])
                for b in range(len(self.branches))
            ]
            if self._pending_optimizers is not None:
                for opt, state in zip(self._optimizers, self._pending_optimizers):
                    if opt is not None:
                        opt.load_state_dict(state)
                self._pending_optimizers = None
        return self._optimizers

    # ------------------------------------------------------------------ the merge
    def upper_step(self, model: nn.Module, context: Any) -> dict[str, float]:
        """Merge: score the candidates on the same D_dev batches, write the chosen mixture into the
        model and every branch. Returns ``dev_<criterion>`` and ``weight/<branch>``."""
        batches = [context.dev_batch() for _ in range(self.dev_batches)]
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                weights, score, scores = self.choose(lambda lam: self._score(model, lam, batches))
                self._merge(weights)
        finally:
            model.train(was_training)
        self._merges += 1
        info = {f"dev_{self.criterion}": float(score), **{f"weight/{label}": float(w) for label, w in zip(self._labels, weights)}}
        self._last_merge = {"step": int(context.step), **info, "candidates": len(scores)}
        return info

    def choose(self, score: Callable[[list[float]], float]) -> tuple[list[float], float, dict[tuple[float, ...], float]]:
        """The merge weights Λ (summing to 1) that `search` picks with `score` (lower is better), the
        score of Λ, and every candidate scored (weights -> score)."""
        B = len(self.branches)
        seen: dict[tuple[float, ...], float] = {}

        def scored(lam: list[float]) -> float:
            key = tuple(lam)
            if key not in seen:
                s = float(score(lam))
                seen[key] = s if math.isfinite(s) else math.inf
            return seen[key]

        if B == 1:
            return [1.0], scored([1.0]), seen
        if self.search == "grid":
            best, best_s = None, math.inf
            for rest in itertools.product(self.alphas, repeat=B - 1):
                if sum(rest) > 1.0 + 1e-9:
                    continue
                lam = _normalised([max(0.0, 1.0 - sum(rest)), *rest])
                s = scored(lam)
                if best is None or s < best_s:
                    best, best_s = lam, s
            return best, best_s, seen
        # greedy, as the authors' code: rank the branches alone, then add each in turn
        alone = [scored([1.0 if i == b else 0.0 for i in range(B)]) for b in range(B)]
        order = sorted(range(B), key=lambda b: (alone[b], b))
        lam = [0.0] * B
        lam[order[0]] = 1.0
        best_s = alone[order[0]]
        for rank, b in enumerate(order[1:], start=1):
            bound = sum(lam) / rank
            chosen = 0.0
            for a in self.alphas:
                if a * bound == 0.0:
                    continue  # the current mixture, already scored
                trial = list(lam)
                trial[b] = a * bound
                s = scored(_normalised(trial))
                if s < best_s:
                    best_s, chosen = s, a * bound
            lam[b] = chosen
        return _normalised(lam), best_s, seen

    def _mixture(self, lam: Sequence[float]) -> dict[str, Tensor]:
        """Σ_b Λ_b θ_b for floating tensors, the largest-weight branch's for integer ones."""
        lead = max(range(len(lam)), key=lambda b: (lam[b], -b))
        mixed: dict[str, Tensor] = {}
        for name, ref in self._tensors[self._host].items():
            if name not in self._trainable and isinstance(ref, nn.Parameter):
                mixed[name] = ref  # frozen, shared by every branch
            elif not torch.is_floating_point(ref):
                mixed[name] = self._tensors[lead][name]
            else:
                used = [b for b in range(len(lam)) if lam[b] != 0.0]
                if used == [lead] and lam[lead] == 1.0:
                    mixed[name] = self._tensors[lead][name].detach()
                    continue
                acc = self._tensors[used[0]][name].detach() * lam[used[0]]
                for b in used[1:]:
                    acc = acc.add(self._tensors[b][name].detach(), alpha=lam[b])
                mixed[name] = acc
        return mixed

    def _score(self, model: nn.Module, lam: Sequence[float], batches: list) -> float:
        state = self._mixture(lam)
        primary = self.tasks.primary
        outs, tgts = [], []
        for batch in batches:
            x, t = batch[PRIMARY_STREAM]
            _, out = torch.func.functional_call(model, state, (x, [primary.name]))
            o = out[primary.name]
            outs.append(o.float() if o.dtype in (torch.float16, torch.bfloat16) else o)  # float64 stays float64
            tgts.append(t[primary.name])
        output, target = torch.cat(outs), torch.cat(tgts)
        if self.criterion == "metric":
            value = metric(primary, output.cpu(), target.cpu())
            return -value if primary.higher_is_better else value
        mask = primary.labelled(target)
        losses = primary.loss(output, target)
        return float(losses[mask].sum() / mask.sum()) if bool(mask.any()) else math.nan

    def _merge(self, lam: Sequence[float]) -> None:
        mixed = {k: v.detach().clone() for k, v in self._mixture(lam).items()}
        for tensors in self._tensors:
            for name, value in mixed.items():
                if tensors[name] is not value and not (name not in self._trainable and isinstance(tensors[name], nn.Parameter)):
                    tensors[name].detach().copy_(value)

    # ------------------------------------------------------------------ state
    def trace(self) -> dict[str, Any]:
        out: dict[str, Any] = {"merges": getattr(self, "_merges", 0)}
        last = getattr(self, "_last_merge", {})
        out.update({f"merge/{k}": v for k, v in last.items() if k not in ("step",)})
        return out

    def state_dict(self) -> dict[str, Any]:
        """Every branch's tensors (the host's are the model's, checkpointed by the Trainer), every
        branch's optimiser state, and the merge state."""
        optimizers = (self._pending_optimizers if self._optimizers is None
                      else [None if o is None else o.state_dict() for o in self._optimizers])
        return {
            "branches": [None if b == self._host else {k: v.detach().clone() for k, v in t.items()}
                         for b, t in enumerate(self._tensors)],
            "optimizers": optimizers,
            "merges": self._merges,
            "last_merge": dict(self._last_merge),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = list(state["branches"])
        if len(saved) != len(self._tensors) or [s is None for s in saved] != [b == self._host for b in range(len(saved))]:
            raise ValueError(f"Saved ForkMerge state has {len(saved)} branches laid out differently from this method's "
                             f"{self.branches!r}; resume with the same method configuration and tasks.")
        with torch.no_grad():
            for tensors, values in zip(self._tensors, saved):
                if values is None:
                    continue
                if set(values) != set(tensors):
                    raise ValueError("Saved ForkMerge branch tensors do not match this model's parameters and buffers; "
                                     "resume with the same model and tasks.")
                for name, value in values.items():
                    if tensors[name] is not value:
                        tensors[name].detach().copy_(value)
        optimizers = state.get("optimizers")
        if self._optimizers is None:
            self._pending_optimizers = None if optimizers is None else list(optimizers)
        elif optimizers is not None:
            for opt, s in zip(self._optimizers, optimizers):
                if opt is not None:
                    opt.load_state_dict(s)
        self._merges = int(state["merges"])
        self._last_merge = dict(state.get("last_merge", {}))


def _normalised(lam: Sequence[float]) -> list[float]:
    total = sum(lam)
    return [w / total for w in lam]


def _check_branches(branches: Any) -> list:
    if isinstance(branches, (str, bytes, Mapping)) or not isinstance(branches, Sequence) or len(branches) == 0:
        raise ValueError(f"branches must be a non-empty list of 'primary', 'all' or {{task: weight}} dicts, got {branches!r}.")
    out: list = []
    for spec in branches:
        if isinstance(spec, str):
            if spec not in _NAMED:
                raise ValueError(f"Unknown branch {spec!r}; use 'primary', 'all' or a dict {{task: weight}}.")
            out.append(spec)
        elif isinstance(spec, Mapping):
            clean = {}
            for k, v in spec.items():
                if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ValueError(f"A branch dict maps task names to finite weights >= 0; got {k!r}: {v!r} in {dict(spec)!r}.")
                clean[k] = float(v)
            if not any(v > 0 for v in clean.values()):
                raise ValueError(f"A branch needs at least one task with a weight > 0, got {dict(spec)!r}.")
            out.append(clean)
        else:
            raise ValueError(f"A branch is 'primary', 'all' or a dict {{task: weight}}, got {spec!r}.")
    return out


def _resolve(spec: str | Mapping[str, float], tasks: TaskSet) -> dict[str, float]:
    if spec == "primary":
        return {tasks.primary.name: 1.0}
    if spec == "all":
        return {n: 1.0 for n in tasks.names}
    unknown = sorted(set(spec) - set(tasks.names))
    if unknown:
        raise ValueError(f"ForkMerge branch {dict(spec)!r} names tasks {unknown} that this run does not have; "
                         f"its tasks are {list(tasks.names)}.")
    return dict(spec)
