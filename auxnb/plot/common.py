"""Figures shared by every chapter: learning curves and a results comparison.

Inputs are RunResults or tidy DataFrames; outputs are matplotlib Axes.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

__all__ = ["learning_curves", "results_bars"]


def _axes(ax=None, figsize=(6, 3.5)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def learning_curves(results: Mapping[str, object], column: str | None = None, ax=None, title: str | None = None,
                    percent: bool | None = None, ylabel: str | None = None):
    """Validation metric (or any history column) against lower steps, one line per named run.

    Args:
        results: label -> RunResult (or anything with a ``history`` DataFrame).
        column: history column; default the validation metric.
        percent: show the values × 100 with "(%)" on the axis; default: for an accuracy column.
        ylabel: the y-axis label (default: the column's name, e.g. "validation accuracy (%)").
    """
    import seaborn as sns

    frames = []
    for label, result in results.items():
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
