"""AuxiNash (Shamsian et al., ICML 2023): asymmetric Nash bargaining over the task gradients, the bargaining
powers learned by the implicit hypergradient. The lower step stays first order; only the upper step builds
graphs (through the per-task gradients), as for every bi-level method here.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import LossTerms, SetupInfo
from .bilevel import BilevelMethod
from .upper import UpperLevel

__all__ = ["AuxiNash", "bargaining_weights"]


def _objective(gram: Tensor, p: Tensor, alpha: Tensor) -> Tensor:
    return 0.5 * alpha @ gram @ alpha - (p * torch.log(alpha)).sum()


def bargaining_weights(gram: Tensor, powers: Tensor, *, iters: int = 100, tol: float = 1e-12) -> Tensor:
    """The α > 0 with ``gram · α = powers / α`` (element-wise): the asymmetric Nash bargaining solution.

    Each task k's utility is ``g_kᵀ d`` for the direction ``d = Σ_j α_j g_j``; the bargaining solution
    with powers p satisfies ``α_k (Gᵀ G α)_k = p_k`` (Nash-MTL, Navon et al. 2022, Eq. 6, with p = 1;
    AuxiNash, Shamsian et al. 2023, with p learned). It is the unique minimiser of the strictly convex
    ``½ αᵀ M α − Σ_k p_k log α_k`` (M = gram), found here by damped Newton steps from the closed form
    for a diagonal M, ``α_k = sqrt(p_k / M_kk)``, in float64. Deterministic, no solver state.

    Args:
        gram: ``[n, n]`` positive semi-definite with a positive diagonal (every task's gradient non-zero).
        powers: ``[n]`` positive bargaining powers.

    Example:
        >>> a = bargaining_weights(torch.tensor([[4.0, 0.0], [0.0, 1.0]]), torch.tensor([1.0, 4.0]))
        >>> [round(x, 6) for x in a.tolist()]  # sqrt(p / diag): orthogonal gradients
        [0.5, 2.0]
    """
    M = gram.detach().double()
    p = powers.detach().double()
    diag = torch.diagonal(M)
    if not bool((diag > 0).all()) or not bool((p > 0).all()):
        raise ValueError("bargaining_weights needs every task's gradient non-zero (positive gram diagonal) "
                         "and positive powers; leave unlabelled tasks out of the gram.")
    alpha = torch.sqrt(p / diag)
    for _ in range(iters):
        grad = M @ alpha - p / alpha
        if float(grad.abs().max()) <= tol * max(1.0, float(p.max())):
            break
        hess = M + torch.diag(p / alpha**2)
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        while bool((alpha - t * step <= 0).any()):
            t *= 0.5
        # the squared Newton decrement: the objective's predicted decrease is half of it. Near the solution it
        # falls below what a float64 objective of order one can resolve, and an Armijo test on the objective
        # then rejects every step by rounding alone (seen: a residual stuck at 9e-10, CPU-dependent); there
        # the full Newton step is taken, as in the pure phase of damped Newton (Boyd & Vandenberghe §9.5).
        decrement = float(grad @ step)
        if t < 1.0 or decrement > 1e-12:
            f0 = _objective(M, p, alpha)
            while t > 1e-12 and _objective(M, p, alpha - t * step) > f0 - 1e-4 * t * decrement:
                t *= 0.5
        alpha = alpha - t * step
    return alpha.to(gram.dtype)


class AuxiNash(BilevelMethod):
    """AuxiNash (Shamsian, Navon, Glazer, Kawaguchi, Chechik, Fetaya, "Auxiliary Learning as an Asymmetric
    Bargaining Game", ICML 2023).

    The lower direction is the asymmetric Nash bargaining solution over the task gradients on the shared
    parameters: with G the stacked per-task gradients (K + 1 backward passes a step), M = GGᵀ/‖GGᵀ‖_F
    and bargaining powers p, the weights α solve ``M α = p / α`` (`bargaining_weights`), the model steps
    along ``Σ_k α_k ∇L_k`` (the heads too, each by its own α_k), and the shared part is clipped to norm
    `max_norm` (Nash-MTL's and the authors' code's 1.0). φ = p, one power per task (the primary
    included), starts at 1 and is kept positive with Σ p = number of tasks (`project`, as the
    authors' ``set_p``). p is learned on D_dev by default, as the authors do; where labels are few,
    ``upper_data="train"`` (fresh training batches, so D_dev's labels train θ) gained 3.5 points on
    ``f-rotation-10%`` seeds 0–9 but lost 5.3 on fresh seeds 10–14, and gained 0.3–2.1 on the digits
    cases (ten seeds; book chapter 16): the default is unchanged.

    The hypergradient follows the authors' chain: α is differentiated in p by the implicit function
    theorem at the bargaining solution, ``dα/dp = (M + diag(p/α²))⁻¹ diag(1/α)`` (with M fixed), and
    the primary dev loss's implicit gradient in α comes from `auxnb.hypergrad` through
    ``g = Σ_k α_k ∇L_k`` (unclipped: the authors' ``loss_train = Σ α_k L_k``). In `direction` with
    ``create_graph=True`` α enters as ``α* − H⁻¹(M α* − p/α*)``, whose value is ``α*`` and whose gradient in
    p is exactly that dα/dp.

    A task without a labelled sample in the batch has a zero gradient, for which no bargaining
    solution exists; it gets α = 0 that step. ``group_aux=True`` bargains between the primary task and
    the sum of the auxiliary losses (2 backward passes; ``cub-attributes-312`` uses it).

    Args:
        max_norm: clip the shared direction's norm to this (0: off).
        min_power: the smallest bargaining power after each upper step (the code's 1e-4).
        group_aux: the auxiliary losses as one player.
        shared_prefix: the shared parameters' name prefix (default: those under ``model.backbone``).
    """

    name = "auxinash"
    #: the authors' NYUv2 script (AvivSham/auxinash@2e411c9 experiments/nyuv2/trainer.py): a hyper-step
    #: every 25 steps, SGD 5e-3 momentum 0.9 on p, its gradient clipped to norm 1, Hypergrad(learning_rate=1e-4)
    #: with auxilearn's series (3 terms, no leading η)
    default_upper = UpperLevel(lower_steps=25, terms=3, hyper_lr=1e-4, leading_eta=False, upper_optimizer="sgd",
                               upper_lr=5e-3, upper_momentum=0.9, clip=1.0, upper_data="dev")

    def __init__(self, max_norm: float = 1.0, min_power: float = 1e-4, group_aux: bool = False,
                 shared_prefix: str = "backbone.", *, upper: UpperLevel | Mapping[str, Any] | None = None,
                 **upper_keywords: Any):
        for key, value in (("max_norm", max_norm), ("min_power", min_power)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number >= 0, got {value!r}.")
        if not min_power > 0:
            raise ValueError("min_power must be > 0: a zero bargaining power has no bargaining solution.")
        super().__init__(upper=upper, **upper_keywords)
        self.max_norm = float(max_norm)
        self.min_power = float(min_power)
        self.group_aux = bool(group_aux)
        self.shared_prefix = shared_prefix

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        shared = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(self.shared_prefix)]
        if not shared:
            raise ValueError(f"AuxiNash found no shared parameters whose names start with {self.shared_prefix!r}; "
                             "pass shared_prefix= naming the shared part of the model.")
        self._shared_ids = {id(p) for p in shared}
        n = min(len(info.tasks.names), 2) if self.group_aux else len(info.tasks.names)
        self.powers = nn.Parameter(torch.ones(n, device=info.device))
        self._alpha: list[float] = []

    def hparams(self) -> list[nn.Parameter]:
        return [self.powers]

    def project(self) -> None:
        # the authors' set_p: clamp to min_power, then rescale to sum to the number of players
        p = self.powers.clamp_min(self.min_power)
        self.powers.copy_(p / p.sum() * p.numel())

    def direction(self, terms: LossTerms, params: Sequence[Tensor], *, create_graph: bool = False) -> tuple[Tensor, ...]:
        from ..hypergrad import per_loss_grads

        names = [terms.primary, *terms.auxiliary]
        means = [self.scaled(terms.mean(n)) for n in names]
        labelled = [bool(terms.masks[n].any()) for n in names]
        if self.group_aux and len(names) > 2:
            labelled = [labelled[0], any(labelled[1:])]
            means = [means[0], torch.stack(means[1:]).sum()]
        grads = per_loss_grads(means, list(params), create_graph=create_graph)
        shared = [i for i, p in enumerate(params) if id(p) in self._shared_ids]
        rows = [k for k, ok in enumerate(labelled) if ok]
        G = torch.stack([torch.cat([grads[k][i].detach().reshape(-1) for i in shared]) for k in rows]).double()
        gram = G @ G.T
        gram = gram / gram.norm().clamp_min(torch.finfo(gram.dtype).tiny)
        powers = self.powers if create_graph else self.powers.detach()
        p_rows = powers[rows]
        alpha_star = bargaining_weights(gram, p_rows.detach().double())
        if create_graph:
            # α(p) = α* − H⁻¹(Mα* − p/α*): value α*, gradient in p the implicit (M + diag(p/α²))⁻¹ diag(1/α)
            hess = gram + torch.diag(p_rows.detach().double() / alpha_star**2)
            residual = gram @ alpha_star - p_rows.double() / alpha_star
            alpha = alpha_star - torch.linalg.solve(hess, residual)
        else:
            alpha = alpha_star
        weights = [alpha.new_zeros(())] * len(labelled)
        for j, k in enumerate(rows):
            weights[k] = alpha[j]
        self._alpha = [float(w.detach()) for w in weights]
        total = [sum(w.to(g[i].dtype) * g[i] for w, g in zip(weights, grads)) for i in range(len(params))]
        if self.max_norm > 0 and not create_graph:
            # Nash-MTL's clipping of the shared update, on the unscaled norm (fp16 loss scale)
            norm = torch.sqrt(sum((total[i].double() ** 2).sum() for i in shared))
            limit = self.max_norm * self._loss_scale
            if float(norm) > limit:
                for i in shared:
                    total[i] = total[i] * (limit / float(norm))
        return tuple(total)

    def trace(self) -> dict[str, Any]:
        out = super().trace()
        if hasattr(self, "powers"):
            players = ["primary", "auxiliary"] if self.group_aux and len(self.tasks.names) > 2 else self.tasks.names
            out.update({f"power/{n}": float(v) for n, v in zip(players, self.powers.detach())})
            out.update({f"alpha/{n}": v for n, v in zip(players, self._alpha)})
        return out
