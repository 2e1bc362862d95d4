"""The method registry: name -> class. The package (`auxnb.methods`) registers every method here;
modules that look a method up by name (the guard's old keywords, `UpperLevel.recommended`) import
this module, not the package that imports them."""

from __future__ import annotations

from typing import Any

from .base import Method

__all__ = ["register", "names", "get", "REGISTRY"]

#: name -> method class (``auxnb.methods._REGISTRY`` is this dict)
REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to the registry under `cls.name` (usable as a decorator)."""
    REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    """Registered method names."""
    return list(REGISTRY)


def get(name: str | Method, **kwargs: Any) -> Method:
    """Build a method by registry name (``get("gcs", weighted=False)``); a Method passes through.

    Example:
        >>> from auxnb.methods import get
        >>> get("equal")
        Equal(task_weights={}, default=1.0)
    """
    if isinstance(name, Method):
        if kwargs:
            raise ValueError("Keyword arguments apply to a method name, not to a Method instance.")
        return name
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}; valid methods: {', '.join(REGISTRY)}.") from None
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise TypeError(f"Method {name!r}: {err}") from None
