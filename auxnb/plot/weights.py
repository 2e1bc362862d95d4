"""What a method learned, for an ordinary run of any method: task weights over training and their distribution.

Reads only `RunResult.trace` (what every method records at each evaluation; when the do-no-harm
guard kept STL's or Equal's run, the method's own trace, ``trace_trials``); needs no
label-noise run and no method-specific set-up. Returns matplotlib Axes; never shows or prints.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["learned_frame", "task_weights", "weight_distribution"]


def learned_frame(result: Any) -> pd.DataFrame:
    """The learned weights of a run over training, long format: ``step, series, value, what``.

    One series per learned quantity, whatever the method:

    * ``weight/<task>`` (DTG, AuxL, GCS, Auto-Mix): the task weight the method applied;
    * ``importance/<loss>/<module>`` (MAOAL): α of that auxiliary loss on that module;
    * ``batch_mean_weight`` (JTDS, N-JTDS): each task's mean per-sample weight on the batch;
    * ``log_var/<task>`` (Uncert): shown as the weight ``exp(-s)``;
    * ``lambda`` (Auto-Mix), ``generated/*`` (MAXL's generated labels: entropy, classes used).

    Example:
        >>> class R: trace = [{"step": 1, "weight/aux": 0.5}, {"step": 2, "weight/aux": 0.75}]
        >>> learned_frame(R())[["step", "series", "value"]].values.tolist()
        [[1, 'weight/aux', 0.5], [2, 'weight/aux', 0.75]]
    """
    rows: list[dict[str, Any]] = []
    for entry in _learned_trace(result):
        step = entry.get("step")
        tasks = entry.get("tasks")
        for key, value in entry.items():
            if key.startswith(("weight/", "importance/")) and _scalar(value):
                rows.append({"step": step, "series": key, "value": float(value), "what": key.split("/")[0]})
            elif key.startswith("log_var/") and _scalar(value):
                rows.append({"step": step, "series": "weight/" + key.split("/", 1)[1], "value": math.exp(-float(value)),
                             "what": "weight"})
            elif key == "batch_mean_weight" and tasks is not None:
                for name, w in zip(tasks, np.asarray(value, dtype=float).ravel()):
                    rows.append({"step": step, "series": f"weight/{name}", "value": float(w), "what": "weight"})
            elif (key == "lambda" or key.startswith("generated/")) and _scalar(value):
                rows.append({"step": step, "series": key, "value": float(value), "what": key.split("/")[0]})
    return pd.DataFrame(rows, columns=["step", "series", "value", "what"])


def _guard_kept(result: Any) -> str | None:
    """The fallback (``"stl"``, ``"equal"``) a guarded run kept instead of the method, else None."""
    info = (getattr(result, "config", None) or {}).get("fallback") or {}
    kept = info.get("kept")
    return kept if kept is not None and kept != info.get("method") else None


def _learned_trace(result: Any) -> list[dict[str, Any]]:
    """What the method learned: `result.trace`, or, when the do-no-harm guard kept a fallback's run
    (STL, Equal: nothing learned), the method's own trace, which the guard keeps in ``trace_trials``."""
    if _guard_kept(result) is not None and getattr(result, "trace_trials", None):
        return list(result.trace_trials)
    return list(result.trace)


def _scalar(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool)


def _method(result: Any) -> str:
    config = getattr(result, "config", None) or {}
    kept = _guard_kept(result)
    if kept is not None:  # the method's run was trained and plotted, but the guard kept another
        return f"{config['fallback']['method']} (not kept: the guard kept {kept})"
    return str(config.get("method", "run"))


def task_weights(result: Any, ax=None, title: str | None = None):
    """Task weights (or module importances) against lower steps, one line per learned quantity.

    Works for every method that learns or applies weights (MAOAL, JTDS, N-JTDS, DTG, AuxL,
    Auto-Mix, GCS, Uncert); for MAXL it shows its generated labels' statistics.

    Raises:
        ValueError: the run recorded nothing learned (STL, Equal); the message says which runs do.
    """
    import seaborn as sns

    from .common import _axes

    frame = learned_frame(result)
    if frame.empty:
        raise ValueError(
            f"The {_method(result)!r} run recorded no learned weights (STL, Equal and Fixed learn none); plot a "
            "run of maoal, jtds, n-jtds, dtg, auxl, auto-mix, maxl, gcs or uncert."
        )
    ax = _axes(ax)
    sns.lineplot(data=frame, x="step", y="value", hue="series", marker="o", ax=ax)
    ax.set_xlabel("lower step")
    whats = set(frame["what"])
    ax.set_ylabel("importance α" if whats == {"importance"} else "weight" if whats == {"weight"} else "value")
    ax.set_title(title or f"What {_method(result)} learned during training")
    ax.legend(fontsize="small", loc="best")
    return ax


def weight_distribution(result: Any, step: int | None = None, ax=None, title: str | None = None):
    """How the learned weights are distributed at one evaluation (default: the last).

    JTDS / N-JTDS: histogram of the per-sample weights of the probe samples, one colour per task.
    MAOAL: the importance of each auxiliary loss on each module (bars). Other methods: the
    weights at that step (bars).
    """
    import seaborn as sns

    from .common import _axes

    trace = _learned_trace(result)
    if not trace:
        raise ValueError("The run has no trace (it was never evaluated); train with eval_every >= 1.")
    steps = [e.get("step") for e in trace]
    if step is None:
        entry = trace[-1]
    elif step in steps:
        entry = trace[steps.index(step)]
    else:
        raise ValueError(f"No evaluation at step {step}; the trace has steps {steps}.")
    ax = _axes(ax)
    where = f"at step {entry.get('step')}"
    if entry.get("probe_weights") is not None and entry.get("tasks") is not None:
        weights = np.asarray(entry["probe_weights"], dtype=float)
        data = pd.DataFrame(
            [{"task": name, "weight": w} for k, name in enumerate(entry["tasks"]) for w in weights[:, k] if np.isfinite(w)]
        )
        flags = entry.get("probe_corrupted")
        if flags is not None:  # label noise (issue 22): the primary task's weights, clean vs corrupted
            w0 = weights[:, 0]
            primary = entry["tasks"][0]
            data = pd.DataFrame({"task": np.where(np.asarray(flags, dtype=bool), f"{primary}, corrupted label",
                                                  f"{primary}, clean label"), "weight": w0})
            data = data[np.isfinite(w0)]
        sns.histplot(data=data, x="weight", hue="task", element="step", stat="count", common_norm=False, ax=ax)
        ax.set_xlabel("per-sample weight w")
        ax.set_ylabel("samples")
        ax.set_title(title or f"{_method(result)}: per-sample weights of {weights.shape[0]} probe samples {where}")
        return ax
    frame = learned_frame(type("_One", (), {"trace": [entry]})())
    if frame.empty:
        raise ValueError(f"The {_method(result)!r} run recorded no learned weights {where}.")
    if set(frame["what"]) == {"importance"}:
        parts = frame["series"].str.split("/", n=2, expand=True)
        frame = frame.assign(loss=parts[1], module=parts[2])
        sns.barplot(data=frame, x="module", y="value", hue="loss", ax=ax)
        ax.set_ylabel("importance α")
        ax.tick_params(axis="x", rotation=45)
    else:
        sns.barplot(data=frame, x="series", y="value", ax=ax)
        ax.set_ylabel("value")
        ax.tick_params(axis="x", rotation=30)
    ax.set_xlabel("")
    ax.set_title(title or f"{_method(result)}: learned weights {where}")
    return ax
