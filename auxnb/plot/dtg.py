"""DTG-AuxL figures: generated labels of the probe set (the paper's Table 3), collapse, and φ over training.

Inputs are RunResults (or their trace lists); outputs are matplotlib objects. Nothing here trains,
prints or calls plt.show().
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = ["generated_labels", "label_collapse", "generator_state", "label_peaks"]


def _trace(result: Any) -> list[dict]:
    return list(result.trace if hasattr(result, "trace") else result)


def label_peaks(distribution: Sequence[float], bias_class: int | None = None, k: int = 2) -> list[int]:
    """Classes to point at in a generated label (DTG Table 3): the bias term's class (the primary
    label) first, then the `k` largest of the remaining peaks.

    Example:
        >>> label_peaks([0.1, 0.5, 0.05, 0.3, 0.05], bias_class=1, k=2)
        [1, 3, 0]
    """
    p = np.asarray(distribution, dtype=float)
    order = [int(c) for c in np.argsort(-p, kind="stable")]
    first = [bias_class] if bias_class is not None else []
    return first + [c for c in order if c not in first][:k]


def _image(ax, x: np.ndarray | None, title: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    if x is None:
        return
    x = np.asarray(x, dtype=float)
    if x.ndim == 3 and x.shape[0] in (1, 3):
        x = x[0] if x.shape[0] == 1 else np.transpose(x, (1, 2, 0))
    elif x.ndim == 1:
        side = int(round(np.sqrt(x.size)))
        x = x.reshape(side, side) if side * side == x.size else x[None, :]
    if x.ndim == 3:
        x = (x - x.min()) / max(float(np.ptp(x)), 1e-12)
    ax.imshow(x, cmap="gray_r" if x.ndim == 2 else None, interpolation="nearest")


def generated_labels(result: Any, probes: int | Sequence[int] = 4, step: int = -1, peaks: int = 2,
                     class_names: Sequence[str] | None = None, which: str = "generated", mark_partner: bool | None = None,
                     figsize=None, title: str | None = None):
    """DTG Table 3 for a run: per probe, the primary image, its partner (or paired auxiliary image)
    and the generated label distribution with its peaks marked.

    The bias term's peak (the primary label's class) is drawn dark blue and the partner's class
    orange; the `peaks` largest other classes are annotated with their probability.

    Args:
        result: a RunResult of DTG (or its ``trace``) — the trace holds ``probe/*`` entries.
        probes: how many probes (the first ones) or which ones.
        step: index into the trace records (default the last evaluation).
        which: ``"generated"`` (ŷ, Eq. 9/10) or ``"normalised"`` (norm(y_g), without the bias).
        mark_partner: colour the partner's class; default only when the partner's label is a
            primary label (Share-Input). Pass True when an auxiliary dataset shares the classes
            (MNIST digits for digits).
    """
    import matplotlib.pyplot as plt

    trace = _trace(result)
    first = next((r for r in trace if "probe/primary_input" in r), None)
    records = [r for r in trace if f"probe/{which}" in r]
    if first is None or not records:
        raise ValueError("This trace has no DTG probe records (probe/...); run DTG with probe_size > 0.")
    record = records[step]
    labels = np.asarray(record[f"probe/{which}"])
    index = list(range(min(int(probes), len(labels)))) if isinstance(probes, (int, np.integer)) else list(probes)
    y_p = np.asarray(first["probe/primary_label"])
    y_2 = np.asarray(first["probe/partner_label"])
    second = first.get("probe/partner_task", "partner")
    categorical = labels.shape[1] > 1
    if mark_partner is None:
        mark_partner = second == first.get("probe/primary_task")
    fig, axes = plt.subplots(len(index), 3, figsize=figsize or (7.5, 1.9 * len(index)),
                             gridspec_kw={"width_ratios": [1, 1, 3.2]}, squeeze=False)
    names = list(class_names) if class_names is not None else [str(c) for c in range(labels.shape[1])]
    for row, i in enumerate(index):
        a0, a1, a2 = axes[row]
        primary_text = names[int(y_p[i])] if categorical else f"{float(y_p[i]):.2f}"
        _image(a0, None if first["probe/primary_input"] is None else first["probe/primary_input"][i], f"primary: {primary_text}")
        _image(a1, None if first["probe/partner_input"] is None else first["probe/partner_input"][i], f"{second}: {y_2[i]}")
        dist = labels[i]
        colors = ["#9bb7d4"] * len(dist)
        bias = int(y_p[i]) if categorical else None
        if categorical and mark_partner and 0 <= int(y_2[i]) < len(dist):
            colors[int(y_2[i])] = "#f28e2b"
        if bias is not None:
            colors[bias] = "#1f4e79"
        a2.bar(range(len(dist)), dist, color=colors)
        for c in label_peaks(dist, bias, peaks):
            a2.annotate(f"{dist[c]:.2f}", (c, dist[c]), ha="center", va="bottom", fontsize=7)
        a2.set_xticks(range(len(dist)))
        a2.set_xticklabels(names, fontsize=7)
        a2.set_ylim(0, max(1e-6, float(dist.max())) * 1.25)
        a2.set_ylabel("probability", fontsize=8)
        if row == len(index) - 1:
            a2.set_xlabel("class of the generated label", fontsize=8)
    fig.suptitle(title or f"Generated labels at step {record.get('step', '?')} (dark: primary label, orange: partner's label)", fontsize=10)
    fig.tight_layout()
    return fig


def label_collapse(results: Mapping[str, Any], key: str = "generated/cosine_norm", ax=None, title: str | None = None):
    """Mean pairwise cosine of the generated labels over training, one line per named run
    (near 1: every generated label is the same — the mode collapse of DTG §3.3)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    rows = []
    for label, result in results.items():
        for r in _trace(result):
            if key in r:
                rows.append({"step": r["step"], "cosine": r[key], "run": label})
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.2))
    sns.lineplot(data=pd.DataFrame(rows), x="step", y="cosine", hue="run", marker="o", ax=ax)
    ax.set_xlabel("lower step")
    ax.set_ylabel("mean pairwise cosine")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.05)
    ax.set_title(title or "Generated-label similarity over training (1 = collapsed)")
    return ax


def generator_state(result: Any, keys: Sequence[str] | None = None, ax=None, title: str | None = None):
    """α, β and the task weights (and any other scalar trace entries in `keys`) over training."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    trace = _trace(result)
    if keys is None:
        keys = [k for k in trace[-1] if k in ("alpha", "beta", "lambda") or k.startswith("weight/")]
    rows = [{"step": r["step"], "value": float(r[k]), "parameter": k} for r in trace for k in keys if k in r]
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.2))
    sns.lineplot(data=pd.DataFrame(rows), x="step", y="value", hue="parameter", ax=ax)
    ax.set_xlabel("lower step")
    ax.set_ylabel("value")
    ax.set_title(title or "Learned label bias α, partner share β and task weights over training")
    return ax
