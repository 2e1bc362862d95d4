"""MAOAL's figures: the module-level importance α as a heatmap, its evolution over training
(supplement Figs. 1–5), the partition ablation (paper Table 4), and ours-beside-the-paper tables.

Inputs are RunResults, traces or tidy DataFrames; outputs are matplotlib objects or DataFrames.
Nothing here trains, prints or calls plt.show().
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "importance_frame",
    "importance_heatmap",
    "importance_over_training",
    "partition_ablation",
    "compare_with_paper",
    "PAPER_METHOD_NAMES",
]

#: auxnb registry name -> the name the MAOAL paper prints.
PAPER_METHOD_NAMES = {"stl": "SLL", "equal": "Equal", "hpo-tune": "HPO-tune", "gcs": "GCS", "uncert": "Uncert",
                      "auxl": "AuxL", "maoal": "MAOAL"}


def _trace(source: Any) -> list[dict]:
    trace = getattr(source, "trace", source)
    rows = [row for row in trace if "importance" in row]
    if not rows:
        raise ValueError(
            "No MAOAL importance in this trace: pass the RunResult (or result.trace) of a run with "
            "method 'maoal'."
        )
    return rows


def importance_frame(source: Any) -> pd.DataFrame:
    """α over training as a tidy table: one row per (evaluation step, auxiliary loss, module).

    Args:
        source: a `RunResult` of a MAOAL run, or its ``trace`` list.

    Returns:
        Columns ``step``, ``loss``, ``module``, ``position`` (module index, input to output),
        ``importance`` and ``reached`` (False where the loss never sends a gradient to the
        module, e.g. another task's head: α there has no effect).

    Example:
        >>> trace = [{"step": 5, "importance": [[0.5, 1.5]], "importance_losses": ["aux"],
        ...           "importance_groups": ["layer1", "head:y"]}]
        >>> importance_frame(trace)[["step", "module", "importance"]].values.tolist()
        [[5, 'layer1', 0.5], [5, 'head:y', 1.5]]
    """
    records = []
    for row in _trace(source):
        reach = row.get("importance_reach")
        for i, loss in enumerate(row["importance_losses"]):
            for j, module in enumerate(row["importance_groups"]):
                records.append({
                    "step": row["step"], "loss": loss, "module": module, "position": j,
                    "importance": float(row["importance"][i][j]),
                    "reached": True if reach is None else bool(reach[i][j]),
                })
    return pd.DataFrame(records)


def _axes(ax, figsize):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def importance_heatmap(source: Any, step: int | None = None, ax=None, title: str | None = None,
                       annotate: bool = True, vmax: float | None = None):
    """α at one evaluation as a heatmap: auxiliary losses (rows) × modules (columns).

    Args:
        source: a MAOAL `RunResult` or its trace.
        step: the lower step to show (the last evaluation at or before it); default the last.
        vmax: colour scale maximum (fix it when comparing several steps; default: the run's max).

    Pairs a loss never reaches are greyed out.
    """
    import seaborn as sns

    frame = importance_frame(source)
    steps = sorted(frame["step"].unique())
    chosen = steps[-1] if step is None else max([s for s in steps if s <= step] or [steps[0]])
    at = frame[frame["step"] == chosen]
    matrix = at.pivot(index="loss", columns="position", values="importance")
    reached = at.pivot(index="loss", columns="position", values="reached").astype(bool)
    modules = at.drop_duplicates("position").sort_values("position")["module"].tolist()
    losses = list(dict.fromkeys(at["loss"]))
    matrix, reached = matrix.loc[losses], reached.loc[losses]
    created = ax is None
    ax = _axes(ax, (max(4.5, 0.8 * len(modules) + 2.0), 0.5 * len(losses) + 2.0))
    sns.heatmap(matrix, mask=~reached.values, ax=ax, cmap="viridis", vmin=0.0,
                vmax=vmax if vmax is not None else max(1.0, float(frame["importance"].max())),
                annot=annotate and len(modules) <= 12, fmt=".2f", cbar_kws={"label": "importance α"},
                xticklabels=modules, yticklabels=losses)
    ax.set_facecolor("0.85")
    ax.set_xlabel("module (input → output)")
    ax.set_ylabel("auxiliary loss")
    ax.set_title(title or f"module-level importance α at step {chosen}")
    ax.tick_params(axis="x", labelrotation=30)
    ax.tick_params(axis="y", labelrotation=0)
    if created:
        ax.figure.tight_layout()
    return ax


def importance_over_training(source: Any, loss: str | None = None, stages: int | None = None,
                             until: int | str | None = None, ax=None, title: str | None = None):
    """How α of one auxiliary loss evolves: modules (rows) × training time (columns).

    As in the MAOAL supplement (Figs. 1–5), which splits training "from beginning to achieving the
    best validation performance" into a fixed number of stages and shows α at the end of each.

    Args:
        source: a MAOAL `RunResult` or its trace.
        loss: the auxiliary loss (default: the first).
        stages: show this many evaluations, evenly spaced (default: every evaluation).
        until: the last step to show; ``"best"`` uses the RunResult's best-on-val step.
    """
    import seaborn as sns

    frame = importance_frame(source)
    loss = loss or frame["loss"].iloc[0]
    if loss not in set(frame["loss"]):
        raise ValueError(f"Unknown auxiliary loss {loss!r}; the trace has {sorted(set(frame['loss']))}.")
    frame = frame[(frame["loss"] == loss) & frame["reached"]]
    if until == "best":
        best = getattr(source, "best_step", None)
        if best is None:
            raise ValueError("until='best' needs the RunResult (it knows its best step), not a bare trace.")
        until = best
    if until is not None:
        frame = frame[frame["step"] <= int(until)]
    steps = sorted(frame["step"].unique())
    if stages is not None and stages < len(steps):
        picks = np.linspace(0, len(steps) - 1, stages).round().astype(int)
        steps = [steps[i] for i in sorted(set(picks))]
    frame = frame[frame["step"].isin(steps)]
    matrix = frame.pivot(index="position", columns="step", values="importance")
    modules = frame.drop_duplicates("position").sort_values("position")["module"].tolist()
    created = ax is None
    ax = _axes(ax, (max(5.0, 0.5 * len(steps) + 2.5), 0.45 * len(modules) + 1.8))
    sns.heatmap(matrix, ax=ax, cmap="viridis", vmin=0.0, vmax=max(1.0, float(matrix.values.max())),
                annot=len(steps) * len(modules) <= 60, fmt=".2f", yticklabels=modules,
                cbar_kws={"label": "importance α"})
    ax.set_xlabel("lower step")
    ax.set_ylabel("module")
    ax.set_title(title or f"importance of '{loss}' to each module over training")
    ax.tick_params(axis="y", labelrotation=0)
    if created:
        ax.figure.tight_layout()
    return ax


def partition_ablation(table: pd.DataFrame, paper: pd.DataFrame | None = None, paper_column: str | None = None,
                       value: str = "test", by: str = "partition", order: Sequence[str] | None = None,
                       title: str | None = None, figsize=(9, 3.2)):
    """Parameter-L / Block-L / Model-L: our mean ± std over seeds (bars, seeds as points), and
    beside it, when given, the paper's Table 4 column (`paper`, `paper_column`), labelled as such.

    Returns:
        The matplotlib Figure (one or two panels).
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    order = list(order or ["Parameter-L", "Block-L", "Model-L"])
    panels = 2 if paper is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=figsize if panels == 2 else (figsize[0] / 2, figsize[1]), squeeze=False)
    data = table.copy()
    data[value] = data[value] * 100
    ax = axes[0, 0]
    sns.barplot(data=data, x=by, y=value, order=order, errorbar="sd", ax=ax, alpha=0.7)
    sns.stripplot(data=data, x=by, y=value, order=order, ax=ax, color="black", size=3)
    ax.set_ylim(max(0.0, data[value].min() - 5), None)
    ax.set_xlabel("partition")
    ax.set_ylabel(f"{value} accuracy (%)")
    ax.set_title(title or "auxnb (ours): MAOAL by partition")
    if paper is not None:
        if paper_column is None:
            raise ValueError("Give paper_column, the paper's column to show (e.g. 'Pet').")
        rows = paper.set_index("method").loc[order]
        pax = axes[0, 1]
        pax.bar(order, rows[paper_column], yerr=rows.get(f"{paper_column} ±"), color="0.6", capsize=3)
        pax.set_ylim(max(0.0, float(rows[paper_column].min()) - 5), None)
        pax.set_xlabel("partition")
        pax.set_ylabel("accuracy (%)")
        pax.set_title(f"the paper's Table 4 ({paper_column})")
    fig.tight_layout()
    return fig


def compare_with_paper(summary: pd.DataFrame, paper: pd.DataFrame, columns: Mapping[str, str] | Sequence[str],
                       names: Mapping[str, str] | None = None, digits: int = 2) -> pd.DataFrame:
    """Our mean ± std per method next to the paper's, one row per method.

    Args:
        summary: `auxnb.experiments.summarize` output (columns setting, method, mean ± std).
        paper: `auxnb.experiments.paper_results(...)` frame.
        columns: the paper's columns to show (a mapping renames them, e.g. ``{"CUB-semi": "paper: CUB-semi"}``).
        names: auxnb method name -> paper name (default `PAPER_METHOD_NAMES`).

    Returns:
        Columns ``method``, ``ours: <setting>`` for each setting, and ``paper: <column>``.

    Example:
        >>> ours = pd.DataFrame({"setting": ["s"], "method": ["stl"], "mean ± std": ["90.00 ± 1.00"]})
        >>> theirs = pd.DataFrame({"method": ["SLL"], "X": [48.15], "X ±": [0.88]})
        >>> compare_with_paper(ours, theirs, ["X"]).values.tolist()
        [['SLL', '90.00 ± 1.00', '48.15 ± 0.88']]
    """
    names = dict(names or PAPER_METHOD_NAMES)
    columns = dict(columns) if isinstance(columns, Mapping) else {c: f"paper: {c}" for c in columns}
    ours = summary.pivot(index="method", columns="setting", values="mean ± std")
    ours = ours[list(dict.fromkeys(summary["setting"]))]  # settings in the order they were run
    ours.columns = [f"ours: {c}" for c in ours.columns]
    ours.index = [names.get(m, m) for m in ours.index]
    theirs = paper.set_index("method")
    order = [*theirs.index, *[m for m in ours.index if m not in theirs.index]]  # the paper's row order
    table = pd.DataFrame(index=list(dict.fromkeys(order)))
    table = table.join(ours)
    for column, label in columns.items():
        std = theirs.get(f"{column} ±")
        table[label] = [
            f"{theirs.at[m, column]:.{digits}f} ± {std[m]:.{digits}f}" if m in theirs.index and std is not None
            else (f"{theirs.at[m, column]:.{digits}f}" if m in theirs.index else "–")
            for m in table.index
        ]
    table = table.fillna("–")
    return table.rename_axis("method").reset_index()
