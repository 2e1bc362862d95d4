"""What the do-no-harm guard compares a method with, and the old constructor keywords of the guard.

The guard itself is a run-level choice in the selection layer (`auxnb.selection`, ``guard=``,
CLI ``--guard``): a method is what its name says, ``MAOAL()`` trains MAOAL alone. Here:
`equal_fallback` (the Equal candidate on a method's own auxiliary tasks and extra losses) and the
old spellings — ``MAOAL(fallback=..., fallback_margin=...)`` and `without_guard` — which warn once
and map onto the selection layer (`legacy_fallback`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from .base import Method
from .fixed import FixedWeights

__all__ = ["FALLBACKS", "check_fallback", "check_fallback_margin", "DEFAULT_FALLBACK", "DEFAULT_MARGIN",
           "select", "equal_fallback", "without_guard", "legacy_fallback", "NOT_GIVEN"]

#: What the old ``fallback=`` keyword accepted: ``None`` (off), ``"stl"`` or ``"stl+equal"``.
FALLBACKS = (None, "stl", "stl+equal")
#: What ``fallback=`` meant when only ``fallback_margin=`` was given (the old constructors' default).
DEFAULT_FALLBACK = "stl+equal"
#: The guard's default margin (D_val metric units; `auxnb.selection.DEFAULT_MARGIN`).
DEFAULT_MARGIN = 0.01


class _NotGiven:
    def __repr__(self) -> str:
        return "<not given>"


#: Default of the old ``fallback`` / ``fallback_margin`` keywords: not given (the method alone).
NOT_GIVEN: Any = _NotGiven()


def select(method_val: float, fallback_vals: Mapping[str, float], *, higher_is_better: bool = True,
           margin: float = 0.0, method_name: str = "method") -> str:
    """Which run the guard keeps, simplest first: start from the first fallback (STL); each later
    run (Equal, then the method `method_name`) replaces the current choice only when its D_val
    metric beats the current choice's by more than `margin`. A more complex run must earn its
    place: a gap within the margin is D_val noise, and the simpler run is the safer bet. A NaN
    D_val never wins.

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
        if math.isnan(kept_val) and not math.isnan(value) or sign * (value - kept_val) > margin:
            kept, kept_val = name, value
    return kept


def legacy_fallback(method: Method, fallback: Any = NOT_GIVEN, fallback_margin: Any = NOT_GIVEN) -> None:
    """The old ``fallback=`` / ``fallback_margin=`` keywords of MAOAL, JTDS and DTG: warn once
    (FutureWarning) and record the request on `method` (``_legacy_guard``), which a `Trainer`
    without its own ``guard=`` and `auxnb.experiments.run` honour as the run-level guard
    (``fallback=None``: the method alone, whatever ``run``'s default)."""
    if fallback is NOT_GIVEN and fallback_margin is NOT_GIVEN:
        return
    guard = DEFAULT_FALLBACK if fallback is NOT_GIVEN else check_fallback(fallback)
    margin = DEFAULT_MARGIN if fallback_margin is NOT_GIVEN else check_fallback_margin(fallback_margin)
    from .._deprecation import warn_once

    warn_once(
        "fallback",
        f"{type(method).__name__}(fallback=..., fallback_margin=...) is deprecated: a method trains alone, and the "
        "do-no-harm guard is a run-level option: Trainer(..., guard='stl+equal', guard_margin=0.01), "
        "auxnb.experiments.run(..., guard=...), CLI --guard. The keywords still work for now.",
    )
    method._legacy_guard = (guard, margin)


def without_guard(method: str) -> dict[str, Any]:
    """Deprecated: the keyword arguments that turned the do-no-harm guard off for the registered
    method `method` (``{"fallback": None}`` for MAOAL, JTDS and DTG; ``{}`` for another method).
    They still do (the method alone, whatever `auxnb.experiments.run`'s guard default), with one
    FutureWarning; pass ``guard=None`` to ``run`` / ``sweep`` instead.
    """
    from .registry import REGISTRY, names

    cls = REGISTRY.get(method)
    if cls is None:
        raise ValueError(f"Unknown method {method!r}; registered: {', '.join(names())}.")
    from .._deprecation import warn_once
    from .base import inspect_params

    warn_once("without_guard", "without_guard(name) is deprecated: the guard is a run-level option; pass guard=None "
                               "to auxnb.experiments.run / sweep (CLI --guard none) instead of method_kwargs=without_guard(name).")
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
        if aux_tasks is not None:  # part of its configuration (and identity): not the plain Equal run
            self.aux_tasks = list(aux_tasks)

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
