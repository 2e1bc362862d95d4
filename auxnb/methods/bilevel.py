"""The bi-level base: the upper step (dev loss -> implicit gradient -> φ optimiser), written once.

A bi-level method only says how its hyper-parameters φ enter the lower direction g(θ, φ),
plus any explicit upper regulariser and projection. The upper step never changes θ or any
model buffer (BatchNorm statistics), and the lower step never builds a second-order graph.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..hypergrad import check_step, clip_grad_norm_, frozen_buffers, implicit_grad
from .base import LossTerms, Method, SetupInfo

__all__ = ["BilevelMethod", "make_upper_optimizer"]


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
    raise ValueError(f"Unknown upper_optimizer {spec!r}; use 'adam', 'sgd' or a callable.")


class BilevelMethod(Method):
    """Base of every bi-level method (AuxL, MAOAL, JTDS, N-JTDS, DTG, Auto-Mix).

    Subclasses create their hyper-parameters in `setup` (calling ``super().setup``), return
    them from `hparams`, and implement `direction(terms, params, create_graph)` so that φ
    enters g(θ, φ) with a graph when ``create_graph=True``. Optional: `regulariser` (an
    explicit upper term, e.g. DTG Eq. 14) and `project` (e.g. clamp to ≥ 0).

    Args:
        lower_steps: T, lower steps between two upper steps.
        terms: Neumann terms K (the series sums i = 0..K).
        hyper_lr: η, the step of the series ``Σ (I - ηJ)^i``; ``"lower"`` uses the lower
            optimiser's current learning rate (MAOAL A3). Convergence needs η·λ_max(J) < 2.
        hypergrad: ``"neumann"``, ``"exact"`` or ``"cg"`` (see `auxnb.hypergrad.implicit_grad`).
        upper_optimizer, upper_lr, upper_momentum: φ's optimiser.
        clip: clip the hypergradient's norm to this (None: off).
        check_every: every this many upper steps, estimate λ_max(J) by power iteration and
            warn when η·λ_max ≥ 2 (0: never).
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
    ):
        if int(lower_steps) < 1:
            raise ValueError(f"lower_steps must be >= 1, got {lower_steps}.")
        if int(terms) < 0:
            raise ValueError(f"terms must be >= 0, got {terms}.")
        if not (hyper_lr == "lower" or (isinstance(hyper_lr, (int, float)) and hyper_lr > 0)):
            raise ValueError(f"hyper_lr must be a positive number or 'lower', got {hyper_lr!r}.")
        self.lower_steps = int(lower_steps)
        self.terms = int(terms)
        self.hyper_lr = hyper_lr
        self.hypergrad = hypergrad
        self.upper_optimizer = upper_optimizer
        self.upper_lr = float(upper_lr)
        self.upper_momentum = float(upper_momentum)
        self.clip = clip
        self.check_every = int(check_every)

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
        self.last_upper: dict[str, float] = {}

    def _make_optimizer(self) -> torch.optim.Optimizer:
        return make_upper_optimizer(self.upper_optimizer, self.hparams(), self.upper_lr, self.upper_momentum)

    @property
    def upper_opt(self) -> torch.optim.Optimizer:
        if getattr(self, "_upper_opt", None) is None:
            self._upper_opt = self._make_optimizer()
        return self._upper_opt

    def upper_step(self, model: nn.Module, context: Any) -> dict[str, float]:
        """One upper step: hypergradient of the primary dev loss w.r.t. φ, clipped, one φ step."""
        hparams = self.hparams()
        tasks = context.tasks
        params = tuple(context.params)
        eta = context.lr if self.hyper_lr == "lower" else float(self.hyper_lr)
        with frozen_buffers(model):
            train_terms = context.terms(context.train_batch(), names=self.task_names(tasks))
            inner = self.direction(train_terms, params, create_graph=True)
            dev_terms = context.terms(context.dev_batch(), names=[tasks.primary.name])
            outer = dev_terms.mean(tasks.primary.name)
            info: dict[str, float] = {"dev_loss": float(outer)}
            if self.check_every and self._upper_steps % self.check_every == 0:
                info["lambda_max"] = check_step(inner, params, eta)
            reg = self.regulariser(train_terms)
            reg_grads = None
            if reg is not None:
                reg_grads = torch.autograd.grad(reg, hparams, retain_graph=True, allow_unused=True)
                info["regulariser"] = float(reg)
            grads = implicit_grad(outer, inner, params, hparams, method=self.hypergrad, terms=self.terms, lr=eta)
        if reg_grads is not None:
            grads = tuple(g if r is None else g + r for g, r in zip(grads, reg_grads))
        if self.clip is not None:
            grads, norm = clip_grad_norm_(grads, self.clip)
        else:
            norm = float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads)))
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

    def state_dict(self) -> dict[str, Any]:
        return {
            "hparams": [h.detach().clone() for h in self.hparams()],
            "upper_opt": self.upper_opt.state_dict(),
            "upper_steps": self._upper_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            for h, saved in zip(self.hparams(), state["hparams"]):
                h.copy_(saved)
        self.upper_opt.load_state_dict(state["upper_opt"])
        self._upper_steps = int(state["upper_steps"])
