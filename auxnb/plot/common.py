"""Figures shared by every chapter: learning curves and a results comparison.

Inputs are RunResults or tidy DataFrames; outputs are matplotlib Axes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

__all__ = ["learning_curves", "results_bars", "run_label", "selection_of"]


def _axes(ax=None, figsize=(6, 3.5)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def selection_of(result: object) -> dict | None:
    """What a selected run chose: ``{"method": ..., "kept": ...}`` (the do-no-harm guard or a search,
    `auxnb.selection`; read from ``config["selection"]``, or the older ``config["fallback"]``), None
    for a run of one method alone."""
    config = getattr(result, "config", None) or {}
    info = config.get("selection") or config.get("fallback") or {}
    if not info.get("kept") or not info.get("method"):
        return None
    return {"method": str(info["method"]), "kept": str(info["kept"])}


def run_label(label: str, result: object) -> str:
    """`label` for a run of one method, ``"<label> → kept <candidate>"`` when a selection kept another
    candidate's run (its history, metrics and weights are that candidate's, not the method's).

    Example:
        >>> from types import SimpleNamespace
        >>> run_label("maoal", SimpleNamespace(config={"selection": {"method": "maoal", "kept": "stl"}}))
        'maoal → kept stl'
    """
    chosen = selection_of(result)
    return f"{label} → kept {chosen['kept']}" if chosen is not None and chosen["kept"] != chosen["method"] else label


def learning_curves(results: Mapping[str, object], column: str | None = None, ax=None, title: str | None = None,
                    percent: bool | None = None, ylabel: str | None = None, candidates: bool = False):
    """Validation metric (or any history column) against lower steps, one line per named run.

    A selected run (the do-no-harm guard, `auxnb.selection`) is labelled by the run it kept:
    ``"maoal → kept stl"`` is STL's curve, returned by a guarded MAOAL run. With
    ``candidates=True`` every candidate of a selected run is drawn from ``result.candidates``,
    each labelled by its candidate (``"maoal"``, ``"stl (kept)"``, ``"equal"``; prefixed by the
    run's label when `results` holds several runs); a run that was not selected is drawn as usual.

    Args:
        results: label -> RunResult (or anything with a ``history`` DataFrame).
        column: history column; default the validation metric.
        percent: show the values × 100 with "(%)" on the axis; default: for an accuracy column.
        ylabel: the y-axis label (default: the column's name, e.g. "validation accuracy (%)").
        candidates: draw every candidate of each selected run instead of the kept one alone.

    Raises:
        ValueError: ``candidates=True`` and no run in `results` has candidates (none was selected:
            train with ``guard="stl+equal"`` to have them).
    """
    import seaborn as sns

    curves: list[tuple[str, object]] = []
    for label, result in results.items():
        own = getattr(result, "candidates", None) or {}
        if candidates and own:
            chosen = selection_of(result)
            for key, candidate in own.items():
                name = str(key) if len(results) == 1 else f"{label}: {key}"
                curves.append((name + (" (kept)" if chosen is not None and key == chosen["kept"] else ""), candidate))
        else:
            curves.append((run_label(label, result), result))
    if candidates and not any(getattr(r, "candidates", None) for r in results.values()):
        raise ValueError("candidates=True draws the candidates of selected runs, but no run given has any (each was "
                         "trained alone): train with guard='stl+equal' (or 'stl') to have them, or leave candidates out.")
    frames = []
    for label, result in curves:
        h = result.history.copy()
        col = column or next(c for c in h.columns if c.startswith("val_") and c != "val_loss")
        frames.append(pd.DataFrame({"step": h["step"], "value": h[col], "run": label}))
    data = pd.concat(frames, ignore_index=True)
    if percent is None:
        percent = "accuracy" in col
    if percent:
        data["value"] = data["value"] * 100
    name = col.replace("_", " ")
    if name.startswith("val "):
        name = "validation " + name[4:]
    ax = _axes(ax)
    sns.lineplot(data=data, x="step", y="value", hue="run", ax=ax)
    ax.set_xlabel("lower step")
    ax.set_ylabel(ylabel or (f"{name} (%)" if percent else name))
    ax.set_title(title or f"{name} during training")
    return ax


def results_bars(table: pd.DataFrame, value: str = "test", by: str = "method", hue: str | None = None,
                 order: Sequence[str] | None = None, ax=None, title: str | None = None, percent: bool = True):
    """Mean ± std over seeds as bars with the individual seeds as points (from a `sweep` table)."""
    import seaborn as sns

    data = table.copy()
    if percent:
        data[value] = data[value] * 100
    ax = _axes(ax)
    sns.barplot(data=data, x=by, y=value, hue=hue, order=order, errorbar="sd", ax=ax, alpha=0.7)
    # seeds as black points; with hue a one-colour palette keeps them dodged over their bars
    points = {"palette": "dark:black"} if hue is not None else {"color": "black"}
    sns.stripplot(data=data, x=by, y=value, hue=hue, order=order, dodge=hue is not None, ax=ax,
                  size=3, legend=False, **points)
    lo = data[value].min()
    ax.set_ylim(max(0.0, lo - (5 if percent else 0.05)), None)
    ax.set_xlabel(by)
    ax.set_ylabel(f"{value} {'(%)' if percent else ''}".strip())
    ax.set_title(title or f"{value} by {by} (mean ± std over seeds)")
    return ax
