"""The bi-level base: the upper step (dev loss -> implicit gradient -> φ optimiser), written once.

A bi-level method only says how its hyper-parameters φ enter the lower direction g(θ, φ),
plus any explicit upper regulariser and projection. The upper step never changes θ or any
model buffer (BatchNorm statistics), and the lower step never builds a second-order graph.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..hypergrad import METHODS as HYPERGRAD_METHODS
from ..hypergrad import check_step, clip_grad_norm_, frozen_buffers, implicit_grad, largest_eigenvalue
from ..tasks import PRIMARY_STREAM
from .base import LossTerms, Method, SetupInfo

__all__ = ["BilevelMethod", "make_upper_optimizer", "upper_context", "UPPER_OPTIMIZERS", "UPPER_DATA"]

#: φ optimisers known by name (a callable ``params -> Optimizer`` is accepted too).
UPPER_OPTIMIZERS = ("adam", "sgd")
#: What the upper objective is measured on: the held-out D_dev, or fresh primary training batches.
UPPER_DATA = ("dev", "train")


def upper_context(context: Any, upper_data: str) -> Any:
    """The `UpperContext` whose dev batch is a fresh primary training batch when ``upper_data="train"``.

    The batch comes from the Trainer's second shuffled training stream (the one that also feeds
    the upper step's train batch), so it is a different batch from the one g(θ, φ) is built on.
    """
    if upper_data == "dev":
        return context
    if upper_data != "train":
        raise ValueError(f"upper_data must be one of {UPPER_DATA}, got {upper_data!r}.")
    return dataclasses.replace(context, dev_batch=lambda: {PRIMARY_STREAM: context.train_batch()[PRIMARY_STREAM]})


def make_upper_optimizer(
    spec: str | Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer], params: Sequence[nn.Parameter], lr: float, momentum: float
) -> torch.optim.Optimizer:
    """The φ optimiser: ``"adam"``, ``"sgd"`` (with `momentum`) or a callable ``params -> Optimizer``."""
    if callable(spec):
        return spec(params)
    if spec == "adam":
        return torch.optim.Adam(params, lr=lr)
    if spec == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"Unknown upper_optimizer {spec!r}; use 'adam', 'sgd' or a callable params -> Optimizer.")


class BilevelMethod(Method):
    """Base of every bi-level method (AuxL, MAOAL, JTDS, N-JTDS, DTG, Auto-Mix).

    Subclasses create their hyper-parameters in `setup` (calling ``super().setup`` first), return
    them from `hparams`, and implement `direction(terms, params, create_graph)` so that φ
    enters g(θ, φ) with a graph when ``create_graph=True`` (the lower step calls it with
    ``create_graph=False``: first-order, φ detached). Optional: `regulariser` (an explicit
    upper term, e.g. DTG Eq. 14–15) and `project` (e.g. clamp to ≥ 0).

    One upper step (`upper_step`, called by the Trainer every `lower_steps` lower steps):
    a fresh train batch and a dev batch from their own persistent shuffled streams, forwarded
    with every model buffer frozen; g(θ, φ) with a graph; the primary dev loss; its total
    derivative in φ at the fixed point of ``θ <- θ − η·g`` by `auxnb.hypergrad.implicit_grad`
    (JTDS Eq. 7–9, MAOAL supplement Eq. A3–A4); plus the regulariser's gradient; clipped to
    norm `clip`; one step of φ's optimiser; then `project`. θ, its ``.grad`` and the model's
    buffers are left exactly as they were.

    Args:
        lower_steps: T (MAOAL) / M (JTDS Algorithm 1), lower steps between two upper steps.
        terms: Neumann terms K (the series sums i = 0..K; K VJPs). JTDS/DTG: K = 3 (the paper
            searches {3, 5}); MAOAL's look-back over M steps is ``terms = M - 1``.
        hyper_lr: η, the step of the series ``η·Σ (I − ηJ)^i``; ``"lower"`` uses the lower
            optimiser's current learning rate (MAOAL supplement Eq. A3, η₁). JTDS Eq. 8–9 is
            η = 1. The series converges only when η·λ_max(J) < 2 (see `check_every`).
        hypergrad: ``"neumann"``, ``"exact"``, ``"cg"`` or a solver ``(matvec, b) -> x`` (see
            `auxnb.hypergrad.implicit_grad`).
        upper_optimizer, upper_lr, upper_momentum: φ's optimiser (``"adam"``, ``"sgd"`` or a
            callable ``params -> Optimizer``); momentum applies to SGD only.
        clip: clip the hypergradient's norm to this (None: off). Default 10.
        check_every: every this many upper steps, estimate λ_max(J) by power iteration, record
            it as ``lambda_max`` and warn (`HypergradWarning`) when η·λ_max ≥ 2 (0: never).

    Switches beyond the papers (issue 8; each off by default here, measured one by one in
    ``benchmarks/low_data.py`` and the chapter ``notebooks/06_when_auxiliary_learning_helps.ipynb``):

    Args:
        hyper_lr: also ``"auto"``: η = `auto_target` / λ_max(J), with λ_max estimated by power
            iteration on the upper step's own g(θ, φ) at the first upper step and again every
            `auto_every` upper steps, so that the series is convergent (η·λ_max < 2) and as long
            as it can be along the flat directions. The value used is traced as ``hyper_lr``.
        auto_every, auto_target: see ``hyper_lr="auto"`` (defaults 10 and 1.0).
        upper_data: ``"dev"`` (the papers: the primary loss on D_dev) or ``"train"`` (the primary
            loss on a fresh training batch from the Trainer's second stream; D_dev is then not
            carved out at all, so no label is withheld from θ).
        dev_batches: average the upper objective over this many dev batches per upper step
            (a larger, less noisy dev estimate at the same cadence). Default 1.
        refit: ``None`` (the papers) or a fraction f in (0, 1): after f of the lower steps the
            Trainer stops the upper steps (φ frozen at its learned value) and adds D_dev to
            D_train, so the dev labels train θ too for the rest of the run. Model selection is
            still on D_val only; D_val and D_test are never read by a training step.

    After each upper step `last_upper` holds its diagnostics: ``dev_loss``,
    ``hypergrad_norm`` (before clipping), and ``regulariser`` / ``lambda_max`` when computed.
    """

    name = "bilevel"
    uses_dev = True

    def __init__(
        self,
        *,
        lower_steps: int = 20,
        terms: int = 3,
        hyper_lr: float | str = 1.0,
        hypergrad: str = "neumann",
        upper_optimizer: str | Callable = "adam",
        upper_lr: float = 1e-2,
        upper_momentum: float = 0.9,
        clip: float | None = 10.0,
        check_every: int = 0,
        auto_every: int = 10,
        auto_target: float = 1.0,
        upper_data: str = "dev",
        dev_batches: int = 1,
        refit: float | None = None,
    ):
        if int(lower_steps) < 1:
            raise ValueError(f"lower_steps must be >= 1, got {lower_steps}.")
        if int(terms) < 0:
            raise ValueError(f"terms must be >= 0, got {terms}.")
        if not (hyper_lr in ("lower", "auto") or (isinstance(hyper_lr, (int, float)) and not isinstance(hyper_lr, bool) and hyper_lr > 0)):
            raise ValueError(f"hyper_lr must be a positive number, 'lower' or 'auto', got {hyper_lr!r}.")
        if isinstance(auto_every, bool) or not isinstance(auto_every, int) or auto_every < 1:
            raise ValueError(f"auto_every must be an int >= 1 (upper steps between λ_max estimates), got {auto_every!r}.")
        if not (isinstance(auto_target, (int, float)) and 0 < auto_target < 2):
            raise ValueError(f"auto_target must lie in (0, 2) so that η·λ_max < 2, got {auto_target!r}.")
        if upper_data not in UPPER_DATA:
            raise ValueError(f"upper_data must be one of {UPPER_DATA}, got {upper_data!r}.")
        if isinstance(dev_batches, bool) or not isinstance(dev_batches, int) or dev_batches < 1:
            raise ValueError(f"dev_batches must be an int >= 1, got {dev_batches!r}.")
        if refit is not None:
            if isinstance(refit, bool) or not isinstance(refit, (int, float)) or not 0 < refit < 1:
                raise ValueError(f"refit must be None or a fraction of the run in (0, 1), e.g. 0.67; got {refit!r}.")
            if upper_data != "dev":
                raise ValueError("refit needs upper_data='dev': with upper_data='train' no D_dev is held out to refit on.")
        if not (callable(hypergrad) or hypergrad in HYPERGRAD_METHODS):
            raise ValueError(
                f"Unknown hypergrad {hypergrad!r}; use one of {', '.join(map(repr, HYPERGRAD_METHODS))} "
                "or a solver (matvec, b) -> x."
            )
        if not (callable(upper_optimizer) or upper_optimizer in UPPER_OPTIMIZERS):
            raise ValueError(f"Unknown upper_optimizer {upper_optimizer!r}; use 'adam', 'sgd' or a callable params -> Optimizer.")
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None (no clipping), got {clip!r}.")
        if int(check_every) < 0:
            raise ValueError(f"check_every must be >= 0 (0: never), got {check_every}.")
        self.lower_steps = int(lower_steps)
        self.terms = int(terms)
        self.hyper_lr = hyper_lr
        self.hypergrad = hypergrad
        self.upper_optimizer = upper_optimizer
        self.upper_lr = float(upper_lr)
        self.upper_momentum = float(upper_momentum)
        self.clip = clip
        self.check_every = int(check_every)
        self.auto_every = int(auto_every)
        self.auto_target = float(auto_target)
        self.upper_data = upper_data
        self.dev_batches = int(dev_batches)
        self.refit = None if refit is None else float(refit)
        self.uses_dev = upper_data == "dev"

    # -- what subclasses provide -------------------------------------------------
    def hparams(self) -> list[nn.Parameter]:
        """φ: the tensors the upper step optimises."""
        raise NotImplementedError

    def regulariser(self, terms: LossTerms) -> Tensor | None:
        """An explicit upper-level term added to the dev loss's gradient (None: none)."""
        return None

    def project(self) -> None:
        """Map φ back to its feasible set after each upper step."""

    # -- the shared machinery ----------------------------------------------------
    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        self._upper_steps = 0
        self._auto_eta: float | None = None
        self._seed = int(info.seed)
        self.last_upper: dict[str, float] = {}
        # a new setup makes new φ tensors: the φ optimiser is rebuilt lazily on them (an old
        # one would keep stepping the previous run's tensors and carry its moments over)
        self._upper_opt: torch.optim.Optimizer | None = None

    def _make_optimizer(self) -> torch.optim.Optimizer:
        return make_upper_optimizer(self.upper_optimizer, self.hparams(), self.upper_lr, self.upper_momentum)

    @property
    def upper_opt(self) -> torch.optim.Optimizer:
        """φ's optimiser, built on first use over the current `hparams`."""
        if getattr(self, "_upper_opt", None) is None:
            self._upper_opt = self._make_optimizer()
        return self._upper_opt

    def upper_step(self, model: nn.Module, context: Any) -> dict[str, float]:
        """One upper step: hypergradient of the primary dev loss w.r.t. φ, clipped, one φ step.

        `context` is a `auxnb.train.UpperContext`. Returns (and keeps in `last_upper`) the
        step's diagnostics. Raises ``FloatingPointError`` instead of stepping φ when the
        hypergradient is not finite (typically a diverging Neumann series: η·λ_max ≥ 2).
        """
        hparams = self.hparams()
        tasks = context.tasks
        params = tuple(context.params)
        context = upper_context(context, self.upper_data)
        info: dict[str, float] = {}
        with frozen_buffers(model):
            train_terms = context.terms(context.train_batch(), names=self.task_names(tasks))
            inner = self.direction(train_terms, params, create_graph=True)
            if self.hyper_lr == "auto":
                if self._auto_eta is None or self._upper_steps % self.auto_every == 0:
                    gen = torch.Generator().manual_seed(self._seed + 104_729 * self._upper_steps)
                    lam = abs(largest_eigenvalue(inner, params, generator=gen))
                    info["lambda_max"] = lam
                    # a flat J (λ≈0) leaves the previous η, or the lower learning rate at first
                    if lam > 0 and math.isfinite(lam):
                        self._auto_eta = self.auto_target / lam
                    elif self._auto_eta is None:
                        self._auto_eta = float(context.lr)
                eta = float(self._auto_eta)
            else:
                eta = context.lr if self.hyper_lr == "lower" else float(self.hyper_lr)
            info["hyper_lr"] = eta
            outer = sum(
                context.terms(context.dev_batch(), names=[tasks.primary.name]).mean(tasks.primary.name)
                for _ in range(self.dev_batches)
            ) / self.dev_batches
            info["dev_loss"] = float(outer.detach())
            if self.check_every and self._upper_steps % self.check_every == 0:
                info["lambda_max"] = check_step(inner, params, eta)
            reg = self.regulariser(train_terms)
            reg_grads = None
            if reg is not None:
                reg_grads = torch.autograd.grad(reg, hparams, retain_graph=True, allow_unused=True)
                info["regulariser"] = float(reg.detach())
            grads = implicit_grad(outer, inner, params, hparams, method=self.hypergrad, terms=self.terms, lr=eta)
        if reg_grads is not None:
            grads = tuple(g if r is None else g + r for g, r in zip(grads, reg_grads))
        if self.clip is not None:
            grads, norm = clip_grad_norm_(grads, self.clip)
        else:
            # at least float32 (half-precision φ), never below φ's own precision
            norm = float(torch.sqrt(sum((g.float() if g.dtype in (torch.float16, torch.bfloat16) else g).pow(2).sum() for g in grads)))
        info["hypergrad_norm"] = float(norm)
        if not math.isfinite(info["hypergrad_norm"]):
            raise FloatingPointError(
                f"Non-finite hypergradient at upper step {self._upper_steps} (lower step {context.step}); "
                f"lower hyper_lr (now {eta}) so that hyper_lr·λ_max(J) < 2, or use fewer terms."
            )
        opt = self.upper_opt
        opt.zero_grad(set_to_none=True)
        for h, g in zip(hparams, grads):
            h.grad = g.detach().to(h.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.project()
        self._upper_steps += 1
        self.last_upper = info
        return info

    def trace(self) -> dict[str, Any]:
        """The last upper step's diagnostics as ``upper/<name>`` (subclasses add φ's state)."""
        return {f"upper/{k}": v for k, v in getattr(self, "last_upper", {}).items()}

    def config(self) -> dict[str, Any]:
        # constructor arguments only: the last upper step's diagnostics are state, not config
        return {k: v for k, v in super().config().items() if k != "last_upper"}

    def state_dict(self) -> dict[str, Any]:
        return {
            "hparams": [h.detach().clone() for h in self.hparams()],
            "upper_opt": self.upper_opt.state_dict(),
            "upper_steps": self._upper_steps,
            "auto_eta": self._auto_eta,
            "last_upper": dict(self.last_upper),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        hparams = self.hparams()
        saved = list(state["hparams"])
        shapes = [tuple(h.shape) for h in hparams]
        if [tuple(t.shape) for t in saved] != shapes:
            raise ValueError(
                f"Saved {type(self).__name__} state has hyper-parameters of shapes {[tuple(t.shape) for t in saved]} "
                f"but this method has {shapes}; resume with the same method configuration, tasks and partition."
            )
        with torch.no_grad():
            for h, value in zip(hparams, saved):
                h.copy_(value)
        self.upper_opt.load_state_dict(state["upper_opt"])
        self._upper_steps = int(state["upper_steps"])
        self._auto_eta = state.get("auto_eta")
        self.last_upper = dict(state.get("last_upper", {}))
