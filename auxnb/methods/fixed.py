"""Fixed task weights: `Equal` (every weight 1) and `FixedWeights` (weights chosen by the user).

The primary weight is 1 unless given; weights never change during training.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from torch import Tensor, nn

from .base import LossTerms, Method, SetupInfo

__all__ = ["Equal", "FixedWeights"]


class FixedWeights(Method):
    """Weighted sum of task losses with constant weights: L = Σ_k w_k L_k.

    Args:
        weights: task name -> weight. Auxiliary tasks left out get `default`; the primary
            task gets 1 unless named. Unknown task names are an error at setup.
        default: weight of auxiliary tasks not named in `weights`.

    Example:
        >>> FixedWeights({"rotation": 0.5}).weights_for(["digit", "rotation"], "digit")
        {'digit': 1.0, 'rotation': 0.5}
    """

    name = "fixed"

    def __init__(self, weights: Mapping[str, float] | None = None, default: float = 1.0):
        self.task_weights = dict(weights or {})
        self.default = float(default)
        for name, w in [*self.task_weights.items(), ("default", self.default)]:
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"Weight for {name!r} must be a finite number >= 0, got {w!r}.")

    def setup(self, model: nn.Module, info: SetupInfo) -> None:
        super().setup(model, info)
        unknown = sorted(set(self.task_weights) - set(info.tasks.names))
        if unknown:
            raise ValueError(f"FixedWeights names unknown tasks {unknown}; tasks are {info.tasks.names}.")

    def weights_for(self, names, primary: str) -> dict[str, float]:
        return {n: float(self.task_weights.get(n, 1.0 if n == primary else self.default)) for n in names}

    def weights(self, terms: LossTerms) -> dict[str, Tensor | float]:
        return self.weights_for(terms.losses, terms.primary)

    def trace(self) -> dict[str, Any]:
        return {f"weight/{k}": v for k, v in self.task_weights.items()}


class Equal(FixedWeights):
    """Every task, primary and auxiliary, weighted 1 (the usual multi-task baseline)."""

    name = "equal"

    def __init__(self) -> None:
        super().__init__({}, default=1.0)
