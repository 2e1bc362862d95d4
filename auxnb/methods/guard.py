"""A do-no-harm guard (issue 13): train the method and fallbacks (STL, Equal), keep the best on D_val.

A bi-level method learns φ from a small, noisy signal; when that signal misleads it (an auxiliary
loss that only hurts, a scheduler that up-weights corrupted labels), the method can end below
ignoring the auxiliary losses. The guard spends one extra STL run and selects on D_val, the
split the Trainer already selects checkpoints on; D_test is read once, for the run kept.
"""

from __future__ import annotations

from typing import Any, Callable

from .base import Method

__all__ = ["FALLBACKS", "FallbackGuard", "check_fallback"]

#: What the guard may fall back to: ``None`` (off), ``"stl"`` (the primary task alone) or
#: ``"stl+equal"`` (also every auxiliary task at weight 1, the Equal baseline).
FALLBACKS = (None, "stl", "stl+equal")


def check_fallback(fallback: str | None, aux_losses: object = None) -> str | None:
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be None (off), 'stl' or 'stl+equal', got {fallback!r}.")
    if fallback == "stl+equal" and aux_losses:
        raise ValueError("fallback='stl+equal' trains Equal(), which weights tasks only and would drop the extra "
                         "aux_losses; use fallback='stl' with aux_losses.")
    return fallback


class FallbackGuard:
    """Mixin for a `Method` with a ``fallback`` attribute: its `outer_loop` trains the method, then
    (``fallback="stl"``) STL, or (``"stl+equal"``) STL and Equal, from the same initial weights and
    seed, and returns the run whose D_val metric is best (the method's on a tie, then STL's). The
    returned run's ``config["fallback"]`` records every validation metric and which run was kept;
    when a fallback is kept, the method's own trace stays available as ``result.trace_trials``.
    Cost: one STL run more (and one Equal run with ``"stl+equal"``).
    """

    fallback: str | None = None

    def outer_loop(self, fit_once: Callable[..., Any]) -> Any:
        if self.fallback is None:
            return fit_once(self)  # type: ignore[arg-type]
        # several runs: each checkpoints in its own sub-directory (key), so a resumed guarded run
        # never continues the method from a fallback's checkpoint or the other way round
        own = fit_once(self, key="method")  # type: ignore[arg-type]
        from .fixed import Equal
        from .stl import STL

        runs = {self.name: own, "stl": fit_once(STL(), key="fallback-stl")}  # type: ignore[attr-defined]
        if self.fallback == "stl+equal":
            runs["equal"] = fit_once(Equal(), key="fallback-equal")
        sign = 1.0 if self.tasks.primary.higher_is_better else -1.0  # type: ignore[attr-defined]
        name = max(runs, key=lambda n: sign * runs[n].val_metric)  # the first maximum: the method on a tie
        kept = runs[name]
        kept.config["fallback"] = {
            "fallback": self.fallback, "kept": name, "val_method": float(own.val_metric),
            "val_fallback": float(runs["stl"].val_metric),
            **({"val_equal": float(runs["equal"].val_metric)} if "equal" in runs else {}),
        }
        if kept is not own:
            kept.trace_trials = list(own.trace)
        return kept
