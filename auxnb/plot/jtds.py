"""JTDS figures: corrupted-vs-clean sample weights (paper Fig. 3), the learned loss filter (Fig. 6)
and accuracy against the corruption ratio (Fig. 2).

Functions read RunResults (their JTDS / N-JTDS trace) or sweep tables and return matplotlib
objects; they never train, never print and never call plt.show().
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["corruption_weights", "weights_over_training", "noise_separation", "filter_functions", "accuracy_vs_corruption"]


def _trace_at(result: Any, step: int | None) -> dict:
    trace = result.trace if hasattr(result, "trace") else result
    if not trace:
        raise ValueError("The run has no trace; was it trained with JTDS or N-JTDS?")
    if step is None:
        return trace[-1]
    for row in trace:
        if row.get("step") == step:
            return row
    raise ValueError(f"No trace entry at step {step}; steps are {[r.get('step') for r in trace]}.")


def _task_column(row: dict, task: str | None) -> tuple[int, str]:
    names = list(row.get("tasks") or [])
    if not names:
        raise ValueError("The trace has no 'tasks' entry; was the run trained with JTDS or N-JTDS?")
    name = task or names[0]  # the method's task order starts with the primary task
    if name not in names:
        raise ValueError(f"Unknown task {name!r}; the trace has {names}.")
    return names.index(name), name


def corruption_weights(result: Any, step: int | None = None, task: str | None = None, n: int = 64,
                       figsize=(7.5, 3.4), title: str | None = None):
    """Paper Fig. 3: for `n` probe training samples, whether each label is correct (left) and the
    weight the schedule gives it on `task` (right, default the primary task), as two square grids.

    Args:
        result: a RunResult of JTDS / N-JTDS trained with label noise (or its trace list).
        step: the trace step to show (default: the last evaluation).
    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    row = _trace_at(result, step)
    col, name = _task_column(row, task)
    flags = row.get("probe_corrupted")
    if flags is None:
        raise ValueError("The run has no corruption flags: train with label_noise > 0 to draw this figure.")
    weights = np.asarray(row["probe_weights"])[:, col]
    seen = np.isfinite(weights)
    weights, clean = weights[seen][:n], (~np.asarray(flags)[seen])[:n]
    side = int(np.floor(np.sqrt(len(weights))))
    if side < 1:
        raise ValueError("No probe sample has been seen yet.")
    k = side * side
    fig, axes = plt.subplots(1, 2, figsize=figsize)
    sns.heatmap(clean[:k].reshape(side, side).astype(float), ax=axes[0], cmap="Greys_r", vmin=0, vmax=1,
                cbar_kws={"label": "1 = correct label, 0 = corrupted"}, xticklabels=False, yticklabels=False)
    axes[0].set_title("(a) label is correct")
    sns.heatmap(weights[:k].reshape(side, side), ax=axes[1], cmap="Greys_r", vmin=0,
                cbar_kws={"label": f"w on {name}"}, xticklabels=False, yticklabels=False)
    axes[1].set_title("(b) scheduled weight")
    for ax in axes:
        ax.set_xlabel("probe sample")
        ax.set_ylabel("probe sample")
    fig.suptitle(title or f"Corrupted vs clean samples: weights on {name} at step {row.get('step')}")
    fig.tight_layout()
    return fig


def weights_over_training(results: Mapping[str, Any] | Any, task: str | None = None, ax=None, title: str | None = None):
    """Mean weight of the corrupted and of the clean probe samples on `task` at every evaluation.

    Args:
        results: a RunResult or label -> RunResult (JTDS / N-JTDS runs with label noise).
    """
    import seaborn as sns

    from .common import _axes

    if not isinstance(results, Mapping):
        results = {"": results}
    rows = []
    for label, result in results.items():
        for entry in result.trace:
            flags = entry.get("probe_corrupted")
            if flags is None or "probe_weights" not in entry:
                continue
            col, name = _task_column(entry, task)
            w = np.asarray(entry["probe_weights"])[:, col]
            flags = np.asarray(flags)
            for group, sel in (("corrupted", flags), ("clean", ~flags)):
                sel = sel & np.isfinite(w)
                if sel.any():
                    rows.append({"step": entry["step"], "mean weight": float(w[sel].mean()),
                                 "samples": group, "run": label or group})
    if not rows:
        raise ValueError("No trace entry carries probe weights with corruption flags.")
    data = pd.DataFrame(rows)
    ax = _axes(ax)
    many = data["run"].nunique() > 1 and len(results) > 1
    sns.lineplot(data=data, x="step", y="mean weight", hue="samples", style="run" if many else None,
                 hue_order=["clean", "corrupted"], ax=ax)
    if many:
        # two legend groups (samples, run) cover the lines wherever they sit inside: put them beside
        sns.move_legend(ax, "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_xlabel("lower step")
    ax.set_ylabel("mean scheduled weight")
    ax.set_title(title or "Mean weight of corrupted vs clean training samples")
    return ax


def noise_separation(results: Mapping[str, Any] | Any, figsize=(10, 3.4), title: str | None = None):
    """How well the schedule tells corrupted from clean training samples, over training (issue 22).

    Left: the mean primary weight of the corrupted and of the clean samples of the lower batches
    between two evaluations (``batch_weight_corrupted`` / ``batch_weight_clean`` of the trace, every
    training batch, not only the probes). Right: their AUC (``batch_weight_auc``: the chance that a
    clean sample outweighs a corrupted one in its batch; 0.5 = no separation, dashed).

    Args:
        results: a RunResult or label -> RunResult of JTDS / N-JTDS runs trained with label noise.
    Returns:
        The matplotlib Figure.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    if not isinstance(results, Mapping):
        results = {"": results}
    rows = []
    for label, result in results.items():
        trace = result.trace if hasattr(result, "trace") else result
        for entry in trace:
            if "batch_weight_auc" not in entry:
                continue
            for group in ("corrupted", "clean"):
                rows.append({"step": entry["step"], "run": label, "samples": group,
                             "mean weight": float(entry[f"batch_weight_{group}"]), "auc": float(entry["batch_weight_auc"])})
    if not rows:
        raise ValueError("No trace entry carries per-batch noise statistics: train JTDS / N-JTDS with label_noise > 0.")
    data = pd.DataFrame(rows)
    many = data["run"].nunique() > 1
    fig, axes = plt.subplots(1, 2, figsize=figsize)
    sns.lineplot(data=data, x="step", y="mean weight", hue="samples", hue_order=["clean", "corrupted"],
                 style="run" if many else None, ax=axes[0])
    axes[0].set_xlabel("lower step")
    axes[0].set_ylabel("mean primary weight (batches)")
    axes[0].set_title("(a) corrupted vs clean samples")
    auc = data[data["samples"] == "clean"]
    sns.lineplot(data=auc, x="step", y="auc", hue="run" if many else None, ax=axes[1])
    axes[1].axhline(0.5, color="grey", linestyle="--", linewidth=1)
    axes[1].set_ylim(0, 1)
    axes[1].set_xlabel("lower step")
    axes[1].set_ylabel("AUC (clean outweighs corrupted)")
    axes[1].set_title("(b) separation")
    if many:
        sns.move_legend(axes[0], "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(title or "What the schedule learned about the corrupted labels")
    fig.tight_layout()
    return fig


def filter_functions(results: Mapping[str, Any] | Any, task: str | None = None,
                     lhat: Sequence[float] | np.ndarray | None = None, step: int | None = None,
                     ax=None, title: str | None = None):
    """Paper Fig. 6: the learned filter σ2(a_k·l̂ + b_k) of `task` against the normalised loss l̂.

    Args:
        results: a RunResult or label -> RunResult of JTDS runs (variants with the loss term).
        lhat: the normalised losses to draw (default −3..3).
    """
    import seaborn as sns

    from .common import _axes

    if not isinstance(results, Mapping):
        results = {"JTDS": results}
    x = np.linspace(-3, 3, 61) if lhat is None else np.asarray(lhat, dtype=float)
    rows = []
    for label, result in results.items():
        row = _trace_at(result, step)
        if "filter_a" not in row:
            raise ValueError(f"Run {label!r} has no learned filter (N-JTDS, or a JTDS variant without the loss term).")
        col, name = _task_column(row, task)
        a, b = float(row["filter_a"][col]), float(row["filter_b"][col])
        y = 1.0 / (1.0 + np.exp(-(a * x + b)))
        rows += [{"normalised loss": xi, "filter": yi, "run": f"{label} (a={a:.2f}, b={b:.2f})"} for xi, yi in zip(x, y)]
    ax = _axes(ax)
    sns.lineplot(data=pd.DataFrame(rows), x="normalised loss", y="filter", hue="run", ax=ax)
    ax.set_ylim(0, 1)
    ax.set_xlabel(r"normalised loss $\hat l$ (z-score within the batch)")
    ax.set_ylabel(r"filter $\sigma(a\,\hat l + b)$")
    ax.set_title(title or f"Learned loss filter of the {task or 'primary'} task")
    return ax


def accuracy_vs_corruption(table: pd.DataFrame, x: str = "label_noise", value: str = "test", by: str = "method",
                           order: Sequence[str] | None = None, percent: bool = True, ax=None, title: str | None = None):
    """Paper Fig. 2: test accuracy against the corruption ratio, one line per method (mean ± sd over seeds).

    Args:
        table: one row per run with columns `x`, `value` and `by` (e.g. `sweep` rows plus the ratio).
    """
    import seaborn as sns

    from .common import _axes

    for col in (x, value, by):
        if col not in table.columns:
            raise ValueError(f"The table has no column {col!r}; it has {list(table.columns)}.")
    data = table.copy()
    if percent:
        data[value] = data[value] * 100
    ax = _axes(ax)
    sns.lineplot(data=data, x=x, y=value, hue=by, hue_order=order, style=by, style_order=order,
                 markers=True, dashes=False, errorbar="sd", ax=ax)
    ax.set_xlabel("corruption ratio r (label replaced by a uniform class with probability r)")
    ax.set_ylabel(f"{value} accuracy{' (%)' if percent else ''}")
    ax.set_title(title or "Accuracy under corrupted primary labels")
    return ax
