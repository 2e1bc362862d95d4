"""Uncert (Kendall, Gal & Cipolla, CVPR 2018): task weights from learned homoscedastic uncertainty.

The log-variances are trained by the lower optimiser together with the model; nothing uses D_dev.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .base import LossTerms, Method, SetupInfo

__all__ = ["Uncert"]


class Uncert(Method):
    """Uncertainty weighting, with s_k = log σ_k² learned jointly with θ.

    Kendall et al. (2018), Eq. 7 and 10: a regression loss enters as
    ``1/(2σ²) L + log σ = ½ exp(-s) L + ½ s`` and a classification (or binary) loss as
    ``1/σ² L + log σ = exp(-s) L + ½ s``.

    Args:
        init: initial value of every s_k (0 means σ = 1).

    Example:
        >>> u = Uncert()
        >>> u.combine_one(torch.tensor(2.0), torch.tensor(0.0), "classification").item()
        2.0
    """

    name = "uncert"

    def __init__(self, init: float = 0.0):
        self.init = float(init)

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        param = next(model.parameters())
        self.log_var = nn.Parameter(torch.full((len(info.tasks),), self.init, device=param.device, dtype=param.dtype))
        self._position = {t.name: i for i, t in enumerate(info.tasks)}
        self._kinds = {t.name: t.kind for t in info.tasks}

    def lower_parameters(self) -> list[nn.Parameter]:
        return [self.log_var]

    @staticmethod
    def combine_one(loss: Tensor, log_var: Tensor, kind: str) -> Tensor:
        scale = 0.5 if kind == "regression" else 1.0
        return scale * torch.exp(-log_var) * loss + 0.5 * log_var

    def objective(self, terms: LossTerms) -> Tensor:
        total = terms.mean(terms.primary) * 0.0
        for name in terms.losses:
            s = self.log_var[self._position[name]]
            total = total + self.combine_one(terms.mean(name), s, self._kinds[name])
        return total

    def weights(self, terms: LossTerms) -> dict[str, Tensor | float]:
        return {n: float(torch.exp(-self.log_var[self._position[n]])) for n in terms.losses}

    def trace(self) -> dict[str, Any]:
        return {f"log_var/{n}": float(self.log_var[i].detach()) for n, i in self._position.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"log_var": self.log_var.detach().clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with torch.no_grad():
            self.log_var.copy_(state["log_var"])
