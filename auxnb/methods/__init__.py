"""Methods: one class per method behind one protocol (`Method`), and a string registry.

The Trainer never branches on the method; adding a method means adding a class here.
"""

from __future__ import annotations

from typing import Any

from .base import Batch, LossTerms, Method, SetupInfo, compute_terms
from .fixed import Equal, FixedWeights
from .gcs import GCS
from .hpo import HPOTune
from .stl import STL
from .uncert import Uncert

__all__ = [
    "Method", "LossTerms", "SetupInfo", "Batch", "compute_terms",
    "STL", "Equal", "FixedWeights", "HPOTune", "Uncert", "GCS",
    "get", "names", "register",
]

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry under `cls.name` (usable as a decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (STL, Equal, FixedWeights, HPOTune, Uncert, GCS):
    register(_cls)

# --- bi-level methods (issue 3 base; MAOAL/AuxL issue 4) ---

# --- JTDS / N-JTDS (issue 5) ---

# --- DTG, MixUp family, MAXL (issue 6) ---


def names() -> list[str]:
    """Registered method names."""
    return list(_REGISTRY)


def get(name: str | Method, **kwargs: Any) -> Method:
    """Build a method by registry name (``get("gcs", weighted=False)``); a Method passes through.

    Example:
        >>> get("equal")
        Equal(task_weights={}, default=1.0)
    """
    if isinstance(name, Method):
        if kwargs:
            raise ValueError("Keyword arguments apply to a method name, not to a Method instance.")
        return name
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}; valid methods: {', '.join(_REGISTRY)}.") from None
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise TypeError(f"Method {name!r}: {err}") from None
