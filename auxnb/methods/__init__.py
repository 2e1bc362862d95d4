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
from .upper import UpperLevel

__all__ = [
    "Method", "LossTerms", "SetupInfo", "Batch", "compute_terms",
    "STL", "Equal", "FixedWeights", "HPOTune", "Uncert", "GCS",
    "get", "names", "register", "UpperLevel",
]

_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry under `cls.name` (usable as a decorator)."""
    _REGISTRY[cls.name] = cls
    return cls


for _cls in (STL, Equal, FixedWeights, HPOTune, Uncert, GCS):
    register(_cls)

# --- bi-level methods (issue 3 base; MAOAL/AuxL issue 4) ---
from .auxl import AuxL  # noqa: E402
from .maoal import MAOAL, l2_penalty  # noqa: E402

for _cls in (AuxL, MAOAL):
    register(_cls)
__all__ += ["AuxL", "MAOAL", "l2_penalty"]

# --- JTDS / N-JTDS (issue 5) ---
from .jtds import JTDS  # noqa: E402
from .njtds import NJTDS  # noqa: E402

register(JTDS)
register(NJTDS)
__all__ += ["JTDS", "NJTDS"]

# --- DTG, MixUp family, MAXL (issue 6) ---
from .dtg import DTG  # noqa: E402
from .maxl import MAXL  # noqa: E402
from .mixup import AutoFMix, AutoMix, FMixUp, MixUp  # noqa: E402

for _cls in (DTG, MixUp, FMixUp, AutoMix, AutoFMix, MAXL):
    register(_cls)
__all__ += ["DTG", "MixUp", "FMixUp", "AutoMix", "AutoFMix", "MAXL"]

# --- the do-no-harm guard of MAOAL, JTDS and DTG (issue 13) ---
from .guard import without_guard  # noqa: E402

__all__ += ["without_guard"]


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
