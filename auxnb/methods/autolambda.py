"""Auto-Lambda (Liu, James, Davison, Johns, TMLR 2022): task weights by a one-step look-ahead on the primary loss.

The upper step never builds a second-order graph: the mixed second derivative is a central finite
difference of the training losses at θ ± ε·v, as in the paper (§3.2, the DARTS approximation).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..hypergrad import clip_grad_norm_, frozen_buffers
from .base import LossTerms, SetupInfo
from .bilevel import BilevelMethod, upper_context
from .upper import UpperLevel

__all__ = ["AutoLambda", "AUTO_LAMBDA_AUTHORS", "finite_difference_hypergrad"]

#: lorenmt/auto-lambda@bdba636 (read to compare, never copied): auto_lambda.py:7 (λ init 0.1 for every
#: task, the primary included), trainer_cifar.py:17-18,44 (Adam on λ, lr 3e-4; one meta step before
#: every training step, 148-150), trainer_dense.py:20-21 (NYUv2 1e-4; README: CityScapes 3e-5),
#: trainer_cifar.py:83-85 (the "validation" batch is a second shuffled loader over the training set),
#: auto_lambda.py:73-77 (ε = 0.01/‖∇L_val(θ')‖, λ.grad = −α·Hessian term; α the current lower lr).
AUTO_LAMBDA_AUTHORS: dict[str, float] = {"cifar": 3e-4, "nyuv2": 1e-4, "cityscapes": 3e-5}


def finite_difference_hypergrad(
    task_losses, params: Sequence[Tensor], v: Sequence[Tensor], lr: float, *, radius: float = 0.01
) -> Tensor:
    """``−lr · ∂²L/∂λ∂θ · v`` for ``L = Σ_k λ_k L_k(θ)``, by a central difference along `v` (Auto-Lambda §3.2).

    Since ``∂L/∂λ_k = L_k(θ)``, the mixed derivative times v is ``(L_k(θ + εv) − L_k(θ − εv)) / 2ε``
    with ``ε = radius / ‖v‖``. `task_losses()` returns the vector ``[L_k(θ)]_k`` at the parameters'
    current values; `params` are moved in place to θ ± εv and restored exactly (copied back).

    Example:
        >>> w = torch.tensor([1.0, 2.0])
        >>> g = finite_difference_hypergrad(lambda: torch.stack([w @ w, 3 * w.sum()]), [w], [torch.tensor([1.0, 0.0])], 0.5)
        >>> [round(x, 3) for x in g.tolist()]  # −0.5·(∇(w·w)·v, ∇(3Σw)·v) = −0.5·(2, 3)
        [-1.0, -1.5]
    """
    norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in v))
    if norm == 0.0:
        return torch.zeros_like(task_losses()).detach()
    eps = radius / norm
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(d, alpha=eps)
            plus = task_losses().detach()
            for p, s, d in zip(params, saved, v):
                p.copy_(s).add_(d, alpha=-eps)
            minus = task_losses().detach()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    return -lr * (plus - minus) / (2 * eps)


class AutoLambda(BilevelMethod):
    """Auto-Lambda (Liu et al., "Auto-Lambda: Disentangling Dynamic Task Relationships", TMLR 2022).

    One weight λ_k per task, the primary included, in the lower objective ``Σ_k λ_k L_k`` (λ enters
    as it is: neither clamped nor normalised, as in the paper and the authors' code). In its
    auxiliary-learning mode the upper objective is the primary task's loss after one virtual SGD
    step, ``L_pri(θ' ; D_dev)`` with ``θ' = θ − α ∇_θ Σ_k λ_k L_k(θ; train)`` (paper Eq. 2); its
    gradient ``−α ∇²_{λ,θ} L_train · ∇_θ' L_pri(θ')`` takes the mixed second derivative as a central
    finite difference along ``v = ∇_θ' L_pri(θ')`` with ε = 0.01/‖v‖ (§3.2;
    `finite_difference_hypergrad`). α is ``hyper_lr`` (``"lower"``: the lower optimiser's current
    learning rate, as the authors' code does). D_dev plays the validation role, as for the other
    bi-level methods here; ``upper_data="train"`` measures it on fresh training batches, as the
    authors' code does (their "validation" loader is a second shuffle of the training set). Where
    labels are few that matters: on ``f-rotation-10%`` (200 labelled images, 50 of them D_dev) the
    switch gained 3.0 points over the default on seeds 0–9 but lost 4.0 on fresh seeds 10–14, and gained
    0.8–2.1 on the digits cases with few labels (ten seeds; book chapter 16): the default is unchanged.

    Cost per upper step (every ``lower_steps`` lower steps; the authors' code: every step): one
    training forward and backward (g at θ), one dev forward and backward at θ', two training
    forwards at θ ± εv; no second-order graph. ``terms``, ``hypergrad`` and ``check_every`` of
    `UpperLevel` are unused (no Neumann series); ``phi_batches`` other than 1 and ``warm_start`` other than 0
    are errors.

    Presets: ``AutoLambda(upper=UpperLevel.authors("auto-lambda", "cifar"))`` (also ``"nyuv2"``,
    ``"cityscapes"``); the default is the same φ optimiser measured on D_dev.

    Args:
        init: λ's initial value for every task (the authors' default 0.1).
    """

    name = "auto-lambda"
    default_upper = UpperLevel(lower_steps=1, terms=0, hyper_lr="lower", leading_eta=True, upper_optimizer="adam",
                               upper_lr=3e-4, clip=None, upper_data="dev")

    def __init__(self, init: float = 0.1, *, upper: UpperLevel | Mapping[str, Any] | None = None, **upper_keywords: Any):
        if isinstance(init, bool) or not isinstance(init, (int, float)) or not math.isfinite(init):
            raise ValueError(f"init must be a finite number (λ's initial value for every task), got {init!r}.")
        super().__init__(upper=upper, **upper_keywords)
        if self.upper.warm_start:
            raise ValueError(f"AutoLambda has no Neumann series to warm-start (its hypergradient is a finite difference); "
                             f"warm_start must be 0, got {self.upper.warm_start}.")
        if self.upper.phi_batches != 1:
            raise ValueError(f"AutoLambda's finite-difference hypergradient reads one training batch (no uᵀ∂g/∂φ product to "
                             f"average); phi_batches must be 1, got {self.upper.phi_batches}.")
        self.init = float(init)

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        self._names = list(info.tasks.names)
        self.task_weights = nn.Parameter(torch.full((len(self._names),), self.init, device=info.device))

    def hparams(self) -> list[nn.Parameter]:
        return [self.task_weights]

    def _weight_of(self, create_graph: bool) -> dict[str, Tensor]:
        lam = self.task_weights if create_graph else self.task_weights.detach()
        return {n: lam[i] for i, n in enumerate(self._names)}

    def weights(self, terms: LossTerms) -> dict[str, Tensor | float]:
        lam = self._weight_of(False)
        return {n: lam[n] for n in terms.losses}

    def direction(self, terms: LossTerms, params: Sequence[Tensor], *, create_graph: bool = False) -> tuple[Tensor, ...]:
        lam = self._weight_of(create_graph)
        loss = sum(lam[n] * terms.mean(n) for n in terms.losses)
        loss = self.scaled(loss)
        grads = torch.autograd.grad(loss, list(params), create_graph=create_graph, allow_unused=True)
        return tuple(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))

    def upper_step(self, model: nn.Module, context: Any) -> dict[str, float]:
        """One Auto-Lambda meta step: the finite-difference look-ahead hypergradient, one step of λ's optimiser."""
        tasks = context.tasks
        params = tuple(context.params)
        context = upper_context(context, self.upper_data)
        eta = context.lr if self.hyper_lr == "lower" else float(self.hyper_lr)
        info: dict[str, float] = {"hyper_lr": float(eta)}
        names = self.task_names(tasks)
        with frozen_buffers(model):
            batch = context.train_batch()
            train_terms = context.terms(batch, names=names)
            g = self.direction(train_terms, params)  # λ detached: first order, no graph kept
            saved = [p.detach().clone() for p in params]
            try:
                with torch.no_grad():  # the virtual step θ' = θ − α g (paper Eq. 2)
                    for p, d in zip(params, g):
                        p.sub_(d, alpha=eta)
                dev = context.dev_batch()
                outer = context.terms(dev, names=[tasks.primary.name]).mean(tasks.primary.name)
                v = torch.autograd.grad(outer, list(params), allow_unused=True)
                v = [torch.zeros_like(p) if d is None else d.detach() for p, d in zip(params, v)]
            finally:
                with torch.no_grad():
                    for p, s in zip(params, saved):
                        p.copy_(s)
            info["dev_loss"] = float(outer.detach())

            def task_losses() -> Tensor:
                t = context.terms(batch, names=names)
                return torch.stack([t.mean(n) if n in t.losses else t.mean(tasks.primary.name) * 0 for n in self._names])

            grad = finite_difference_hypergrad(task_losses, params, v, eta) if eta > 0 else torch.zeros_like(self.task_weights)
        if not self.upper.leading_eta and eta > 0:
            grad = grad / eta
        grads = (grad.to(self.task_weights.dtype),)
        if self.clip is not None:
            grads, norm = clip_grad_norm_(grads, self.clip)
        else:
            norm = float(grad.norm())
        info["hypergrad_norm"] = float(norm)
        if not math.isfinite(info["hypergrad_norm"]):
            raise FloatingPointError(f"Non-finite Auto-Lambda hypergradient at lower step {context.step}; lower the "
                                     "lower learning rate or the look-ahead step hyper_lr.")
        opt = self.upper_opt
        opt.zero_grad(set_to_none=True)
        self.task_weights.grad = grads[0].detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._upper_steps += 1
        self.last_upper = info
        return info

    def trace(self) -> dict[str, Any]:
        out = super().trace()
        if hasattr(self, "task_weights"):
            out.update({f"weight/{n}": float(w) for n, w in zip(self._names, self.task_weights.detach())})
        return out


def _authors(experiment: str | None) -> UpperLevel:
    experiment = experiment or "cifar"
    if experiment not in AUTO_LAMBDA_AUTHORS:
        raise ValueError(f"Unknown Auto-Lambda experiment {experiment!r}; the authors' are {', '.join(AUTO_LAMBDA_AUTHORS)}.")
    return AutoLambda.default_upper.replace(upper_lr=AUTO_LAMBDA_AUTHORS[experiment], upper_data="train")


def _paper_text(experiment: str | None) -> UpperLevel:
    # the paper: a look-ahead on the validation loss, every step; its φ optimiser is the code's
    return _authors(experiment).replace(upper_data="dev")


UpperLevel._PRESETS["auto-lambda"] = {"paper_text": _paper_text, "authors": _authors}
