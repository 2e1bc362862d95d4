"""A do-no-harm guard (issue 13): train the method and fallbacks (STL, Equal), keep the best on D_val.

A bi-level method learns φ from a small, noisy signal; when that signal misleads it (an auxiliary
loss that only hurts, a scheduler that up-weights corrupted labels), the method can end below
ignoring the auxiliary losses. The guard spends one STL run (and one Equal run) more and selects on
D_val, the split the Trainer already selects checkpoints on; D_test is read once, for the run kept.

Simplest first (`select`): Equal replaces STL, and the method replaces the run kept so far, only
when its D_val metric is ahead by more than ``margin`` (in the metric's units): the more complex
run is the riskier choice, so a gap within D_val's noise goes to the simpler run. The chapter *When does auxiliary learning help?* measures the guard.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from .base import Method
from .fixed import FixedWeights

__all__ = ["FALLBACKS", "FallbackGuard", "check_fallback", "check_fallback_margin", "DEFAULT_FALLBACK", "DEFAULT_MARGIN",
           "select", "equal_fallback", "without_guard"]

#: What the guard may fall back to: ``None`` (off), ``"stl"`` (the primary task alone) or
#: ``"stl+equal"`` (also the method's auxiliary tasks and losses at weight 1, the Equal baseline).
FALLBACKS = (None, "stl", "stl+equal")
#: The constructors' default (issue 13: the combination that did no harm on every case).
DEFAULT_FALLBACK = "stl+equal"
#: The constructors' default margin (D_val metric units: 0.01 = one point of accuracy; chosen on
#: seeds 0-4 of benchmarks/no_harm.py, `--margins`).
DEFAULT_MARGIN = 0.01


def without_guard(method: str) -> dict[str, Any]:
    """Keyword arguments that turn the do-no-harm guard off for the registered method `method`
    (``{"fallback": None}`` for MAOAL, JTDS and DTG; ``{}`` for a method without one): what a
    comparison with the papers passes, e.g. ``run(setting, name, method_kwargs=without_guard(name))``,
    so that a method's row is that method's own run.

    Example:
        >>> without_guard("maoal"), without_guard("stl")
        ({'fallback': None}, {})
    """
    from . import _REGISTRY

    cls = _REGISTRY.get(method)
    if cls is None:
        from . import names

        raise ValueError(f"Unknown method {method!r}; registered: {', '.join(names())}.")
    from .base import inspect_params

    return {"fallback": None} if "fallback" in inspect_params(cls.__init__) else {}


def check_fallback(fallback: str | None) -> str | None:
    """`fallback` itself, or a ValueError naming the valid values."""
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be None (off), 'stl' or 'stl+equal', got {fallback!r}.")
    return fallback


def check_fallback_margin(margin: float) -> float:
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"fallback_margin must be a finite number >= 0 in the D_val metric's units "
                         f"(0.005 = half a point of accuracy), got {margin!r}.")
    return float(margin)


class _EqualOn(FixedWeights):
    """Equal on the guarded method's own auxiliary tasks (``None``: all) and extra losses (weight 1)."""

    name = "equal"

    def __init__(self, aux_tasks: Sequence[str] | None) -> None:
        super().__init__({}, default=1.0)
        self._aux_tasks = None if aux_tasks is None else list(aux_tasks)

    def task_names(self, tasks):  # type: ignore[override]
        if self._aux_tasks is None:
            return tasks.names
        unknown = sorted(set(self._aux_tasks) - set(tasks.names))
        if unknown:
            raise ValueError(f"Equal fallback: unknown auxiliary tasks {unknown}; tasks are {tasks.names}.")
        return [tasks.primary.name, *[n for n in tasks.names if n in self._aux_tasks and n != tasks.primary.name]]


def equal_fallback(method: Method) -> Method:
    """The Equal run the guard compares `method` with: the primary task, `method`'s auxiliary tasks
    and its extra ``aux_losses``, every weight 1, nothing learned."""
    from .base import _set_extra_losses

    equal = _EqualOn(getattr(method, "aux_tasks", None))
    fixed = getattr(method, "_extra_losses", None)  # added with a fixed weight: keep that weight
    learned = getattr(method, "_aux_fns", None)  # MAOAL/AuxL learn their weights: here weight 1
    if fixed:
        _set_extra_losses(equal, dict(fixed), getattr(method, "aux_loss_weight", 1.0))
    elif learned:
        _set_extra_losses(equal, dict(learned), 1.0)
    return equal


class FallbackGuard:
    """Mixin for a `Method` with ``fallback`` and ``fallback_margin`` attributes: its `outer_loop`
    trains the method, then (``fallback="stl"``) STL, or (``"stl+equal"``) STL and Equal, from
    the same initial weights and seed, and keeps the simplest run that no more complex run beats
    on D_val by more than ``fallback_margin`` (`select`: STL, then Equal, then the method). The returned run's ``config["fallback"]`` records every validation metric and which run
    was kept; when a fallback is kept, the method's own trace stays available as
    ``result.trace_trials`` and its learned φ in the method object.
    Cost: one STL run more (and one Equal run with ``"stl+equal"``).
    """

    fallback: str | None = None
    fallback_margin: float = 0.0

    def outer_loop(self, fit_once: Callable[..., Any]) -> Any:
        if self.fallback is None:
            return fit_once(self)  # type: ignore[arg-type]
        # several runs: each checkpoints in its own sub-directory (key), so a resumed guarded run
        # never continues the method from a fallback's checkpoint or the other way round
        own = fit_once(self, key="method")  # type: ignore[arg-type]
        from .stl import STL

        fallbacks = {"stl": fit_once(STL(), key="fallback-stl")}
        if self.fallback == "stl+equal":
            fallbacks["equal"] = fit_once(equal_fallback(self), key="fallback-equal")  # type: ignore[arg-type]
        kept_name = select(own.val_metric, {n: r.val_metric for n, r in fallbacks.items()},
                           higher_is_better=self.tasks.primary.higher_is_better,  # type: ignore[attr-defined]
                           margin=self.fallback_margin, method_name=self.name)  # type: ignore[attr-defined]
        kept = own if kept_name == self.name else fallbacks[kept_name]  # type: ignore[attr-defined]
        kept.config["fallback"] = {
            "fallback": self.fallback, "margin": self.fallback_margin, "method": self.name,  # type: ignore[attr-defined]
            "kept": kept_name,
            "val_method": float(own.val_metric), "val_fallback": float(fallbacks["stl"].val_metric),
            **({"val_equal": float(fallbacks["equal"].val_metric)} if "equal" in fallbacks else {}),
        }
        if kept is not own:
            kept.trace_trials = list(own.trace)
        return kept


def select(method_val: float, fallback_vals: dict[str, float], *, higher_is_better: bool = True,
           margin: float = 0.0, method_name: str = "method") -> str:
    """Which run the guard keeps, simplest first: start from the first fallback (STL); each later
    run (Equal, then the method `method_name`) replaces the current choice only when its D_val
    metric beats the current choice's by more than `margin`. A more complex run must earn its
    place: a gap within the margin is D_val noise, and the simpler run is the safer bet.

    Example:
        >>> select(0.70, {"stl": 0.66, "equal": 0.68}, margin=0.005, method_name="maoal")
        'maoal'
        >>> select(0.684, {"stl": 0.66, "equal": 0.68}, margin=0.005, method_name="maoal")
        'equal'
        >>> select(0.684, {"stl": 0.66, "equal": 0.663}, margin=0.005, method_name="maoal")  # Equal within the margin
        'maoal'
        >>> select(0.30, {"stl": 0.31, "equal": 0.31}, higher_is_better=False, method_name="jtds")  # an error
        'jtds'
    """
    sign = 1.0 if higher_is_better else -1.0
    names = list(fallback_vals)
    kept, kept_val = names[0], fallback_vals[names[0]]
    for name, value in [*((n, fallback_vals[n]) for n in names[1:]), (method_name, method_val)]:
        if sign * (value - kept_val) > margin:
            kept, kept_val = name, value
    return kept
