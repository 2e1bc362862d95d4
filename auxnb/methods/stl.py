"""STL (single-loss learning, "SLL" in MAOAL): the primary loss only.

It never forwards auxiliary streams, so auxiliary data cannot touch its BatchNorm statistics.
"""

from __future__ import annotations

from torch import Tensor

from ..tasks import TaskSet
from .base import LossTerms, Method

__all__ = ["STL"]


class STL(Method):
    """Train on the primary task alone, on D_train ∪ D_dev (the papers' fair-comparison rule)."""

    name = "stl"

    def task_names(self, tasks: TaskSet) -> list[str]:
        return [tasks.primary.name]

    def weights(self, terms: LossTerms) -> dict[str, Tensor | float]:
        return {terms.primary: 1.0}
