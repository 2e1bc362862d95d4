"""A do-no-harm guard (issue 13): train the method and a fallback (STL), keep the one with the better D_val metric.

A bi-level method learns φ from a small, noisy signal; when that signal misleads it (an auxiliary
loss that only hurts, a scheduler that up-weights corrupted labels), the method can end below
ignoring the auxiliary losses. The guard spends one extra STL run and selects on D_val, the
split the Trainer already selects checkpoints on; D_test is read once, for the run kept.
"""

from __future__ import annotations

from typing import Any, Callable

from .base import Method

__all__ = ["FALLBACKS", "FallbackGuard", "check_fallback"]

#: What the guard may fall back to: ``None`` (off) or ``"stl"`` (the primary task alone).
FALLBACKS = (None, "stl")


def check_fallback(fallback: str | None) -> str | None:
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be None (off) or 'stl', got {fallback!r}.")
    return fallback


class FallbackGuard:
    """Mixin for a `Method` with a ``fallback`` attribute: its `outer_loop` trains the method, then
    (if ``fallback="stl"``) STL from the same initial weights and seed, and returns the run whose
    D_val metric is better (the method's on a tie). The returned run's ``config["fallback"]``
    records both validation metrics and which was kept; when STL is kept, the method's own trace
    stays available as ``result.trace_trials``. Cost: one STL run more.
    """

    fallback: str | None = None

    def outer_loop(self, fit_once: Callable[..., Any]) -> Any:
        if self.fallback is None:
            return fit_once(self)  # type: ignore[arg-type]
        # two runs: each checkpoints in its own sub-directory (key), so a resumed guarded run
        # never continues the method from the fallback's checkpoint or the other way round
        own = fit_once(self, key="method")  # type: ignore[arg-type]
        from .stl import STL

        other = fit_once(STL(), key="fallback-stl")
        sign = 1.0 if self.tasks.primary.higher_is_better else -1.0  # type: ignore[attr-defined]
        keep_own = sign * own.val_metric >= sign * other.val_metric
        kept = own if keep_own else other
        kept.config["fallback"] = {
            "fallback": self.fallback, "kept": self.name if keep_own else self.fallback,  # type: ignore[attr-defined]
            "val_method": float(own.val_metric), "val_fallback": float(other.val_metric),
        }
        if not keep_own:
            kept.trace_trials = list(own.trace)
        return kept
