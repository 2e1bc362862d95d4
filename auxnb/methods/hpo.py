"""HPO-tune (NAL in JTDS): random search over fixed auxiliary weights, selected on D_val.

Each trial is a full training run with `FixedWeights`, trained by the selection layer (`auxnb.selection`); test metrics of the losing trials are never looked at.
"""

from __future__ import annotations

import numpy as np

from .base import Method, SetupInfo
from .fixed import FixedWeights

__all__ = ["HPOTune"]


class HPOTune(Method):
    """Random search of fixed weights for the auxiliary tasks.

    Args:
        trials: number of weight vectors tried (the cost is `trials` full runs).
        low, high: auxiliary weights are drawn log-uniformly in [low, high]; a draw is set
            to 0 with probability `p_zero` (so "drop this task" is searchable).
        seed: seed of the search (independent of the training seed).
        group_aux: one weight shared by every auxiliary task (a 1-dimensional search): what the JTDS
            paper (§3.2) did for NAL on CUB's 312 attribute tasks.
    """

    name = "hpo-tune"

    def __init__(self, trials: int = 8, low: float = 0.01, high: float = 10.0, p_zero: float = 0.2, seed: int = 0,
                 group_aux: bool = False):
        if trials < 1:
            raise ValueError(f"trials must be >= 1, got {trials}.")
        if not 0 < low < high:
            raise ValueError(f"Need 0 < low < high, got low={low}, high={high}.")
        self.trials, self.low, self.high, self.p_zero, self.seed = int(trials), float(low), float(high), float(p_zero), int(seed)
        self.group_aux = bool(group_aux)

    def candidates(self, aux_names: list[str]) -> list[dict[str, float]]:
        """The weight vectors tried, in order (the first is all ones, the Equal baseline)."""
        rng = np.random.default_rng(self.seed)
        out = [{n: 1.0 for n in aux_names}]
        dims = 1 if self.group_aux else len(aux_names)
        while len(out) < self.trials:
            w = np.exp(rng.uniform(np.log(self.low), np.log(self.high), size=dims))
            w[rng.uniform(size=dims) < self.p_zero] = 0.0
            w = np.repeat(w, len(aux_names)) if self.group_aux else w
            out.append({n: float(v) for n, v in zip(aux_names, w)})
        return out[: self.trials]

    def search_runs(self, tasks) -> dict[str, tuple[FixedWeights, dict[str, float]]]:
        """The search's candidates for the selection layer (`auxnb.selection`): ``"trial-<i>"`` ->
        (its `FixedWeights` run, its weights). Each is one whole run, checkpointed on its own
        (``<checkpoint_dir>/trial-<i>/``); the best on D_val is kept."""
        return {f"trial-{i:03d}": (FixedWeights(w), dict(w))
                for i, w in enumerate(self.candidates([t.name for t in tasks.auxiliary]))}

    def search_config(self, kept: dict[str, float]) -> dict[str, object]:
        """What the kept run's config records about the search."""
        return {"hpo_best_weights": dict(kept)}

    def setup(self, model, info: SetupInfo) -> None:
        super().setup(model, info)
