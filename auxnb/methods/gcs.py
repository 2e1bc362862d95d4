"""GCS (Du et al., 2018, "Adapting auxiliary losses using gradient similarity").

Each auxiliary loss is weighted by the cosine similarity of its gradient with the primary
gradient on the shared parameters; the weights are recomputed every step and never learned.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .base import LossTerms, Method, SetupInfo

__all__ = ["GCS", "gradient_cosine"]


def gradient_cosine(a: Sequence[Tensor], b: Sequence[Tensor], eps: float = 1e-12) -> Tensor:
    """Cosine similarity of two gradients given as aligned sequences of tensors."""
    dot = sum((x * y).sum() for x, y in zip(a, b))
    na = torch.sqrt(sum((x * x).sum() for x in a))
    nb = torch.sqrt(sum((y * y).sum() for y in b))
    return dot / (na * nb).clamp_min(eps)


class GCS(Method):
    """Gradient cosine similarity weighting.

    For each auxiliary loss k, ``c_k = cos(∇_s L_main, ∇_s L_k)`` on the shared parameters s
    (the backbone). ``weighted=True`` uses ``w_k = max(0, c_k)``; ``weighted=False`` the
    indicator ``w_k = 1[c_k > 0]`` (Du et al.'s unweighted variant). The direction is
    ``∇L_main + Σ_k w_k ∇_s L_k`` on the shared parameters and ``∇L_main + Σ_k ∇L_k`` on the
    others: Du et al. gate the shared update only, so an auxiliary head keeps learning its own
    task when c_k ≤ 0. Costs K+1 backward passes per step.

    Args:
        weighted: weighted (clipped cosine) or unweighted (0/1) variant.
        shared_prefix: names of shared parameters' prefix; default: those under ``model.backbone``.
        group_aux: treat the sum of all auxiliary losses as one loss with one gate (2 backward
            passes a step instead of K+1): what the JTDS paper (§3.2) did for GCS on CUB's 312
            attribute tasks. Trace key ``weight/auxiliary``.
    """

    name = "gcs"

    def __init__(self, weighted: bool = True, shared_prefix: str = "backbone.", group_aux: bool = False):
        self.weighted = bool(weighted)
        self.shared_prefix = shared_prefix
        self.group_aux = bool(group_aux)

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        shared = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith(self.shared_prefix)]
        if not shared:
            raise ValueError(
                f"GCS found no shared parameters whose names start with {self.shared_prefix!r}; "
                "pass shared_prefix= naming the shared part of the model."
            )
        self._shared_ids = {id(p) for p in shared}
        self._last: dict[str, float] = {}

    def direction(self, terms: LossTerms, params: Sequence[Tensor], *, create_graph: bool = False) -> tuple[Tensor, ...]:
        from ..hypergrad import per_loss_grads

        names = [terms.primary, *terms.auxiliary]
        means = [self.scaled(terms.mean(n)) for n in names]
        if self.group_aux and len(names) > 2:  # the auxiliary losses as one (JTDS §3.2)
            names, means = [terms.primary, "auxiliary"], [means[0], torch.stack(means[1:]).sum()]
        grads = per_loss_grads(means, list(params), create_graph=create_graph)
        shared = [i for i, p in enumerate(params) if id(p) in self._shared_ids]
        main_shared = [grads[0][i] for i in shared]
        total = list(grads[0])
        is_shared = [id(p) in self._shared_ids for p in params]
        for k, name in enumerate(names[1:], start=1):
            cos = gradient_cosine(main_shared, [grads[k][i] for i in shared])
            w = cos.clamp_min(0.0) if self.weighted else (cos > 0).to(cos.dtype)
            w = w.detach()
            self._last[name] = float(w)
            # the gate applies to the shared parameters only (Du et al. 2018, Algorithm 1)
            total = [t + (w * g if s else g) for t, g, s in zip(total, grads[k], is_shared)]
        return tuple(total)

    def trace(self) -> dict[str, Any]:
        return {f"weight/{k}": v for k, v in self._last.items()}
