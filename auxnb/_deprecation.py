"""One warning per old spelling per process, attributed to the caller's code (not auxnb's)."""

from __future__ import annotations

import sys
import warnings

__all__ = ["warn_once"]

_WARNED: set[str] = set()


def warn_once(key: str, message: str, category: type[Warning] = FutureWarning) -> None:
    """Warn about an old spelling once per process, attributed to the first caller outside auxnb."""
    if key in _WARNED:
        return
    _WARNED.add(key)
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] == "auxnb":
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
