"""Which (setting, method) pairs auxnb refuses, and why: one explicit, short list, checked before any work.

Every registered method runs on every registered setting except the cells listed in `REFUSED`;
`run` and `sweep` check it before building data, so a refused pair is a `ValueError` naming the
method, the setting and the reason, never a crash inside training. ``tests/test_matrix.py`` holds
the whole matrix to this contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

__all__ = ["Refusal", "REFUSED", "RATING_SETTINGS", "refusal", "check_applicable", "refused_cells"]

#: The recommendation settings: AutoInt over integer field ids, a rating-regression primary task.
RATING_SETTINGS = (
    "movielens-l2", "beauty-l2", "movielens-ctr", "toys-ctr", "movies-ctr", "movielens100k-l2", "movielens100k-ctr",
)


@dataclass(frozen=True)
class Refusal:
    """`method` does not apply to any of `settings`, for `reason` (which also says what to use instead)."""

    method: str
    settings: tuple[str, ...]
    reason: str


#: The refused cells of the (setting × method) matrix, each with its reason. Keep it short: a
#: method that could run somewhere should be made to run there instead of being listed here.
REFUSED: tuple[Refusal, ...] = (
    Refusal(
        "maxl", RATING_SETTINGS,
        "MAXL generates sub-classes of a classification primary task and the primary task here is rating "
        "regression (DTG Table 1 prints '-' for MAXL on Toys and Movies); DTG generates regression labels.",
    ),
    Refusal(
        "mixup", RATING_SETTINGS,
        "input-space MixUp would mix the integer field ids that AutoInt embeds, which means nothing (DTG Table 5 "
        "prints '-' for MixUp on Movies); use 'f-mixup', which mixes the backbone's features.",
    ),
    Refusal(
        "auto-mix", RATING_SETTINGS,
        "input-space Auto-Mix would mix the integer field ids that AutoInt embeds, which means nothing (DTG "
        "Table 5 prints '-' for Auto-Mix on Movies); use 'auto-f-mix', which mixes the backbone's features.",
    ),
)


def refusal(setting: str, method: str) -> str | None:
    """The reason `method` is refused on `setting`, or None when the pair runs."""
    for entry in REFUSED:
        if entry.method == method and setting in entry.settings:
            return entry.reason
    return None


def check_applicable(setting: str, method: str) -> None:
    """Raise a `ValueError` naming `method`, `setting` and the reason when the pair is refused.

    Example:
        >>> check_applicable("digits-rotation", "mixup")
        >>> check_applicable("movielens-l2", "mixup")
        Traceback (most recent call last):
        ...
        ValueError: Method 'mixup' does not apply to setting 'movielens-l2': input-space MixUp would mix the integer field ids that AutoInt embeds, which means nothing (DTG Table 5 prints '-' for MixUp on Movies); use 'f-mixup', which mixes the backbone's features. (auxnb.experiments.REFUSED lists every refused pair.)
    """
    reason = refusal(setting, method)
    if reason is not None:
        raise ValueError(
            f"Method {method!r} does not apply to setting {setting!r}: {reason} "
            "(auxnb.experiments.REFUSED lists every refused pair.)"
        )


def refused_cells() -> pd.DataFrame:
    """One row per refused (setting, method) pair with its reason."""
    rows = [{"setting": s, "method": r.method, "reason": r.reason} for r in REFUSED for s in r.settings]
    return pd.DataFrame(rows, columns=["setting", "method", "reason"])
